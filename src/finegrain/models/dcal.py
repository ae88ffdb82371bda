"""DCAL: Dual Cross-Attention Learning on a plain ViT / DeiT.

Zhu, Ke, Li, Liu, Tian and Shan, "Dual Cross-Attention Learning for Fine-Grained Visual
Categorization and Object Re-Identification", CVPR 2022, arXiv 2205.02151. Equation numbers
below are the paper's; "spec" is ``shared/spec/dcal.md``.

Three branches share one timm ViT:

1. **SA** (Sec. 3.1, Eq. 1): the plain pre-LN backbone, L blocks, class token -> head.
2. **GLCA** (Sec. 3.2, Eqs. 2-4): attention rollout over the SA blocks picks the top-R patches
   the class token attends to; one transformer block with its *own* weights runs the R
   selected tokens as queries (``Q^l``) against keys / values of all N + 1 tokens, then its MLP
   on those R tokens; the GLCA feature is the normed mean of the R outputs, read by its own
   head. The feature is a function of the selection (``glca_selection: random`` is the
   paper's control).
3. **PWCA** (Sec. 3.3, Eq. 5), training only: a second residual stream of image I1 runs
   through the same L blocks (shared weights); in every block its queries attend, under one
   softmax, to the concatenation of its own keys / values and those of a distractor image
   I2 of the same batch (taken from I2's SA pass at that layer). Its loss uses I1's label
   and the SA head.

The losses of the enabled branches are balanced by uncertainty weighting (Eq. 6,
:class:`finegrain.losses.uncertainty.UncertaintyWeighting`). At inference PWCA is gone: FGVC
adds the SA and GLCA class probabilities, Re-ID concatenates the SA and GLCA features
(``sa_only=True``: the SA branch alone, the paper's zero-cost deployment option).

Readings we take where the paper is silent (each one is an argument or a documented choice):

- The GLCA block takes the input of the *last* SA block (the same depth as the last SA
  block), so the rollout spans SA blocks 1..L-1, the blocks that produced that input.
- The GLCA block starts as a copy of the last SA block (made at construction and again in
  :meth:`DCAL.on_pretrained_loaded` after pretrained weights arrive); the GLCA final norm
  starts as a copy of the SA final norm; the GLCA head is new. From then on the weights are
  its own (not shared).
- R = ceil(ratio * N) patches, ratio 10% for FGVC and 30% for Re-ID.
- **The GLCA feature** (spec/dcal.md reads it otherwise; docs/dcal.md). Eq. 4 builds the
  query matrix ``Q^l`` from the R selected tokens only ("the most attentive local
  embeddings"), and Fig. 2 sends GLCA's output to its own classifier. An earlier reading added
  the class token as an extra query and read only its row: a class-token query attends to all
  keys / values and the MLP is per token, so that feature was *independent of the selection*
  (rollout and random selection gave bit-identical outputs; the paper's ablation, random 82.6
  vs rollout 83.1 on CUB, shows the selection matters). Here the queries are exactly the R
  selected tokens and the feature is ``LN(mean_r z_r)`` over their R outputs (timm's
  ``fc_norm`` over an average pool; the GLCA LayerNorm starts as a copy of the SA final norm).
- The rollout's head-mean attention uses the probabilities before attention dropout; the
  rollout is not differentiated through (the top-R choice is discrete).
- **Deviation: the GLCA feature is not a class token.** The paper's Fig. 2a draws a [CLS]
  among the "Local Q" tokens and Sec. 4.1 (Re-ID) concatenates "the two final class tokens of
  SA and GLCA". Read literally, that class token's query attends to all keys / values and
  the MLP is per token, so its output cannot depend on which R patches were selected
  (changing the selection moves it by exactly 0), while the paper's Table 5 (random 82.6 vs
  rollout 83.1) shows the selection matters. We read the normed mean of the R outputs
  instead; ``glca_feature="class_token"`` is the literal reading, offered for comparison.
- The distractor I2 of each image is drawn from the batch with torch's global RNG: for Re-ID
  an image of another identity (``pwca_partner="other_class"``: the paper draws it "randomly
  from the training set", where a P x K batch would pair an identity with itself 3 / 63 of
  the time); for FGVC a random derangement (a random single cycle: never the image itself;
  ``pwca_partner="any"``); a batch of one pairs the image with itself. Gradients flow into
  I2's keys / values (one joint graph) unless ``detach_pair=True``.
- Re-ID: each branch's loss is CE (label smoothing 0.1) + batch-hard triplet on that branch's
  class-token feature; with ``bnneck`` the triplet sees the feature before the BN, CE the
  one after. The PWCA feature goes through the SA BNNeck with its own batch statistics,
  leaving the running statistics (used at inference) to the SA stream.

Cost choices: attention in SA blocks 1..L-1 is computed explicitly once and used both for
the block output and for the rollout (no second Q K^T); every other attention (the last SA
block, GLCA, PWCA, the baseline) is fused ``scaled_dot_product_attention``. Only the class-token
row of the rollout is needed, so it is computed right to left as ``e_0^T S_{L-1} ... S_1``
(O(L N^2) instead of O(L N^3)). The SA and PWCA streams run through each block's shared
linear layers as one batch of 2B.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.triplet import batch_hard_triplet
from ..losses.uncertainty import UncertaintyWeighting
from .backbone import create_backbone
from .explain import AttentionMap
from .registry import FinegrainModel, build, register_model
from .tasks import task_name
from ..choices import check_choice

DCALTask = Literal["classification", "reid", "fgvc"]
"""``task`` of :class:`DCAL` (``fgvc``: the older name of ``classification``)."""

GlcaSelection = Literal["rollout", "random"]
"""``glca_selection``: GLCA's query selection."""

GlcaFeature = Literal["local_mean", "class_token"]
"""``glca_feature``: what GLCA's classifier reads (see the module docstring)."""

PwcaPartner = Literal["other_class", "any"]
"""``pwca_partner``: where PWCA's distractor image comes from."""

__all__ = ["DCAL", "GlobalLocalCrossAttention", "attention_rollout_class_row",
           "num_selected", "pwca_attention", "random_derangement", "select_top_patches"]


# --------------------------------------------------------------------------------------------
# Attention pieces on a timm ``Attention`` module's weights
# --------------------------------------------------------------------------------------------

def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, A) -> (B, H, T, D) for ``attn``'s heads."""
    B, T, _ = x.shape
    return x.reshape(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)


def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values of the (already LayerNormed) tokens ``h`` (B, T, C) with a timm
    ``Attention``'s ``qkv`` projection and its ``q_norm`` / ``k_norm``; each (B, H, T, D)."""
    B, T, _ = h.shape
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
    return attn.q_norm(q), attn.k_norm(k), v


def _out(attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """Merge heads and project: (B, H, T, D) -> (B, T, C) (timm ``Attention``'s tail)."""
    B, H, T, D = o.shape
    o = o.transpose(1, 2).reshape(B, T, H * D)
    return attn.proj_drop(attn.proj(attn.norm(o)))


def _attention_probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d))`` (Eq. 1), (B, H, Tq, Tk); softmax in fp32."""
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).to(q.dtype)


def _sdpa(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused ``softmax(Q K^T / sqrt(d)) V`` with the module's attention dropout."""
    p = attn.attn_drop.p if attn.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p)


def _check_block(blk: nn.Module) -> None:
    attn = getattr(blk, "attn", None)
    if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
        raise ValueError(f"DCAL needs timm pre-LN ViT blocks with a fused qkv attention, got "
                         f"{type(blk).__name__} / {type(attn).__name__}")


# --------------------------------------------------------------------------------------------
# GLCA, Sec. 3.2: rollout (Eqs. 2-3), top-R selection, global-local cross-attention (Eq. 4)
# --------------------------------------------------------------------------------------------

def attention_rollout_class_row(attn_means: list[torch.Tensor]) -> torch.Tensor:
    """Class-token row of the accumulated attention ``S_hat = S_bar_k ... S_bar_1`` (Eq. 3).

    ``S_bar_l = 0.5 * S_l + 0.5 * I`` with rows re-normalised (Eq. 2; the residual connection),
    ``S_l`` the head-averaged attention of block l. Only row 0 is needed, so it is computed
    right to left, ``e_0^T S_bar_k ... S_bar_1``, one vector-matrix product per block, and
    ``S_bar_l`` is never built: with ``z`` its row sums, ``r^T diag(z)^-1 (0.5 S + 0.5 I) =
    0.5 u^T S + 0.5 u^T`` for ``u = r / z``.

    Args:
        attn_means: ``[S_1, ..., S_k]``, each (B, T, T) head-averaged attention probabilities,
            in block order.

    Returns:
        (B, T) row 0 of ``S_hat`` in fp32 (class token first, then the N patches).
    """
    B, T, _ = attn_means[0].shape
    row = torch.zeros(B, T, device=attn_means[0].device)
    row[:, 0] = 1.0  # e_0^T
    for s in reversed(attn_means):
        s = s.float()
        z = 0.5 * s.sum(dim=-1) + 0.5  # (B, T) row sums of 0.5 S + 0.5 I
        u = row / z
        row = 0.5 * (u.unsqueeze(1) @ s).squeeze(1) + 0.5 * u  # (B, 1, T) @ (B, T, T)
    return row


def num_selected(num_patches: int, ratio: float) -> int:
    """R = ceil(ratio * N), at least 1 and at most N (10% FGVC, 30% Re-ID)."""
    return min(num_patches, max(1, math.ceil(round(ratio * num_patches, 6))))


def select_top_patches(rollout_row: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (B, R) of the R patches with the highest class-token rollout, best first.

    Args:
        rollout_row: (B, N + 1) from :func:`attention_rollout_class_row` (class token first;
            its own entry is left out).
        ratio: fraction of the N patches to keep, rounded up.

    Returns:
        (B, R) patch indices in ``[0, N)`` (add 1 for token positions).
    """
    patches = rollout_row[:, 1:]  # (B, N)
    return patches.topk(num_selected(patches.shape[1], ratio), dim=1).indices


def random_patches(batch: int, num_patches: int, ratio: float,
                   device: torch.device | None = None) -> torch.Tensor:
    """(B, R) patch indices drawn uniformly without replacement, independently per image, from
    torch's global RNG: the paper's random-selection control for GLCA (Table 5)."""
    R = num_selected(num_patches, ratio)
    return torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :R]


class GlobalLocalCrossAttention(nn.Module):
    """The GLCA block (Eq. 4): a full pre-LN transformer block with its own weights whose
    queries are the R selected local tokens and whose keys / values are all N + 1 global
    tokens: ``softmax(Q^l K^g^T / sqrt(d)) V^g``, then proj + residual and the MLP + residual
    on the R local tokens only.

    Args:
        block: a timm ``Block`` to deep-copy (the last SA block); its norm1, attention
            weights (qkv, q_norm / k_norm, proj), layer scales, drop paths, norm2 and MLP are
            used unchanged.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        _check_block(block)
        self.block = copy.deepcopy(block)

    def forward(self, x: torch.Tensor, index: torch.Tensor,
                with_class_token: bool = False) -> torch.Tensor:
        """Run GLCA.

        Args:
            x: (B, N + 1, C) global tokens (input of the last SA block), class token first.
            index: (B, R) selected patch indices in ``[0, N)``.
            with_class_token: add the class token as a first query (the literal reading of
                Fig. 2a, ``glca_feature: class_token``).

        Returns:
            (B, R, C) updated local tokens, in the order of ``index`` ((B, 1 + R, C), class
            token first, ``with_class_token``).
        """
        blk, attn = self.block, self.block.attn
        B, T, C = x.shape
        A = attn.num_heads * attn.head_dim
        pos = index + 1
        if with_class_token:
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        gather = pos.unsqueeze(-1).expand(-1, -1, C)  # (B, R, C) token positions
        h = blk.norm1(x)  # pre-LN of all N+1 tokens: the keys / values see them all
        x_l, h_l = x.gather(1, gather), h.gather(1, gather)  # (B, R, C) local tokens
        w, b = attn.qkv.weight, attn.qkv.bias
        q = _heads(attn, F.linear(h_l, w[:A], None if b is None else b[:A]))  # Q^l (B,H,R,D)
        kv = F.linear(h, w[A:], None if b is None else b[A:])  # (B, T, 2A): K^g, V^g
        k, v = kv.reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)  # (B, H, R, D), (B, H, T, D)
        o = _sdpa(attn, q, k, v)  # Eq. 4, (B, H, R, D)
        x_l = x_l + blk.drop_path1(blk.ls1(_out(attn, o)))
        return x_l + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_l))))


# --------------------------------------------------------------------------------------------
# PWCA, Sec. 3.3 (Eq. 5)
# --------------------------------------------------------------------------------------------

def pwca_attention(attn: nn.Module, q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor,
                   k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """``softmax(Q_1 K_c^T / sqrt(d)) V_c`` with ``K_c = [K_1; K_2]``, ``V_c = [V_1; V_2]``
    (Eq. 5): I1's queries over both images' 2(N+1) tokens under one softmax (fused).

    Args:
        attn: the timm ``Attention`` whose dropout applies.
        q1, k1, v1: (P, H, T, D) of the PWCA stream of I1.
        k2, v2: (P, H, T, D) of the distractor I2 at this layer (from its SA pass).

    Returns:
        (P, H, T, D).
    """
    return _sdpa(attn, q1, torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2))


def random_derangement(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Partner index (n,) with ``partner[i] != i``: a uniformly random single cycle through
    the batch (torch global RNG). ``n == 1`` returns ``[0]`` (nobody else to pair with)."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long, device=device)
    order = torch.randperm(n, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)  # order[i] is paired with order[i + 1]
    return partner


def random_other_class_partner(targets: torch.Tensor) -> torch.Tensor:
    """Partner index (n,): for each image one of the batch's images of *another* class,
    uniformly (torch global RNG); an image whose class fills the batch gets a
    :func:`random_derangement` partner instead. DCAL draws the distractor "randomly from the
    training set" (Sec. 3.3); in a P x K Re-ID batch a partner drawn from the whole batch
    shares the identity (K - 1) / (B - 1) of the time (3 / 63 at 16 x 4), against about one
    in the number of identities from the training set."""
    n = targets.shape[0]
    other = targets[:, None] != targets[None, :]  # (n, n)
    has = other.any(dim=1)
    partner = random_derangement(n, device=targets.device)
    if bool(has.any()):
        drawn = torch.multinomial(other[has].float(), 1).squeeze(1)
        partner[has] = drawn
    return partner


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class DCAL(FinegrainModel):
    """SA + GLCA + PWCA on a timm ViT, following the model output contract.

    ``model(images)`` returns ``"logits"`` (B, num_classes) with ``softmax(logits)`` the mean of
    the SA and GLCA class probabilities (SA alone without GLCA) and, for Re-ID,
    ``"embedding"`` (B, 2C) = L2-normalised concat of the SA and GLCA class features.
    ``model(images, targets=y)`` adds ``"losses"`` (uncertainty-weighted branch terms ``sa`` /
    ``glca`` / ``pwca``; PWCA only in training mode) and ``"logs"`` (raw branch losses, their
    CE / triplet parts for Re-ID, and ``w_<branch>``).

    Args:
        backbone: timm ViT name (``deit_tiny_patch16_224``, ``vit_base_patch16_224``,
            ``vit_base_r50_s16_224`` ...); a class token and pre-LN blocks are required.
        num_classes: classes (FGVC) or training identities (Re-ID).
        img_size: input size, int or (H, W) (448 FGVC, (256, 128) persons); position
            embeddings are sized for it (pretrained ones are resampled on loading).
        task: ``"classification"`` (CE per branch) or ``"reid"`` (CE with label smoothing +
            batch-hard triplet per branch, ``embedding`` returned); ``"fgvc"``, the older name
            of ``"classification"`` (checkpoints before 2026-11-30), is accepted as it.
        top_ratio: fraction R / N of the patches GLCA selects (rounded up); default 0.1 for
            FGVC, 0.3 for Re-ID.
        glca: enable the GLCA branch.
        glca_selection: how GLCA picks its R query patches: ``"rollout"`` (Eqs. 2-3, the
            paper) or ``"random"`` (R patches drawn uniformly per image and forward pass:
            the paper's control, Table 5; its outputs are stochastic at eval too).
        glca_feature: what the GLCA head reads: ``"local_mean"`` (default) the normed mean
            of the R local-query outputs, a function of the selection; ``"class_token"``
            the literal reading of the paper, a class token among the local queries whose
            output is the feature, which no selection can move (a deliberate deviation,
            module docstring).
        pwca_partner: how PWCA draws each image's distractor from the batch:
            ``"other_class"`` (an image of another class; the default for Re-ID, whose
            P x K batches would otherwise pair an identity with itself 3 / 63 of the time)
            or ``"any"`` (any other image; the default for FGVC). None: the task's default.
        sa_only: inference from the SA branch alone (GLCA and the rollout are skipped:
            zero extra cost; the paper's SA-only results). Training is unchanged.
        w_init: initial uncertainty weights ``w_b`` (Eq. 6): one value, or
            ``{"sa": .., "glca": .., "pwca": ..}``. 0 (default) weights every branch 1;
            FairMOT, which the paper follows, starts its two terms at -1.85 / -1.05.
        w_lr: learning rate of the uncertainty weights (None: the engine's head lr).
        pwca: enable the PWCA branch (training only). ``glca=False, pwca=False`` is the
            baseline twin: exactly the plain ViT + head.
        detach_pair: stop the gradient into the distractor's keys / values (ablation).
        bnneck: Re-ID BNNeck (BatchNorm on each class feature before a bias-free head;
            triplet before, CE after); default True for Re-ID, not used for FGVC.
        label_smoothing: CE label smoothing; default 0.1 for Re-ID, 0 for FGVC.
        triplet_margin: margin of the batch-hard triplet loss (Re-ID).
        drop_path_rate: stochastic depth of the backbone (the GLCA block inherits the last
            block's rate).
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size`` ... for tiny test / demo models).
    """

    pairwise_explain = True  # explain(images, pair=...): PWCA attention over the pair
    family = "dcal"
    pretrained_note = ("ImageNet ViT / DeiT weights (e.g. timm/vit_base_patch16_224.orig_in21k, "
                       "timm/deit_tiny_patch16_224.fb_in1k)")
    half_precision_hint = ("DCAL: half precision moved the rollout's near-tied scores, so GLCA "
                           "attends to other top-R patches for some images; --sa-only or "
                           "--dtype float32")

    def __init__(self, backbone: str = "deit_tiny_patch16_224", num_classes: int = 1000,
                 img_size: int | tuple[int, int] | None = None, task: DCALTask = "classification",
                 top_ratio: float | None = None, glca: bool = True, pwca: bool = True,
                 glca_selection: GlcaSelection = "rollout",
                 glca_feature: GlcaFeature = "local_mean",
                 pwca_partner: PwcaPartner | None = None,
                 sa_only: bool = False,
                 w_init: float | dict[str, float] = 0.0, w_lr: float | None = None,
                 detach_pair: bool = False, bnneck: bool | None = None,
                 label_smoothing: float | None = None, triplet_margin: float = 0.3,
                 drop_path_rate: float = 0.1, backbone_kwargs: dict | None = None):
        super().__init__()
        task = task_name(task, get_args(DCALTask), "DCAL")
        kw = {"drop_path_rate": drop_path_rate, **(backbone_kwargs or {})}
        self.backbone, _ = create_backbone(backbone, img_size, **kw)
        bb = self.backbone
        if getattr(bb, "cls_token", None) is None or bb.num_prefix_tokens != 1 \
                or getattr(bb, "global_pool", None) != "token" or not hasattr(bb, "blocks"):
            raise ValueError(f"DCAL needs a timm ViT with one class token and global_pool="
                             f"'token'; {backbone!r} with {kw} is not one")
        for blk in bb.blocks:
            _check_block(blk)
        if glca and len(bb.blocks) < 2:
            raise ValueError("GLCA needs at least 2 SA blocks (the rollout spans blocks "
                             "1..L-1); use depth >= 2")

        self.task = task
        self.num_classes = num_classes
        self.top_ratio = (0.3 if task == "reid" else 0.1) if top_ratio is None else top_ratio
        if not 0.0 < self.top_ratio <= 1.0:
            raise ValueError(f"top_ratio must be in (0, 1], got {self.top_ratio}")
        check_choice("glca_selection", glca_selection, GlcaSelection)
        self.glca, self.pwca, self.detach_pair = glca, pwca, detach_pair
        self.glca_selection, self.sa_only, self.w_lr = glca_selection, sa_only, w_lr
        check_choice("glca_feature", glca_feature, GlcaFeature)
        if pwca_partner is not None:
            check_choice("pwca_partner", pwca_partner, PwcaPartner)
        self.glca_feature = glca_feature
        self.pwca_partner = pwca_partner or ("other_class" if task == "reid" else "any")
        self.use_bnneck = (task == "reid") if bnneck is None else bnneck
        self.label_smoothing = (0.1 if task == "reid" else 0.0) if label_smoothing is None \
            else label_smoothing
        self.triplet_margin = triplet_margin
        dim = bb.num_features

        # SA head (also PWCA's).
        self.bnneck = self._make_bnneck(dim)
        self.head = nn.Linear(dim, num_classes, bias=not self.use_bnneck)
        # GLCA: own block (copy of the last SA block), own final norm, own head.
        if glca:
            self.glca_block = GlobalLocalCrossAttention(bb.blocks[-1])
            self.glca_norm = copy.deepcopy(bb.norm)
            self.glca_bnneck = self._make_bnneck(dim)
            self.glca_head = nn.Linear(dim, num_classes, bias=not self.use_bnneck)
        branches = ["sa"] + (["glca"] if glca else []) + (["pwca"] if pwca else [])
        # Uncertainty weighting (Eq. 6) only balances two or more branches; the baseline
        # twin keeps the plain loss.
        self.uncertainty = UncertaintyWeighting(branches, init=w_init) \
            if len(branches) > 1 else None
        self._glca_in_loaded_state = False
        self.register_load_state_dict_pre_hook(self._note_loaded_keys)

    def _make_bnneck(self, dim: int) -> nn.Module:
        if not self.use_bnneck:
            return nn.Identity()
        bn = nn.BatchNorm1d(dim)
        bn.bias.requires_grad_(False)  # BNNeck convention: no shift before a bias-free head
        return bn

    # ---- weights -----------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Full names exempt from weight decay (timm convention)."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        if self.uncertainty is not None:
            names.add("uncertainty.w")
        return names

    def optim_overrides(self) -> dict[str, dict]:
        """Parameter groups for the engine (``finegrain.engine.module.param_groups``): the
        GLCA block and norm are copies of backbone modules and train with the backbone (not
        under ``head_lr_mult``); the uncertainty weights take ``w_lr`` when set."""
        out: dict[str, dict] = {}
        if self.glca:
            out["glca_block."] = out["glca_norm."] = {"group": "backbone"}
        if self.uncertainty is not None and self.w_lr is not None:
            out["uncertainty."] = {"lr": float(self.w_lr)}
        return out

    def _note_loaded_keys(self, module, state_dict, prefix, *args) -> None:
        # A whole-model load (finegrain checkpoint) carrying GLCA weights must not be
        # overwritten by on_pretrained_loaded; a backbone-only load never reaches this hook.
        self._glca_in_loaded_state = any(k.startswith(prefix + "glca_block.")
                                         for k in state_dict)

    @torch.no_grad()
    def on_pretrained_loaded(self) -> None:
        """Initialise GLCA from the freshly loaded backbone: GLCA block <- last SA block,
        GLCA norm <- SA final norm (copies, not shared). Skipped when the loaded state
        already held GLCA weights (a trained DCAL checkpoint)."""
        if not self.glca:
            return
        if self._glca_in_loaded_state:
            self._glca_in_loaded_state = False
            return
        self.glca_block.block.load_state_dict(self.backbone.blocks[-1].state_dict())
        self.glca_norm.load_state_dict(self.backbone.norm.state_dict())

    def output_keys(self) -> set[str]:
        return {"logits"} | ({"embedding"} if self.task == "reid" else set())

    def loss_names(self) -> set[str]:
        return {"sa"} | ({"glca"} if self.glca else set()) | ({"pwca"} if self.pwca else set())

    def training_only(self) -> tuple[str, ...]:
        return ("uncertainty.",)  # Eq. 6's loss weights

    def learned_scalars(self) -> dict[str, float]:
        """The uncertainty weights ``w_b`` (Eq. 6) and the factor ``exp(-w_b) / 2`` each puts
        on its branch loss."""
        if self.uncertainty is None:
            return {}
        w = {name: float(v) for name, v in self.uncertainty.weights().items()}
        return {**{f"w_{n}": v for n, v in w.items()},
                **{f"loss factor {n}": 0.5 * math.exp(-v) for n, v in w.items()}}

    # ---- features ----------------------------------------------------------------------------

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + position embedding (timm's own), (B, N+1, C)."""
        bb = self.backbone
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))

    def _block(self, blk: nn.Module, xx: torch.Tensor, B: int,
               pairs: tuple[torch.Tensor, torch.Tensor] | None, rollout: bool,
               pair_probs: bool = False):
        """One SA block on the SA stream and, sharing its weights, the PWCA stream.

        Args:
            blk: a timm ``Block``.
            xx: (B + P, T, C): rows ``[:B]`` the SA stream, rows ``[B:]`` the PWCA stream
                (P = 0 without PWCA); T = N + 1 tokens, class token first. The two streams
                go through the shared linear layers as one batch.
            B: number of SA rows.
            pairs: (i1, i2) each (P,): PWCA row ``j`` is image ``i1[j]`` with distractor
                ``i2[j]`` (indices into the SA rows).
            rollout: compute the SA attention explicitly and return its head mean.
            pair_probs: return the PWCA probabilities (P, H, T, 2T) (explain only).

        Returns:
            ``(xx, head-mean SA attention (B, T, T) or None, PWCA probs or None)``.
        """
        attn = blk.attn
        P = xx.shape[0] - B
        q, k, v = _qkv(attn, blk.norm1(xx))  # each (B + P, H, T, D)
        (q, q1), (k, k1), (v, v1) = (t.split([B, P]) for t in (q, k, v))
        s_mean = p_probs = None
        if rollout:  # Eq. 1 explicitly: its probabilities feed the rollout (Eq. 2)
            a = _attention_probs(attn, q, k)  # (B, H, T, T)
            s_mean = a.detach().float().mean(dim=1)  # (B, T, T) head mean S_l
            o = attn.attn_drop(a) @ v
        else:
            o = _sdpa(attn, q, k, v)  # (B, H, T, D)
        if P:
            k2, v2 = k[pairs[1]], v[pairs[1]]  # I2's keys / values at this layer, its SA pass
            if self.detach_pair:
                k2, v2 = k2.detach(), v2.detach()
            if pair_probs:
                kc, vc = torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2)
                p_probs = _attention_probs(attn, q1, kc)  # (P, H, T, 2T), Eq. 5
                o_p = p_probs @ vc
            else:
                o_p = pwca_attention(attn, q1, k1, v1, k2, v2)  # (P, H, T, D), Eq. 5
            o = torch.cat([o, o_p])  # (B + P, H, T, D)
        xx = xx + blk.drop_path1(blk.ls1(_out(attn, o)))
        xx = xx + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xx))))
        return xx, s_mean, p_probs

    def forward_features(self, images: torch.Tensor,
                         pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                         rollout: bool | None = None, pair_probs: bool = False) -> dict:
        """Run the branches; returns their class-token features and what GLCA selected.

        Args:
            images: (B, 3, H, W).
            pairs: PWCA pairs ``(i1, i2)``, each (P,) indices into the batch: the PWCA
                stream of image ``i1[j]`` attends to distractor ``i2[j]``. None: no PWCA.
            rollout: compute the rollout (default: when GLCA runs and selects by rollout).
            pair_probs: also return the last block's PWCA probabilities (explain).

        Returns:
            ``"sa"`` (B, C); with GLCA ``"glca"`` (B, C) (normed mean of the R local
            outputs) and ``"selected"`` (B, R) patch indices; with the rollout ``"rollout"``
            (B, N+1) (class-token row of S_hat); with pairs ``"pwca"`` (P, C) (and
            ``"pair_probs"`` (P, H, T, 2T)).
        """
        run_glca = self.glca and not (self.sa_only and not self.training)
        if rollout is None:
            rollout = run_glca and self.glca_selection == "rollout"
        bb = self.backbone
        if rollout and len(bb.blocks) < 2:
            raise ValueError("the rollout spans blocks 1..L-1: it needs depth >= 2")
        x = self._embed(images)  # (B, N+1, C)
        B = x.shape[0]
        # The PWCA stream starts from I1's embedded tokens and runs on its own from there.
        xx = torch.cat([x, x[pairs[0]]]) if pairs is not None else x  # (B + P, N+1, C)
        L = len(bb.blocks)
        attn_means, probs, x_last_in = [], None, x
        for l, blk in enumerate(bb.blocks):
            if l == L - 1:
                x_last_in = xx[:B]  # GLCA takes the input of the last SA block
            xx, s_mean, probs = self._block(blk, xx, B, pairs, rollout and l < L - 1,
                                            pair_probs and l == L - 1)
            if s_mean is not None:
                attn_means.append(s_mean)
        x, x_p = xx.split([B, xx.shape[0] - B])  # SA stream, PWCA stream
        out = {"sa": bb.forward_head(bb.norm(x), pre_logits=True)}
        if rollout:
            with torch.no_grad():
                row = attention_rollout_class_row(attn_means)  # Eq. 3, (B, N+1)
            out["rollout"] = row
        if run_glca:
            if self.glca_selection == "rollout":
                out["selected"] = select_top_patches(out["rollout"], self.top_ratio)  # (B, R)
            else:  # the paper's control: R patches uniformly at random
                out["selected"] = random_patches(B, x.shape[1] - 1, self.top_ratio, x.device)
            literal = self.glca_feature == "class_token"
            x_l = self.glca_block(x_last_in, out["selected"], literal)  # Eq. 4, (B, R, C)
            # LN(mean_r z_r); the literal reading: LN of the class-token query's output
            out["glca"] = self.glca_norm(x_l[:, 0] if literal else x_l.mean(dim=1))
        if pairs is not None:
            out["pwca"] = bb.forward_head(bb.norm(x_p), pre_logits=True)
            if pair_probs:
                out["pair_probs"] = probs
        return out

    # ---- heads, losses, output contract ------------------------------------------------------

    def _neck(self, bn: nn.Module, f: torch.Tensor, own_stats: bool = False) -> torch.Tensor:
        """BNNeck; ``own_stats``: normalise with this batch's statistics and leave the running
        ones alone (the PWCA stream, absent at inference)."""
        if not self.use_bnneck:
            return f
        if own_stats and self.training:
            return F.batch_norm(f, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        return bn(f)

    def _branch_loss(self, feat: torch.Tensor, logits: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """FGVC: CE. Re-ID: CE (label smoothing) + batch-hard triplet on the pre-BN feature."""
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.task != "reid":
            return ce, {}
        tri = batch_hard_triplet(feat.float(), targets, self.triplet_margin)
        return ce + tri, {"ce": ce.detach(), "triplet": tri.detach()}

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        B = images.shape[0]
        pairs = None
        if self.pwca and self.training and targets is not None:
            partner = random_other_class_partner(targets) \
                if self.pwca_partner == "other_class" else \
                random_derangement(B, device=images.device)
            pairs = (torch.arange(B, device=images.device), partner)
        f = self.forward_features(images, pairs=pairs)
        neck = {"sa": self._neck(self.bnneck, f["sa"])}
        logits = {"sa": self.head(neck["sa"])}
        if "glca" in f:
            neck["glca"] = self._neck(self.glca_bnneck, f["glca"])
            logits["glca"] = self.glca_head(neck["glca"])
            # Inference: add the SA and GLCA class probabilities; log of their mean.
            combined = torch.logaddexp(F.log_softmax(logits["sa"].float(), dim=-1),
                                       F.log_softmax(logits["glca"].float(), dim=-1)) \
                - math.log(2.0)
        else:
            combined = logits["sa"]
        out = {"logits": combined}
        if self.task == "reid":
            desc = torch.cat([neck["sa"], neck["glca"]], dim=-1) if "glca" in f else neck["sa"]
            out["embedding"] = F.normalize(desc.float(), dim=-1)
        if targets is None:
            return out
        feats = {"sa": f["sa"]}
        if "glca" in f:
            feats["glca"] = f["glca"]
        if "pwca" in f:  # PWCA: I1's label through the SA head
            feats["pwca"] = f["pwca"]
            logits["pwca"] = self.head(self._neck(self.bnneck, f["pwca"], own_stats=True))
        raw, logs = {}, {}
        for name in feats:
            raw[name], parts = self._branch_loss(feats[name], logits[name], targets)
            logs[name] = raw[name].detach()
            logs.update({f"{name}_{k}": v for k, v in parts.items()})
        if self.uncertainty is not None:
            losses = self.uncertainty(raw)  # Eq. 6: {b: 0.5 (exp(-w_b) L_b + w_b)}
            logs.update({f"w_{k}": v for k, v in self.uncertainty.weights().items()})
        else:
            losses = raw
        out["losses"] = losses
        out["logs"] = logs
        return out

    # ---- pictures ----------------------------------------------------------------------------

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        pe = self.backbone.patch_embed
        if getattr(pe, "dynamic_img_size", False):
            return tuple(pe.dynamic_feat_size(tuple(images.shape[-2:])))
        return tuple(pe.grid_size)

    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None
                ) -> list[AttentionMap]:
        """Raw maps (B, h, w) over the patch grid.

        Args:
            images: (B, 3, H, W) in the model's input normalisation.
            pair: optional (B, 3, H, W) distractors: image ``b`` is paired with ``pair[b]``.

        Returns:
            ``rollout``: class-token rollout over the patches (blocks 1..L-1, Eq. 3);
            ``glca_selected`` (GLCA on): 1 on the R selected patches, 0 elsewhere; with
            ``pair``: ``pair_attention`` (``image="pair"``, it lies over ``pair``): the
            head-mean attention of I1's class token over I2's patch tokens in the last PWCA
            block (the I2 part of the concatenated softmax).
        """
        was_training = self.training
        self.eval()
        try:
            B = images.shape[0]
            h, w = self._grid(images)
            pairs = None
            if pair is not None:
                if pair.shape != images.shape:
                    raise ValueError(f"pair must have the images' shape {tuple(images.shape)}, "
                                     f"got {tuple(pair.shape)}")
                images = torch.cat([images, pair])
                idx = torch.arange(B, device=images.device)
                pairs = (idx, idx + B)
            f = self.forward_features(images, pairs=pairs, rollout=True,
                                      pair_probs=pair is not None)
            maps = [AttentionMap("rollout", f["rollout"][:B, 1:].float().reshape(B, h, w))]
            if "selected" in f:
                sel = f["selected"][:B]  # (B, R)
                mask = torch.zeros(B, h * w, device=images.device)
                maps.append(AttentionMap("glca_selected",
                                         mask.scatter_(1, sel, 1.0).reshape(B, h, w)))
            if pair is not None:
                p = f["pair_probs"].float().mean(dim=1)  # (B, T, 2T) head mean
                T = p.shape[1]
                on_i2 = p[:, 0, T + 1:]  # class token of I1 -> patches of I2, (B, N)
                maps.append(AttentionMap("pair_attention", on_i2.reshape(B, h, w), "pair"))
            return maps
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------------------------
# Registry: dcal_<timm name>
# --------------------------------------------------------------------------------------------

def _create_dcal(backbone: str, **kwargs) -> DCAL:
    return build(DCAL, backbone=backbone, **kwargs)


@register_model
def dcal_deit_tiny_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("deit_tiny_patch16_224", **kwargs)


@register_model
def dcal_deit_small_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("deit_small_patch16_224", **kwargs)


@register_model
def dcal_deit_base_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("deit_base_patch16_224", **kwargs)


@register_model
def dcal_vit_tiny_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("vit_tiny_patch16_224", **kwargs)


@register_model
def dcal_vit_small_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("vit_small_patch16_224", **kwargs)


@register_model
def dcal_vit_base_patch16_224(**kwargs) -> DCAL:
    return _create_dcal("vit_base_patch16_224", **kwargs)


@register_model
def dcal_vit_base_r50_s16_224(**kwargs) -> DCAL:
    """R50+ViT-B/16 hybrid (ResNet-50 stem + ViT-B, stride 16)."""
    return _create_dcal("vit_base_r50_s16_224", **kwargs)


@register_model
def dcal_vit_tiny_r_s16_p8_224(**kwargs) -> DCAL:
    """R+ViT-Ti hybrid (ResNet stem + ViT-Ti); the demo's small DCAL."""
    return _create_dcal("vit_tiny_r_s16_p8_224", **kwargs)
