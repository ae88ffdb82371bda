"""Cross-image attention for conditional embeddings in deep metric learning.

Kotovenko, Ma, Milbich, Ommer. "Cross-Image-Attention for Conditional Embeddings in Deep
Metric Learning", CVPR 2023. No official code is public; spec: ``spec/cross_image_attention.md``.

A standard DML model pools an image's feature map into its embedding before it sees the image
it will be compared with. During training, this model also embeds image i *conditioned on*
image j by cross-attention from j's embedding into i's feature map, and applies a pair-based
DML loss to the resulting conditional similarities; at test time only the ordinary
(unconditional) embedding is computed: no extra parameters, no extra compute.

Spec item -> code:

- feature map tokens F_i: :meth:`CrossImageDML.forward_features` (ResNet ``forward_features``
  (B, C, h, w) -> (B, h*w, C); ViT tokens after the final norm, (B, P+N, C) with P prefix
  tokens; the cross-attention reads the N patch tokens);
- z_i = L2norm(Linear(pool(F_i))): :meth:`CrossImageDML.forward_head`;
- c_{i|j} = CrossAttn(query = projected z_j, keys/values = projected F_i), a stack of L pre-LN
  cross-attention layers: :class:`ConditionalEmbedding` of :class:`CrossAttentionLayer`;
- every pair (i, j) of the batch at once: one attention call per layer, image i as the SDPA
  batch and the B queries z_j as its query sequence, so c is (B_i, B_j, E) with
  ``c[i, j] = c_{i|j}``; cost B^2 queries over N tokens;
- s_ij = cos(c_{i|j}, c_{j|i}) (symmetric), or ``asymmetric=True``: s_ij = cos(c_{i|j}, z_j):
  :meth:`CrossImageDML.pair_similarity`;
- loss = ``loss``(z, y) + lambda * ``cond_loss``(S, y): :meth:`CrossImageDML.forward`, losses
  from :mod:`finegrain.losses.dml` (pytorch-metric-learning; ``cond_loss`` reads S through a
  precomputed-similarity distance);
- test time uses z only: ``forward`` in eval mode or without targets never calls the
  cross-attention; ``cross_attention=False`` builds none of it (the baseline).

Readings chosen where the paper is silent (all configurable):

1. Query init: q_0 = W_q z_j, the *normalised* embedding z_j projected to the attention width
   (default the embedding size E); gradients flow into z_j through the query too.
2. Keys / values: W_t F_i (one linear token projection C -> D shared by all layers), each layer
   LayerNorms them itself; no position embedding (ResNet tokens carry none; ViT tokens already
   hold theirs). Every layer attends to all N tokens of image i ("hierarchy" = depth L).
3. Layer: ``q = q + Proj(MHA(LN(q), LN(kv)))``, ``q = q + MLP(LN(q))`` (GELU MLP, ratio 4);
   output ``c = L2norm(W_o LN(q))`` in the embedding space (E). The first layer's queries are
   the same B vectors for every image i, so its LN and query projection run on B vectors,
   not B^2 (exact).
4. Pooling: ``avg`` for CNNs; ``token`` (the CLS token after the final norm) for ViTs, as in
   DINO / Hyp-ViT DML; ``max`` and ``avgmax`` (avg + max) are options.
5. The diagonal s_ii is computed but never used (pml losses skip i = i pairs).
6. Losses and similarities in fp32 (autocast off); attention runs in the autocast dtype.
7. In eval mode ``model(images, targets=y)`` returns the z loss only (``"dml"``): the
   conditional term is a training signal.
8. Frozen BatchNorm (``freeze_bn``, default on): backbone BN layers stay in eval mode and their
   affine parameters are frozen, as in the standard DML pipeline.

Optional conditional re-ranking (not in the paper's test protocol, off by default):
:func:`conditional_rerank` re-orders each query's top-k neighbours by the conditional
similarity of the pair.
"""

from __future__ import annotations

import contextlib
import math

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ..losses.dml import PAIR_LOSSES, build_embedding_loss, build_similarity_loss
from .registry import register_model

POOLS = ("avg", "max", "avgmax", "token")


class CrossAttentionLayer(nn.Module):
    """One pre-LN cross-attention layer: ``q = q + MHA(LN(q), LN(kv))``; ``q = q + MLP(LN(q))``.

    Queries (Bi, Q, D) attend to the tokens (Bi, N, D) of the same batch row; with image i as
    the batch row and the B partner embeddings as its Q queries, every pair is one call.

    Args:
        dim: attention width D.
        num_heads: number of heads H (D divisible by H).
        mlp_ratio: MLP hidden size over D.
        qkv_bias: bias in the query / key / value projections.
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Refine the queries with the tokens.

        Args:
            q: (Bi, Q, D) queries, or (1, Q, D) queries shared by every image (the first
                layer: LN and the query projection then run once per query, not per pair).
            tokens: (Bi, N, D) keys / values.
            return_attn: also return the attention probabilities (Bi, H, Q, N), computed
                explicitly (pictures); otherwise one fused SDPA call.
        """
        Bq, Q, D = q.shape  # Bq = Bi, or 1 for shared queries
        Bi, N = tokens.shape[:2]
        H, hd = self.num_heads, self.head_dim
        qh = self.q(self.norm_q(q)).reshape(Bq, Q, H, hd).transpose(1, 2)  # (Bq, H, Q, hd)
        if Bq != Bi:  # shared queries: one copy (Bi, H, Q, hd), fused kernels want strides
            qh = qh.expand(Bi, H, Q, hd).contiguous()
        kv = self.kv(self.norm_kv(tokens)).reshape(Bi, N, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (Bi, H, N, hd)
        attn = None
        if return_attn:
            attn = (qh @ k.transpose(-2, -1) / math.sqrt(hd)).softmax(-1)  # (Bi, H, Q, N)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(qh, k, v)  # (Bi, H, Q, hd)
        x = x.transpose(1, 2).reshape(Bi, Q, D)
        q = q + self.proj(x)  # (Bi, Q, D), broadcast over images if Bq = 1
        q = q + self.mlp(self.norm_mlp(q))
        return (q, attn) if return_attn else q


class ConditionalEmbedding(nn.Module):
    """c_{i|j}: image i's tokens read by a query made from image j's embedding.

    ``q_0 = W_q z_j``; ``q_l = Layer_l(q_{l-1}, W_t F_i)``; ``c_{i|j} = L2norm(W_o LN(q_L))``.

    Args:
        feat_dim: backbone token width C.
        embedding_dim: embedding size E (of z and c).
        dim: attention width D.
        depth: number of cross-attention layers L.
        num_heads: heads per layer.
        mlp_ratio: MLP hidden size over D.
    """

    def __init__(self, feat_dim: int, embedding_dim: int, dim: int, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: the conditional branch needs at least one "
                             f"cross-attention layer (cross_attention=False turns it off)")
        self.token_proj = nn.Linear(feat_dim, dim)
        self.query_proj = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, embedding_dim)

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Conditional embeddings of each image given each query.

        Args:
            tokens: (Bi, N, C) patch tokens of the images i.
            queries: (Q, E) embeddings z_j shared by every image i, or (Bi, Q, E) per image.
            return_attn: also return each layer's attention probabilities (Bi, H, Q, N).

        Returns:
            (Bi, Q, E) fp32, L2-normalised: ``out[i, j] = c_{i|j}``.
        """
        kv = self.token_proj(tokens)  # (Bi, N, D)
        q = self.query_proj(queries)  # (Q, D) or (Bi, Q, D)
        if q.ndim == 2:
            q = q.unsqueeze(0)  # (1, Q, D): the same B_j queries for every image i
        attns = []
        for layer in self.layers:
            if return_attn:
                q, a = layer(q, kv, return_attn=True)
                attns.append(a)
            else:
                q = layer(q, kv)
        c = F.normalize(self.out_proj(self.norm(q)).float(), dim=-1)  # (Bi, Q, E)
        return (c, attns) if return_attn else c


class CrossImageDML(nn.Module):
    """A timm backbone -> pool -> linear -> L2 embedding, trained with cross-image attention.

    ``model(images)`` -> ``{"embedding": z}`` (B, E). ``model(images, targets=y)`` in training
    mode adds ``"losses"`` ``{"dml": loss(z, y), "cond": cond_weight * cond_loss(S, y)}`` and
    ``"logs"`` (raw values, mean positive / negative conditional similarity).

    Args:
        backbone: timm architecture (``resnet50``, ``vit_small_patch16_224`` ...).
        embedding_dim: embedding size E.
        cross_attention: build and train the conditional branch; False is the baseline.
        depth: number of cross-attention layers L.
        num_heads: heads per cross-attention layer.
        attn_dim: cross-attention width D (default: ``embedding_dim``).
        mlp_ratio: cross-attention MLP hidden size over D.
        asymmetric: s_ij = cos(c_{i|j}, z_j) instead of cos(c_{i|j}, c_{j|i}).
        pool: ``avg``, ``max``, ``avgmax`` (avg + max) or ``token`` (ViT CLS token); default
            ``token`` for ViTs, ``avg`` otherwise.
        loss: loss on z, any of :data:`finegrain.losses.dml.DML_LOSSES`.
        loss_kwargs: its hyper-parameters (and ``distance``).
        cond_loss: pair-based loss on S, one of :data:`finegrain.losses.dml.PAIR_LOSSES`.
        cond_loss_kwargs: its hyper-parameters (and ``distance``).
        cond_weight: lambda, the weight of the conditional loss.
        miner: optional pml miner (``multi_similarity``) for the pair losses, each mining its
            own matrix (z's cosines, S); proxy losses on z take none.
        miner_kwargs: the miner's hyper-parameters (``epsilon``).
        num_classes: number of training classes (proxy losses only).
        img_size: input size for ViTs (position embeddings); ignored by CNNs.
        freeze_bn: keep the backbone's BatchNorm layers in eval mode with frozen affine
            parameters (no-op without BatchNorm).
        drop_path_rate: stochastic depth of the backbone.
        backbone_kwargs: extra ``timm.create_model`` arguments (tiny test configs).
    """

    def __init__(self, backbone: str = "resnet50", embedding_dim: int = 512,
                 cross_attention: bool = True, depth: int = 2, num_heads: int = 8,
                 attn_dim: int | None = None, mlp_ratio: float = 4.0, asymmetric: bool = False,
                 pool: str | None = None, loss: str = "multi_similarity",
                 loss_kwargs: dict | None = None, cond_loss: str = "multi_similarity",
                 cond_loss_kwargs: dict | None = None, cond_weight: float = 1.0,
                 miner: str | None = None, miner_kwargs: dict | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 freeze_bn: bool = True, drop_path_rate: float = 0.0,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        kw = dict(backbone_kwargs or {})
        if img_size is not None and ("vit" in backbone or "deit" in backbone):
            kw["img_size"] = img_size
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0,
                                          drop_path_rate=drop_path_rate, **kw)
        self.num_prefix_tokens = getattr(self.backbone, "num_prefix_tokens", 0)
        self.is_vit = hasattr(self.backbone, "patch_embed")
        pool = pool or ("token" if self.is_vit else "avg")
        if pool not in POOLS or (pool == "token" and not self.is_vit):
            raise ValueError(f"pool={pool!r}: choose one of avg, max, avgmax"
                             f"{', token' if self.is_vit else ''}")
        self.pool = pool
        feat_dim = self.backbone.num_features  # C
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(feat_dim, embedding_dim)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)

        self.loss = build_embedding_loss(loss, embedding_dim, num_classes,
                                         miner=miner if loss in PAIR_LOSSES else None,
                                         miner_kwargs=miner_kwargs, **(loss_kwargs or {}))
        self.asymmetric = asymmetric
        self.cond_weight = cond_weight
        self.cross = None
        self.cond_loss = None
        if cross_attention:
            self.cross = ConditionalEmbedding(feat_dim, embedding_dim, attn_dim or embedding_dim,
                                              depth, num_heads, mlp_ratio)
            self.cond_loss = build_similarity_loss(cond_loss, miner=miner,
                                                   miner_kwargs=miner_kwargs,
                                                   **(cond_loss_kwargs or {}))

    def train(self, mode: bool = True) -> CrossImageDML:
        """Set the mode; with ``freeze_bn`` the backbone's BatchNorm layers stay in eval."""
        super().train(mode)
        if self.freeze_bn and mode:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Backbone position embeddings and class tokens (the engine adds 1-d params)."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in fn()} if callable(fn) else set()

    # -- unconditional path (train and test) ---------------------------------------------------
    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Backbone tokens (B, P+N, C) and the patch grid (h, w)."""
        x = self.backbone.forward_features(images)
        if x.ndim == 4:  # CNN: (B, C, h, w)
            B, C, h, w = x.shape
            return x.flatten(2).transpose(1, 2), (h, w)  # (B, h*w, C)
        ph, pw = self.backbone.patch_embed.patch_size
        return x, (images.shape[-2] // ph, images.shape[-1] // pw)  # (B, P+N, C)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """F: (B, P+N, C) backbone tokens, P prefix tokens (ViT CLS; 0 for CNNs)."""
        return self._tokens(images)[0]

    def patch_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """The N patch tokens (B, N, C) the cross-attention reads."""
        return feats[:, self.num_prefix_tokens:]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """z = L2norm(Linear(pool(F))): (B, P+N, C) -> (B, E), fp32."""
        patches = self.patch_tokens(feats)  # (B, N, C)
        if self.pool == "token":
            pooled = feats[:, 0]
        elif self.pool == "avg":
            pooled = patches.mean(1)
        elif self.pool == "max":
            pooled = patches.amax(1)
        else:  # avgmax
            pooled = patches.mean(1) + patches.amax(1)
        return F.normalize(self.head(pooled).float(), dim=-1)

    # -- conditional path (training only) ------------------------------------------------------
    def conditional_embeddings(self, feats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """All pairs at once: (B, P+N, C) tokens, (B, E) embeddings -> c (B_i, B_j, E),
        ``c[i, j] = c_{i|j}`` (one attention call per layer, query length B_j)."""
        return self.cross(self.patch_tokens(feats), z)

    def pair_similarity(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """S (B, B) from c (B_i, B_j, E): ``s_ij = <c_{i|j}, c_{j|i}>`` (symmetric) or
        ``<c_{i|j}, z_j>`` (``asymmetric``); all unit vectors, so cosines. fp32."""
        c = c.float()
        if self.asymmetric:
            return (c * z.float().unsqueeze(0)).sum(-1)  # (B_i, B_j)
        return (c * c.transpose(0, 1)).sum(-1)  # (B_i, B_j), exactly symmetric

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        feats = self.forward_features(images)  # (B, P+N, C)
        z = self.forward_head(feats)  # (B, E)
        out = {"embedding": z}
        if targets is None:
            return out
        sim = None
        if self.training and self.cross is not None:
            c = self.conditional_embeddings(feats, z)  # (B_i, B_j, E), attention under autocast
            sim = self.pair_similarity(c, z)  # (B, B) fp32
        with _no_autocast(images.device.type):
            dml = self.loss(z, targets)
            losses = {"dml": dml}
            logs = {"dml": dml.detach()}
            if sim is not None:
                cond = self.cond_loss(sim, targets)
                losses["cond"] = self.cond_weight * cond
                logs["cond"] = cond.detach()
                logs.update(_similarity_logs(sim.detach(), targets))
        out["losses"] = losses
        out["logs"] = logs
        return out

    # -- pictures and re-ranking ---------------------------------------------------------------
    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Maps (B, h, w) in [0, 1] on the token grid.

        ``activation``: token feature norms. With the conditional branch and no ``pair``:
        ``self_attention``, where image b's own embedding looks in image b (c_{b|b}). With
        ``pair`` (B, 3, H', W'): ``cross_attention`` = where ``images[b]`` is looked at when
        conditioned on ``pair[b]`` (pair b's query over image b's tokens, last layer, mean over
        heads), ``cross_attention_layer{l}`` for each layer, and ``cross_attention_reverse``
        (B, h', w'): image b's query over pair b's tokens.
        """
        feats, (h, w) = self._tokens(images)
        patches = self.patch_tokens(feats)  # (B, N, C)
        B = images.shape[0]
        maps = {"activation": _unit(patches.float().norm(dim=-1)).reshape(B, h, w)}
        if self.cross is None:
            return maps
        z = self.forward_head(feats)  # (B, E)
        if pair is None:
            _, attns = self.cross(patches, z.unsqueeze(1), return_attn=True)
            maps["self_attention"] = _unit(attns[-1].float().mean(1)[:, 0]).reshape(B, h, w)
            return maps
        feats_p, (hp, wp) = self._tokens(pair)
        z_p = self.forward_head(feats_p)  # (B, E)
        _, attns = self.cross(patches, z_p.unsqueeze(1), return_attn=True)  # c_{b|pair b}
        for layer, a in enumerate(attns):  # (B, H, 1, N)
            maps[f"cross_attention_layer{layer}"] = _unit(a.float().mean(1)[:, 0]).reshape(B, h, w)
        maps["cross_attention"] = maps[f"cross_attention_layer{len(attns) - 1}"]
        _, attns_r = self.cross(self.patch_tokens(feats_p), z.unsqueeze(1), return_attn=True)
        reverse = _unit(attns_r[-1].float().mean(1)[:, 0])  # (B, N')
        maps["cross_attention_reverse"] = reverse.reshape(B, hp, wp)
        return maps

    @torch.no_grad()
    def conditional_similarity(self, q_feats: torch.Tensor, n_feats: torch.Tensor
                               ) -> torch.Tensor:
        """Conditional similarity of each query with each of its neighbours.

        Args:
            q_feats: (Q, P+N, C) query tokens (:meth:`forward_features`).
            n_feats: (Q, k, P+N, C) tokens of each query's k neighbours.

        Returns:
            (Q, k): ``s = cos(c_{q|n}, c_{n|q})`` (or ``cos(c_{q|n}, z_n)`` if asymmetric).
        """
        if self.cross is None:
            raise ValueError("conditional similarity needs the cross-attention branch "
                             "(cross_attention=True)")
        Q, k = n_feats.shape[:2]
        zq = self.forward_head(q_feats)  # (Q, E)
        n_flat = n_feats.flatten(0, 1)  # (Q*k, P+N, C)
        zn = self.forward_head(n_flat).reshape(Q, k, -1)  # (Q, k, E)
        c_qn = self.cross(self.patch_tokens(q_feats), zn)  # (Q, k, E): c_{q|n}
        if self.asymmetric:
            return (c_qn * zn).sum(-1)
        zq_rep = zq.repeat_interleave(k, dim=0).unsqueeze(1)  # (Q*k, 1, E)
        c_nq = self.cross(self.patch_tokens(n_flat), zq_rep).reshape(Q, k, -1)  # c_{n|q}
        return (c_qn * c_nq).sum(-1)


def _no_autocast(device_type: str):
    """Autocast off for the losses (a no-op where the device has no autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each row of (B, N) to [0, 1]."""
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _similarity_logs(sim: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean conditional similarity of positive (same class, i != j) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=sim.device)
    logs = {}
    for name, mask in (("cond_sim_pos", same & ~eye), ("cond_sim_neg", ~same)):
        if mask.any():
            logs[name] = sim[mask].mean()
    return logs


@torch.no_grad()
def conditional_rerank(model: CrossImageDML, q_tokens: torch.Tensor, db_tokens: torch.Tensor,
                       topk_ids: torch.Tensor, mix: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each query's top-k neighbours by their conditional similarity.

    Args:
        model: a trained :class:`CrossImageDML` with its cross-attention branch.
        q_tokens: (Q, P+N, C) query tokens from ``model.forward_features``.
        db_tokens: (M, P+N, C) database tokens (a memory-mapped tensor is fine: only the
            top-k rows are read).
        topk_ids: (Q, k) database indices of each query's neighbours by z.
        mix: score = ``mix * s_cond + (1 - mix) * cos(z_q, z_n)``.

    Returns:
        ``(scores, ids)``, both (Q, k), sorted by decreasing score.
    """
    Q, k = topk_ids.shape
    n_feats = db_tokens[topk_ids.reshape(-1).cpu()].to(q_tokens.device)
    n_feats = n_feats.reshape(Q, k, *db_tokens.shape[1:])  # (Q, k, P+N, C)
    scores = model.conditional_similarity(q_tokens, n_feats)  # (Q, k)
    if mix != 1.0:
        zq = model.forward_head(q_tokens)  # (Q, E)
        zn = model.forward_head(n_feats.flatten(0, 1)).reshape(Q, k, -1)  # (Q, k, E)
        scores = mix * scores + (1.0 - mix) * (zn * zq.unsqueeze(1)).sum(-1)
    order = scores.argsort(dim=1, descending=True)
    return scores.gather(1, order), topk_ids.to(order.device).gather(1, order)


def _create_cross_image(backbone: str, **kwargs) -> CrossImageDML:
    return CrossImageDML(backbone=backbone, **kwargs)


@register_model
def cross_image_resnet50(**kwargs) -> CrossImageDML:
    """ResNet-50 (frozen BN), 512-d, the standard DML setting."""
    return _create_cross_image("resnet50", **{"embedding_dim": 512, **kwargs})


@register_model
def cross_image_resnet18(**kwargs) -> CrossImageDML:
    """ResNet-18, 512-d (tests / demo)."""
    return _create_cross_image("resnet18", **{"embedding_dim": 512, **kwargs})


@register_model
def cross_image_vit_small_patch16_224(**kwargs) -> CrossImageDML:
    """ViT-S/16 (DINO weights in the recipes), 384-d, CLS-token embedding."""
    return _create_cross_image("vit_small_patch16_224", **{"embedding_dim": 384, **kwargs})


@register_model
def cross_image_deit_tiny_patch16_224(**kwargs) -> CrossImageDML:
    """DeiT-Ti/16, 192-d (tests / demo)."""
    return _create_cross_image("deit_tiny_patch16_224", **{"embedding_dim": 192, **kwargs})
