"""DALG: Deep Attentive Local and Global modeling for image retrieval.

Reference: Song, Zhu, Yang, He, "DALG: Deep Attentive Local and Global Modeling for Image
Retrieval", arXiv:2207.00287 (2022). Ancestor: Yang, Song, He et al., "DOLG: Single-Stage Image
Retrieval with Deep Orthogonal Fusion of Local and Global Features", ICCV 2021,
arXiv:2108.02927 (its spatial attention, orthogonal fusion and ArcFace recipe).

Forward order, as in the paper (one class per part, in this order below):

1. **Global branch** -- a timm ViT (kept at ``self.backbone`` with timm key names); the class
   token after the final norm is projected to ``global_dim`` (1024, DOLG's ``f_g``).
2. **Local branch** -- the tokens after an intermediate block (``local_block``) reshaped to a
   (B, C, h, w) map; :class:`WindowAttentionBlock` (Swin-style non-overlapping window
   multi-head self-attention with its own weights) and then :class:`SpatialAttention2d`
   (DOLG: ``f = BN(conv1x1(x))``, ``a = softplus(conv1x1(relu(f)))``, ``f_l = a * f / ||f||``).
3. **Fusion** -- :class:`CrossAttentionFusion`: ``f_g`` is the query, the ``h * w`` local
   tokens are keys / values (multi-head); ``concat(f_g, attended)`` -> FC -> the 512-d
   L2-normalised ``embedding``. Ablation: :class:`OrthogonalFusion` (DOLG).
4. **Head** -- :class:`finegrain.losses.arcface.ArcFaceHead` (s = 30, m = 0.15) over the
   training landmarks: ``logits`` = ``s * cos`` (no margin), ``losses["arcface"]`` in training.

Readings chosen where the DALG abstract is silent (the full text was not at hand):

- Local features come from the tokens after block ``2 * depth // 3 - 1`` (0-based; block 7 of
  a 12-block ViT), the transformer counterpart of DOLG's ``res4`` (3rd of 4 stages).
- The window block is a full Swin block without shift (pre-norm W-MSA with relative position
  bias + MLP, both residual), timm's ``WindowAttention`` with its own weights; a map whose
  side is not a multiple of the window is zero-padded bottom / right and the padded tokens are
  masked out as keys (so the descriptor does not depend on the padding). Default window 8:
  a 512 px image with patch 16 gives a 32 x 32 map, 16 windows.
- Spatial attention uses BatchNorm (DOLG), ``local_dim`` = ``global_dim`` = 1024.
- Cross-attention: linear q (from ``f_g``), k, v (from ``f_l``), ``softmax(q k^T / sqrt(d))
  v`` per head, output projection back to ``global_dim``; no residual or norm, so that
  ``concat(f_g, attended)`` keeps both parts as DOLG's ``concat(f_g, f_orth)`` does.
- Orthogonal fusion (DOLG Eq. 4-5): per location ``f_orth = f_l - (f_l . f_g) f_g / |f_g|^2``,
  average-pooled, concatenated with ``f_g``.
- Inputs of any size (aspect ratio kept for retrieval): the ViT is built with
  ``dynamic_img_size=True, dynamic_img_pad=True`` (position embeddings resampled per input).

Baseline: ``local="none", fusion="none"`` is the plain ViT global descriptor (class token ->
``global_dim`` -> FC -> 512, same ArcFace head): what the recipes' baseline twins train.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse
from torch.utils.checkpoint import checkpoint

from ..losses.arcface import ArcFaceHead
from .backbone import create_backbone
from .explain import AttentionMap, check_pair
from .registry import FinegrainModel, build, register_model
from ..choices import check_choice

Local = Literal["window_attention", "none"]
"""``local``: the local branch (``none``: global only)."""

Fusion = Literal["cross_attention", "orthogonal", "none"]
"""``fusion``: how the local features join the global one."""

GlobalPool = Literal["token", "avg"]
"""``global_pool``: how ``f_g`` pools the tokens."""

__all__ = ["DALG", "WindowAttentionBlock", "SpatialAttention2d", "CrossAttentionFusion",
           "OrthogonalFusion", "window_padding_mask"]


# --------------------------------------------------------------------------- local branch
def window_padding_mask(H: int, W: int, window_size: int, device=None) -> torch.Tensor | None:
    """Additive (num_windows, N, N) mask that hides zero-padded tokens as keys.

    ``N = window_size ** 2``; windows are numbered as :func:`window_partition` numbers them
    (row-major over the padded map). ``None`` when ``H`` and ``W`` are multiples of the window.
    """
    pad_h, pad_w = (-H) % window_size, (-W) % window_size
    # an exported graph serves every input size: the mask is built there even when the
    # example's grid needs no padding (a branch on its size would be traced away)
    if not torch.compiler.is_exporting() and pad_h == 0 and pad_w == 0:
        return None
    valid = torch.zeros(1, H + pad_h, W + pad_w, 1, device=device)
    valid[:, :H, :W] = 1.0
    valid = window_partition(valid, (window_size, window_size)).flatten(1)  # (nW, N)
    mask = torch.zeros(valid.shape[0], valid.shape[1], valid.shape[1], device=device)
    return mask.masked_fill(valid[:, None, :] == 0, float("-inf"))  # keys masked per window


class WindowAttentionBlock(nn.Module):
    """Swin block without shift on a (B, H, W, C) token map.

    ``x = x + W-MSA(LN(x))``; ``x = x + MLP(LN(x))``, where W-MSA is multi-head self-attention
    inside non-overlapping ``window_size x window_size`` windows with a learned relative
    position bias (timm ``WindowAttention``, own weights).

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: window side (tokens).
        mlp_ratio: hidden width of the MLP relative to ``dim`` (0 drops the MLP).
        qkv_bias: bias of the qkv projection.
        drop_path: stochastic depth on both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window_size,
                                    qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """W-MSA of an already normalised (B, H, W, C) map -> (B, H, W, C)."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_h, pad_w = (-H) % ws, (-W) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C), zeros bottom / right
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(x, (ws, ws)).flatten(1, 2)  # (B * nW, ws * ws, C)
        mask = window_padding_mask(H, W, ws, device=x.device)
        if mask is not None:
            mask = mask.to(x.dtype)
        out = self.attn(windows, mask=mask)  # (B * nW, ws * ws, C)
        out = window_reverse(out.view(-1, ws, ws, C), (ws, ws), Hp, Wp)  # (B, Hp, Wp, C)
        return out[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SpatialAttention2d(nn.Module):
    """DOLG spatial attention on a (B, C, H, W) map.

    ``f = BN(conv1x1(x))`` (C -> ``dim``); ``a = softplus(conv1x1(relu(f)))`` (``dim`` -> 1);
    output ``a * f / ||f||_2`` (L2 over channels), shape (B, dim, H, W), and ``a`` (B, 1, H, W).

    Args:
        in_dim: input channels C.
        dim: output channels (the local feature dimension).
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bn(self.conv1(x))  # (B, dim, H, W)
        f_norm = F.normalize(f, p=2, dim=1)
        att = F.softplus(self.conv2(F.relu(f)))  # (B, 1, H, W)
        return att * f_norm, att


# --------------------------------------------------------------------------- fusion
class CrossAttentionFusion(nn.Module):
    """Global feature attends to the local tokens; returns ``concat(f_g, attended)``.

    Per head ``h``: ``q_h = (W_q f_g)_h`` (D), ``K_h = (W_k F_l)_h``, ``V_h = (W_v F_l)_h``
    (HW, D); ``o_h = softmax(q_h K_h^T / sqrt(D)) V_h``; ``attended = W_o [o_1 .. o_nh]``.

    Args:
        global_dim: dimension of ``f_g`` (and of the attended vector).
        local_dim: channels of the local map.
        num_heads: heads (must divide ``global_dim``).
        qkv_bias: bias of the q / k / v projections.
    """

    def __init__(self, global_dim: int, local_dim: int, num_heads: int = 8,
                 qkv_bias: bool = True):
        super().__init__()
        if global_dim % num_heads:
            raise ValueError(f"fusion_heads={num_heads} must divide global_dim={global_dim}")
        self.num_heads = num_heads
        self.head_dim = global_dim // num_heads
        self.q = nn.Linear(global_dim, global_dim, bias=qkv_bias)
        self.kv = nn.Linear(local_dim, 2 * global_dim, bias=qkv_bias)
        self.proj = nn.Linear(global_dim, global_dim)
        self.out_dim = 2 * global_dim

    def attend(self, f_g: torch.Tensor, f_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attended (B, Dg), attention (B, nh, H*W))`` for ``f_g`` (B, Dg), ``f_l``
        (B, Dl, H, W)."""
        B, Dl, H, W = f_l.shape
        nh, D = self.num_heads, self.head_dim
        tokens = f_l.flatten(2).transpose(1, 2)  # (B, HW, Dl)
        q = self.q(f_g).view(B, nh, 1, D)  # (B, nh, 1, D)
        k, v = self.kv(tokens).view(B, H * W, 2, nh, D).permute(2, 0, 3, 1, 4)  # 2 x (B,nh,HW,D)
        attn = (q @ k.transpose(-2, -1)) * D ** -0.5  # (B, nh, 1, HW)
        attn = attn.float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).reshape(B, nh * D)  # (B, Dg)
        return self.proj(out), attn.squeeze(2)

    def forward(self, f_g: torch.Tensor, f_l: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attend(f_g, f_l)
        return torch.cat([f_g, attended], dim=1)  # (B, 2 Dg)


class OrthogonalFusion(nn.Module):
    """DOLG orthogonal fusion (Eq. 4-5): remove from every local vector its projection on
    ``f_g``, average-pool the orthogonal part, concatenate with ``f_g`` -> (B, 2 Dg).

    Args:
        global_dim: dimension of ``f_g``; the local map must have as many channels.
    """

    def __init__(self, global_dim: int):
        super().__init__()
        self.out_dim = 2 * global_dim

    def forward(self, f_g: torch.Tensor, f_l: torch.Tensor) -> torch.Tensor:
        B, C, H, W = f_l.shape
        tokens = f_l.flatten(2)  # (B, C, HW)
        coef = (f_g[:, None, :] @ tokens) / f_g.pow(2).sum(1).clamp_min(1e-12)[:, None, None]
        f_orth = tokens - f_g[:, :, None] * coef  # (B, C, HW), each column orthogonal to f_g
        return torch.cat([f_g, f_orth.mean(dim=2)], dim=1)  # (B, 2C)


# --------------------------------------------------------------------------- model
class DALG(FinegrainModel):
    """DALG retrieval model (see the module docstring for the forward order and readings).

    Args:
        backbone: timm ViT / DeiT name (``vit_base_patch16_224`` ...).
        num_classes: training landmarks (GLDv2-clean: 81,313), the ArcFace head's classes.
        img_size: training input size; position embeddings are sized for it and resampled
            for other sizes at run time.
        global_dim: dimension of the projected global feature ``f_g`` (DOLG: 1024).
        local_dim: channels of the local feature map (DOLG: 1024; must equal ``global_dim``
            for ``fusion="orthogonal"``).
        embedding_dim: dimension of the final L2-normalised descriptor (512).
        local: ``"window_attention"`` (window MHSA + spatial attention) or ``"none"``.
        fusion: ``"cross_attention"`` (DALG), ``"orthogonal"`` (DOLG ablation) or ``"none"``
            (global only; with ``local="none"`` the plain ViT global-descriptor baseline).
        local_block: 0-based index of the block whose output tokens feed the local branch
            (negative counts from the end); ``None``: ``2 * depth // 3 - 1``.
        window_size: side of the attention windows, in tokens.
        window_heads: heads of the window attention (``None``: the backbone's).
        fusion_heads: heads of the cross-attention fusion.
        mlp_ratio: MLP width of the window block (0: attention only).
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens) for ``f_g``.
        arcface_s: ArcFace scale s.
        arcface_m: ArcFace margin m (radians).
        drop_path_rate: stochastic depth of the backbone.
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size`` ... for tiny test / demo models).
    """

    family = "dalg"
    pretrained_note = "ImageNet ViT-B/16 (e.g. timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)"

    def __init__(self, backbone: str = "vit_base_patch16_224", num_classes: int = 1000,
                 img_size: int | tuple[int, int] | None = None, global_dim: int = 1024,
                 local_dim: int = 1024, embedding_dim: int = 512,
                 local: Local = "window_attention", fusion: Fusion = "cross_attention",
                 local_block: int | None = None, window_size: int = 8,
                 window_heads: int | None = None, fusion_heads: int = 8, mlp_ratio: float = 4.0,
                 global_pool: GlobalPool = "token", arcface_s: float = 30.0,
                 arcface_m: float = 0.15, drop_path_rate: float = 0.1,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        check_choice("local", local, Local)
        check_choice("fusion", fusion, Fusion)
        if (local == "none") != (fusion == "none"):
            raise ValueError(f"local={local!r} with fusion={fusion!r}: a fusion needs the local "
                             f"branch and the local branch needs a fusion; use both 'none' for "
                             f"the global-only baseline")
        check_choice("global_pool", global_pool, GlobalPool)
        self.backbone, info = create_backbone(
            backbone, img_size, **{"drop_path_rate": drop_path_rate, "dynamic_img_size": True,
                                   "dynamic_img_pad": True, **(backbone_kwargs or {})})
        C = info.num_features
        depth = len(self.backbone.blocks)
        if global_pool == "token" and getattr(self.backbone, "cls_token", None) is None:
            raise ValueError(f"{backbone} has no class token; use global_pool='avg'")
        self.global_pool = global_pool
        self.local_kind, self.fusion_kind = local, fusion
        self.num_classes = num_classes

        # 1. global branch: class token -> f_g
        self.global_proj = nn.Linear(C, global_dim)

        # 2. local branch: intermediate tokens -> window MHSA -> spatial attention
        self.local_block = None
        if local == "window_attention":
            lb = 2 * depth // 3 - 1 if local_block is None else local_block
            lb = lb + depth if lb < 0 else lb
            if not 0 <= lb < depth:
                raise ValueError(f"local_block={local_block} outside the {depth} blocks of "
                                 f"{backbone}")
            self.local_block = lb
            heads = window_heads or self.backbone.blocks[0].attn.num_heads
            self.window_block = WindowAttentionBlock(C, heads, window_size, mlp_ratio)
            self.spatial_attention = SpatialAttention2d(C, local_dim)

        # 3. fusion -> FC -> embedding
        if fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(global_dim, local_dim, fusion_heads)
            fused_dim = self.fusion.out_dim
        elif fusion == "orthogonal":
            if local_dim != global_dim:
                raise ValueError(f"fusion='orthogonal' needs local_dim == global_dim "
                                 f"(got {local_dim} and {global_dim})")
            self.fusion = OrthogonalFusion(global_dim)
            fused_dim = self.fusion.out_dim
        else:
            self.fusion = None
            fused_dim = global_dim
        self.fc = nn.Linear(fused_dim, embedding_dim)
        self.embedding_dim = embedding_dim

        # 4. ArcFace head
        self.head = ArcFaceHead(embedding_dim, num_classes, s=arcface_s, m=arcface_m)

    # ---------------------------------------------------------------- forward, in paper order
    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone pass: ``global`` f_g (B, Dg); with the local branch also ``local`` f_l
        (B, Dl, h, w) and ``spatial_attention`` (B, 1, h, w)."""
        bb = self.backbone
        x = bb.patch_embed(images)  # (B, h, w, C) with dynamic_img_size, else (B, N, C)
        if x.ndim == 4:
            B, h, w, C = x.shape
        else:
            (B, _, C), (h, w) = x.shape, bb.patch_embed.grid_size
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(x)))  # (B, P + h*w, C), P prefix tokens
        mid = None
        ckpt = bb.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(bb.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
            if i == self.local_block:
                mid = x
        x = bb.norm(x)
        P = bb.num_prefix_tokens
        g = x[:, 0] if self.global_pool == "token" else x[:, P:].mean(1)  # (B, C)
        out = {"global": self.global_proj(g)}  # (B, Dg)
        if mid is not None:
            tokens = mid[:, P:].reshape(B, h, w, C)  # (B, h, w, C)
            tokens = self.window_block(tokens).permute(0, 3, 1, 2)  # (B, C, h, w)
            out["local"], out["spatial_attention"] = self.spatial_attention(tokens)
        return out

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fusion -> FC -> L2-normalised fp32 descriptor (B, embedding_dim)."""
        fused = feats["global"] if self.fusion is None else self.fusion(feats["global"],
                                                                        feats["local"])
        return F.normalize(self.fc(fused).float(), dim=-1)

    def output_keys(self) -> set[str]:
        return {"logits", "embedding"}

    def loss_names(self) -> set[str]:
        return {"arcface"}

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """``{"embedding", "logits"}``; with ``targets`` also ``"losses"`` / ``"logs"``."""
        emb = self.forward_head(self.forward_features(images))  # (B, E)
        logits, loss = self.head(emb, targets)
        out = {"embedding": emb, "logits": logits}
        if targets is not None:
            out["losses"] = {"arcface": loss}
            with torch.no_grad():
                acc = (logits.argmax(1) == targets).float().mean()
            out["logs"] = {"arcface": loss.detach(), "acc": acc}
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone blocks in the backward pass (memory for 512 px ViT-B)."""
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Full names exempt from weight decay (timm convention: the backbone's position
        embedding and class token, Swin's relative position bias table)."""
        own = dict(self.named_parameters())
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()} & set(own)
        if self.local_block is not None:
            names.add("window_block.attn.relative_position_bias_table")
        return names

    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None
                ) -> list[AttentionMap]:
        """Raw attention maps (B, h, w) on the token grid. No pair-wise map.

        ``spatial_attention``: the local branch's softplus attention ``a``;
        ``fusion_attention``: the cross-attention of ``f_g`` over the local tokens, mean over
        heads (only with ``fusion="cross_attention"``). Empty for the global-only baseline.
        """
        check_pair(self, pair)
        feats = self.forward_features(images)
        maps = []
        if "spatial_attention" in feats:
            maps.append(AttentionMap("spatial_attention",
                                     feats["spatial_attention"][:, 0].float()))  # (B, h, w)
        if isinstance(self.fusion, CrossAttentionFusion):
            B, _, h, w = feats["local"].shape
            _, attn = self.fusion.attend(feats["global"], feats["local"])  # (B, nh, hw)
            maps.append(AttentionMap("fusion_attention", attn.float().mean(1).view(B, h, w)))
        return maps


# --------------------------------------------------------------------------- registry
def _create_dalg(backbone: str, **kwargs) -> DALG:
    return build(DALG, backbone=backbone, **kwargs)


@register_model
def dalg_vit_base_patch16_224(**kwargs) -> DALG:
    """DALG on ViT-B/16 (the paper's scale)."""
    return _create_dalg("vit_base_patch16_224", **kwargs)


@register_model
def dalg_vit_small_patch16_224(**kwargs) -> DALG:
    """DALG on ViT-S/16."""
    return _create_dalg("vit_small_patch16_224", **kwargs)


@register_model
def dalg_deit_tiny_patch16_224(**kwargs) -> DALG:
    """DALG on DeiT-Ti/16 (tests and the demo, with ``backbone_kwargs`` for tinier ones)."""
    return _create_dalg("deit_tiny_patch16_224", **kwargs)


@register_model
def dalg_vit_tiny_r_s16_p8_224(**kwargs) -> DALG:
    """DALG on the R+ViT-Ti hybrid (ResNet stem + ViT-Ti): the demo's small DALG, sharing the
    pretrained backbone of the demo's DCAL."""
    return _create_dalg("vit_tiny_r_s16_p8_224", **kwargs)
