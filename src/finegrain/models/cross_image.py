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
- c_{i|j} = CrossAttn(query = projected z_j, keys/values = projected F_i), a hierarchy of L
  pre-LN cross-attention layers: :class:`ConditionalEmbedding` of :class:`CrossAttentionLayer`;
  ``hierarchy="stack"`` (q^l_{i|j} = Layer_l(q^{l-1}_{i|j}, T_i)) or ``"mutual"``
  (q^l_{i|j} = Layer_l(q^{l-1}_{j|i}, T_i): the partner's previous level is the query);
- every pair (i, j) of the batch at once: one attention call per layer, image i as the SDPA
  batch and the B queries z_j as its query sequence, so c is (B_i, B_j, E) with
  ``c[i, j] = c_{i|j}``; ``mutual`` transposes the (B_i, B_j) grid between layers; cost B^2
  queries over N tokens (:meth:`ConditionalEmbedding.forward`); given pairs (re-ranking,
  pictures): :meth:`ConditionalEmbedding.pairs`;
- s_ij = cos(c_{i|j}, c_{j|i}) (symmetric), or ``asymmetric=True``: s_ij = cos(c_{i|j}, z_j):
  :meth:`CrossImageDML.pair_similarity`; the distance-based ``cond_loss`` (contrastive,
  triplet, margin) read d_ij = ||c_{i|j} - c_{j|i}|| from the vectors
  (:meth:`CrossImageDML.pair_distance`), exact where sqrt(2 - 2 s_ij) in fp32 is not;
- loss = ``loss``(z, y) + lambda * ``cond_loss``(S, y): :meth:`CrossImageDML.forward`, losses
  from :mod:`finegrain.losses.dml` (pytorch-metric-learning; ``cond_loss`` reads S through a
  precomputed-similarity distance);
- test time uses z only: ``forward`` in eval mode or without targets never calls the
  cross-attention; ``cross_attention=False`` builds none of it (the baseline).

Readings chosen where the paper is silent (all configurable):

1. Query init: q_0 = W_q z_j, the *normalised* embedding z_j projected to the attention width
   D; gradients flow into z_j through the query too.
2. Keys / values: W_t F_i (one linear token projection C -> D shared by all layers), each layer
   LayerNorms them itself; no position embedding (ResNet tokens carry none; ViT tokens already
   hold theirs). Every layer attends to all N tokens of image i.
3. Layer: ``q = q + Proj(MHA(LN(q), LN(kv)))``, ``q = q + MLP(LN(q))`` (GELU MLP, ratio 4);
   output ``c = L2norm(W_o LN(q))`` in the embedding space (E). The first layer's queries are
   the same B vectors for every image i, so its LN and query projection run on B vectors,
   not B^2 (exact). ``query_residual=False`` drops the first layer's query residual (then
   c_{i|j} does not carry W_q z_j itself). Width D = ``attn_dim``, default min(E, 256).
4. Pooling: ``avg`` for CNNs; ``token`` (the CLS token after the final norm) for ViTs, as in
   DINO / Hyp-ViT DML; ``max`` and ``avgmax`` (avg + max) are options.
5. The diagonal s_ii is computed but never used (pml losses skip i = i pairs).
6. Losses and similarities in fp32 (autocast off); attention runs in the autocast dtype.
7. In eval mode ``model(images, targets=y)`` returns the z loss only (``"dml"``): the
   conditional term is a training signal.
8. Frozen BatchNorm (``freeze_bn``, default on): backbone BN layers stay in eval mode and their
   affine parameters are frozen, as in the standard DML pipeline.
9. Hierarchy (the abstract's "hierarchy of conditional embeddings that gradually incorporates
   information about the tuple"): ``stack`` is the default: it is the spec's first reading,
   what checkpoints made before the option computed, and costs the same as ``mutual``; no
   result here favours either (no real data), so ``mutual`` stays an option to compare.

Optional conditional re-ranking (not in the paper's test protocol, off by default):
:func:`conditional_rerank` re-orders each query's top-k neighbours by the conditional
similarity of the pair.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ..choices import check_choice, refusal
from ..errors import InputError
from ..losses.dml import (DML_LOSSES, MINERS, PAIR_LOSSES, build_embedding_loss,
                          build_similarity_loss)
from .backbone import create_backbone
from .explain import AttentionMap, check_pair
from .registry import FinegrainModel, build, register_model

__all__ = ["Pool", "POOLS", "Hierarchy", "HIERARCHIES", "DMLLoss", "PairLoss", "Miner",
           "DEFAULT_MAX_ATTN_DIM", "CrossAttentionLayer", "ConditionalEmbedding",
           "CrossImageDML", "conditional_rerank", "cross_image_resnet50",
           "cross_image_resnet18", "cross_image_vit_small_patch16_224",
           "cross_image_deit_tiny_patch16_224"]

Pool = Literal["avg", "max", "avgmax", "token"]
"""``pool``: how z pools the backbone tokens (``token``: ViTs only)."""

POOLS = get_args(Pool)


Hierarchy = Literal["stack", "mutual"]
"""``hierarchy``: what the deeper cross-attention layers read."""

HIERARCHIES = get_args(Hierarchy)

DMLLoss = Literal[DML_LOSSES]
"""``loss``: :data:`finegrain.losses.dml.DML_LOSSES`."""

PairLoss = Literal[PAIR_LOSSES]
"""``cond_loss``: :data:`finegrain.losses.dml.PAIR_LOSSES`."""

Miner = Literal[MINERS]
"""``miner``: :data:`finegrain.losses.dml.MINERS`."""

DEFAULT_MAX_ATTN_DIM = 256
"""``attn_dim=None`` resolves to ``min(embedding_dim, 256)``: the branch then costs 1.05x the
baseline training-step FLOPs at the recipes' batch 112 for ResNet-50 and ViT-S/16 (1.10x at
256); D = E = 512 cost 1.17x (ResNet-50, batch 112), 1.36x at 256 (``benchmarks/dml.py``)."""


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

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, return_attn: bool = False,
                residual: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Refine the queries with the tokens.

        Args:
            q: (Bi, Q, D) queries, or (1, Q, D) queries shared by every image (the first
                layer: LN and the query projection then run once per query, not per pair).
            tokens: (Bi, N, D) keys / values.
            return_attn: also return the attention probabilities (Bi, H, Q, N), computed
                explicitly (pictures); otherwise one fused SDPA call.
            residual: keep the query's residual, ``q + Proj(MHA(..))``; False returns
                ``a = Proj(MHA(..))`` then ``a + MLP(LN(a))``: the query only chooses where to
                look (``query_residual=False`` of the first layer).
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
        x = self.proj(x.transpose(1, 2).reshape(Bi, Q, D))
        q = q + x if residual else x  # (Bi, Q, D), broadcast over images if Bq = 1
        q = q + self.mlp(self.norm_mlp(q))
        return (q, attn) if return_attn else q


class ConditionalEmbedding(nn.Module):
    """c_{i|j}: image i's tokens read by a query made from image j: a hierarchy of L levels.

    Level 0: ``q^0_{i|j} = W_q z_j`` (the partner's embedding). Level l = 1..L, with
    ``T_i = W_t F_i`` the tokens of image i:

    - ``stack``:  ``q^l_{i|j} = Layer_l(q^{l-1}_{i|j}, T_i)``: the partner enters the first
      query only, every level re-reads image i with its own previous level;
    - ``mutual``: ``q^l_{i|j} = Layer_l(q^{l-1}_{j|i}, T_i)`` for l >= 2: the query of
      c_{i|j} at level l is the partner's previous-level c_{j|i}, so each level adds one more
      reading of the tuple (level 2 of c_{i|j} depends on F_i, F_j and z_i).

    Output ``c_{i|j} = L2norm(W_o LN(q^L_{i|j}))``. ``query_residual=False``: the first layer
    drops the residual of its query W_q z_j (c_{i|j} is then built from image i's values
    only; z_j chooses where to look but is not copied into c_{i|j}).

    Args:
        feat_dim: backbone token width C.
        embedding_dim: embedding size E (of z and c).
        dim: attention width D.
        depth: number of cross-attention layers L.
        num_heads: heads per layer.
        mlp_ratio: MLP hidden size over D.
        hierarchy: ``stack`` or ``mutual`` (above).
        query_residual: keep the first layer's query residual (the partner's W_q z_j).
    """

    def __init__(self, feat_dim: int, embedding_dim: int, dim: int, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0, hierarchy: Hierarchy = "stack",
                 query_residual: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: the conditional branch needs at least one "
                             f"cross-attention layer (cross_attention=False turns it off)")
        check_choice("hierarchy", hierarchy, Hierarchy)
        self.hierarchy = hierarchy
        self.query_residual = query_residual
        self.token_proj = nn.Linear(feat_dim, dim)
        self.query_proj = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, embedding_dim)

    def _residual(self, level: int) -> bool:
        """Layer ``level`` (0-based) keeps its query residual (only layer 0 may drop it)."""
        return level > 0 or self.query_residual

    def output(self, q: torch.Tensor) -> torch.Tensor:
        """c = L2norm(W_o LN(q^L)), fp32."""
        return F.normalize(self.out_proj(self.norm(q)).float(), dim=-1)

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Every pair of one batch at once: ``out[i, j] = c_{i|j}``.

        Args:
            tokens: (B_i, N, C) patch tokens of the images i.
            queries: (B_j, E) embeddings z_j shared by every image i; with ``mutual`` they
                must be the embeddings of the same B images (B_j = B_i): the level-l query of
                c_{i|j} is c_{j|i}, the transpose of the (B_i, B_j) grid.
            return_attn: also return each layer's attention probabilities (B_i, H, B_j, N).

        Returns:
            (B_i, B_j, E) fp32, L2-normalised.
        """
        if queries.ndim != 2:
            raise ValueError(f"queries must be (B_j, E) embeddings shared by every image, got "
                             f"{tuple(queries.shape)}; per-image partners go through pairs()")
        if self.hierarchy == "mutual" and queries.shape[0] != tokens.shape[0]:
            raise ValueError(f"hierarchy='mutual' pairs the images with each other: pass the "
                             f"embeddings of the same {tokens.shape[0]} images as queries, "
                             f"got {queries.shape[0]} (use pairs() for other pairings)")
        kv = self.token_proj(tokens)  # (B_i, N, D)
        q = self.query_proj(queries).unsqueeze(0)  # (1, B_j, D): q^0_{i|j} = W_q z_j for all i
        attns = []
        for level, layer in enumerate(self.layers):
            if level > 0 and self.hierarchy == "mutual":
                q = q.transpose(0, 1)  # [i, j] <- q^{l-1}_{j|i}, the partner's previous level
            q = layer(q, kv, return_attn=return_attn, residual=self._residual(level))
            if return_attn:
                q, a = q
                attns.append(a)
        c = self.output(q)  # (B_i, B_j, E)
        return (c, attns) if return_attn else c

    def pairs(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, z_a: torch.Tensor,
              z_b: torch.Tensor, return_attn: bool = False) -> tuple:
        """Both conditional embeddings of given pairs: each image a with its k partners b.

        Args:
            tokens_a: (A, N, C) patch tokens of the images a.
            tokens_b: (A, k, N', C) patch tokens of each a's k partners.
            z_a: (A, E) embeddings of the images a.
            z_b: (A, k, E) embeddings of the partners.
            return_attn: also return the attention probabilities of each layer.

        Returns:
            ``(c_ab, c_ba)``, both (A, k, E) fp32: ``c_ab[a, m] = c_{a|b_m}``,
            ``c_ba[a, m] = c_{b_m|a}``; with ``return_attn``
            ``(c_ab, c_ba, attn_ab, attn_ba)``, lists over layers of (A, H, k, N) (over a's
            tokens) and (A, k, H, N') (over b's tokens).
        """
        A, k = tokens_b.shape[:2]
        kv_a = self.token_proj(tokens_a)  # (A, N, D)
        kv_b = self.token_proj(tokens_b.flatten(0, 1))  # (A*k, N', D)
        qa = self.query_proj(z_b)  # (A, k, D): q^0_{a|b} = W_q z_b
        qb = self.query_proj(z_a)  # (A, D):    q^0_{b|a} = W_q z_a
        qb = qb[:, None].expand(A, k, qb.shape[-1]).reshape(A * k, 1, -1)  # (A*k, 1, D)
        attn_ab, attn_ba = [], []
        for level, layer in enumerate(self.layers):
            if level > 0 and self.hierarchy == "mutual":  # swap: each reads the other's level
                qa, qb = qb.reshape(A, k, -1), qa.reshape(A * k, 1, -1)
            res = self._residual(level)
            if return_attn:
                (qa, a_ab), (qb, a_ba) = (layer(qa, kv_a, True, res),
                                          layer(qb, kv_b, True, res))
                attn_ab.append(a_ab)  # (A, H, k, N)
                attn_ba.append(a_ba.reshape(A, k, a_ba.shape[1], a_ba.shape[-1]))
            else:
                qa, qb = layer(qa, kv_a, residual=res), layer(qb, kv_b, residual=res)
        c_ab, c_ba = self.output(qa), self.output(qb).reshape(A, k, -1)
        return (c_ab, c_ba, attn_ab, attn_ba) if return_attn else (c_ab, c_ba)


class CrossImageDML(FinegrainModel):
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
        attn_dim: cross-attention width D (default ``min(embedding_dim, 256)``: at most
            1.05x the baseline's training-step FLOPs at batch 112 for ResNet-50 / ViT-S; a
            checkpoint trained before this default, with D = E, needs ``attn_dim: E``).
        mlp_ratio: cross-attention MLP hidden size over D.
        hierarchy: ``stack`` (default: the partner enters the first query; every level
            re-reads image i) or ``mutual`` (the level-l query of c_{i|j} is the partner's
            level l-1 c_{j|i}); see :class:`ConditionalEmbedding`.
        query_residual: the first layer keeps its query's residual, so c_{i|j} carries the
            partner's W_q z_j (default, the standard pre-LN block); False: c_{i|j} is made of
            image i's values only.
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
                 attn_dim: int | None = None, mlp_ratio: float = 4.0,
                 hierarchy: Hierarchy = "stack", query_residual: bool = True,
                 asymmetric: bool = False, pool: Pool | None = None,
                 loss: DMLLoss = "multi_similarity", loss_kwargs: dict | None = None,
                 cond_loss: PairLoss = "multi_similarity",
                 cond_loss_kwargs: dict | None = None, cond_weight: float = 1.0,
                 miner: Miner | None = None, miner_kwargs: dict | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 freeze_bn: bool = True, drop_path_rate: float = 0.0,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        check_choice("hierarchy", hierarchy, Hierarchy)
        check_choice("loss", loss, DMLLoss)
        if cond_loss not in DML_LOSSES:  # a proxy loss: build_similarity_loss says why not
            check_choice("cond_loss", cond_loss, PairLoss)
        check_choice("miner", miner, Miner | None)
        check_choice("pool", pool, Pool | None)
        optional: dict = {"drop_path_rate": drop_path_rate}
        if freeze_bn:
            # timm zero-initialises each ResNet block's last BN weight; frozen at zero, every
            # residual branch of a model trained from scratch would stay dead (pretrained
            # weights replace it, so loading a file is unaffected)
            optional["zero_init_last"] = False
        self.backbone, info = create_backbone(backbone, img_size, if_supported=optional,
                                              **(backbone_kwargs or {}))
        self.num_prefix_tokens = info.num_prefix_tokens
        self.is_vit = info.is_vit
        pool = pool or ("token" if self.is_vit else "avg")
        if pool == "token" and not self.is_vit:
            raise InputError(refusal(f"pool (of the CNN {backbone})", pool,
                                     [p for p in POOLS if p != "token"]))
        self.pool = pool
        feat_dim = info.num_features  # C
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
            dim = attn_dim or min(embedding_dim, DEFAULT_MAX_ATTN_DIM)
            self.cross = ConditionalEmbedding(feat_dim, embedding_dim, dim, depth, num_heads,
                                              mlp_ratio, hierarchy, query_residual)
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

    def _partner(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What c_{i|j} is compared with: c_{j|i} (symmetric) or z_j (``asymmetric``)."""
        if self.asymmetric:
            return _fp32(z).unsqueeze(0).expand_as(c)  # [i, j] = z_j
        return c.transpose(0, 1)  # [i, j] = c_{j|i}

    def pair_similarity(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """S (B, B) from c (B_i, B_j, E): ``s_ij = <c_{i|j}, c_{j|i}>`` (symmetric) or
        ``<c_{i|j}, z_j>`` (``asymmetric``); all unit vectors, so cosines. fp32 (fp64 kept)."""
        c = _fp32(c)
        return (c * self._partner(c, z)).sum(-1)  # (B_i, B_j); exactly symmetric by default

    def pair_distance(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """D (B, B): ``d_ij = ||c_{i|j} - c_{j|i}||`` (or ``- z_j``), the Euclidean distance
        the distance-based losses read, from the vectors' difference: exact near s_ij = 1,
        where ``sqrt(2 - 2 s_ij)`` from an fp32 S loses its digits. fp32 (fp64 kept); the zero
        diagonal gets a zero gradient."""
        c = _fp32(c)
        sq = (c - self._partner(c, z)).pow(2).sum(-1)  # (B_i, B_j)
        return sq.clamp_min(1e-30).sqrt()

    def output_keys(self) -> set[str]:
        return {"embedding"}

    def loss_names(self) -> set[str]:
        return {"dml", "cond"} if self.cross is not None else {"dml"}

    def training_only(self) -> tuple[str, ...]:
        return ("cross.",)  # the conditional branch: training only, never at test time

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        feats = self.forward_features(images)  # (B, P+N, C)
        z = self.forward_head(feats)  # (B, E)
        out = {"embedding": z}
        if targets is None:
            return out
        sim = dist = None
        if self.training and self.cross is not None:
            c = self.conditional_embeddings(feats, z)  # (B_i, B_j, E), attention under autocast
            sim = self.pair_similarity(c, z)  # (B, B) fp32
            if self.cond_loss.reads_distance:  # contrastive / triplet / margin: exact d_ij
                dist = self.pair_distance(c, z)
        with _no_autocast(images.device.type):
            dml = self.loss(z, targets)
            losses = {"dml": dml}
            logs = {"dml": dml.detach()}
            if sim is not None:
                cond = self.cond_loss(sim, targets, dist=dist)
                losses["cond"] = self.cond_weight * cond
                logs["cond"] = cond.detach()
                logs.update(_similarity_logs(sim.detach(), targets))
        out["losses"] = losses
        out["logs"] = logs
        return out

    family = "cross_image"
    pretrained_note = ("ImageNet ResNet-50 (timm/resnet50.tv_in1k) or DINO ViT-S/16 "
                       "(timm/vit_small_patch16_224.dino)")

    def drop_training_only(self) -> dict[str, Any]:
        """Drop ``cross`` (the conditional embedding: training only, never at test time) and
        record ``cross_attention=False``."""
        if self.cross is None:
            return {}
        self.cross = None
        return {"cross_attention": False}

    # -- pictures and re-ranking ---------------------------------------------------------------
    @property
    def pairwise_explain(self) -> bool:
        """``explain`` draws pairs when the conditional (cross-attention) branch is on."""
        return self.cross is not None

    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None
                ) -> list[AttentionMap]:
        """Raw maps (B, h, w) on the token grid.

        ``activation``: token feature norms. With the conditional branch and no ``pair``:
        ``self_attention``, where image b's own embedding looks in image b (c_{b|b}). With
        ``pair`` (B, 3, H', W'): ``cross_attention`` = where ``images[b]`` is looked at when
        conditioned on ``pair[b]`` (pair b's query over image b's tokens, last layer, mean over
        heads), ``cross_attention_layer{l}`` for each layer, and ``cross_attention_reverse``
        (B, h', w'), tagged ``image="pair"``: image b's query over pair b's tokens.
        """
        check_pair(self, pair)
        feats, (h, w) = self._tokens(images)
        patches = self.patch_tokens(feats)  # (B, N, C)
        B = images.shape[0]
        maps = [AttentionMap("activation", patches.float().norm(dim=-1).reshape(B, h, w))]
        if self.cross is None:
            return maps
        z = self.forward_head(feats)  # (B, E)
        if pair is None:  # c_{b|b}: image b read by its own embedding
            _, _, attns, _ = self.cross.pairs(patches, patches[:, None], z, z[:, None],
                                              return_attn=True)
            maps.append(AttentionMap("self_attention",
                                     attns[-1].float().mean(1)[:, 0].reshape(B, h, w)))
            return maps
        feats_p, (hp, wp) = self._tokens(pair)
        z_p = self.forward_head(feats_p)  # (B, E)
        _, _, attns, attns_r = self.cross.pairs(patches, self.patch_tokens(feats_p)[:, None],
                                                z, z_p[:, None], return_attn=True)
        layers = [a.float().mean(1)[:, 0].reshape(B, h, w) for a in attns]  # (B, H, 1, N)
        maps.append(AttentionMap("cross_attention", layers[-1]))  # c_{b|pair b} over image b
        maps += [AttentionMap(f"cross_attention_layer{layer}", m)
                 for layer, m in enumerate(layers)]
        reverse = attns_r[-1].float().mean(2)[:, 0]  # (B, 1, H, N') -> (B, N')
        maps.append(AttentionMap("cross_attention_reverse", reverse.reshape(B, hp, wp), "pair"))
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
        zn = self.forward_head(n_feats.flatten(0, 1)).reshape(Q, k, -1)  # (Q, k, E)
        c_qn, c_nq = self.cross.pairs(self.patch_tokens(q_feats),
                                      n_feats[:, :, self.num_prefix_tokens:], zq, zn)
        return (c_qn * (zn if self.asymmetric else c_nq)).sum(-1)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) to fp32; fp32 / fp64 kept (float64 references in tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(device_type: str):
    """Autocast off for the losses (a no-op where the device has no autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


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
def conditional_rerank(model: CrossImageDML, q_tokens: torch.Tensor, db_tokens,
                       topk_ids: torch.Tensor, mix: float = 1.0, chunk_size: int = 32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each query's top-k neighbours by their conditional similarity.

    Queries are processed ``chunk_size`` at a time: at most ``chunk_size * k`` database token
    maps are gathered at once (ResNet-50, 49 x 2048 fp32 tokens, top-10: 32 queries = 128 MB;
    all 1,000 queries at once would be 3.9 GiB). Results do not depend on ``chunk_size``.

    Args:
        model: a trained :class:`CrossImageDML` with its cross-attention branch.
        q_tokens: (Q, P+N, C) query tokens from ``model.forward_features``.
        db_tokens: (M, P+N, C) database tokens: a tensor or anything indexable by an integer
            array (a ``numpy.memmap`` reads only the gathered rows).
        topk_ids: (Q, k) database indices of each query's neighbours by z.
        mix: score = ``mix * s_cond + (1 - mix) * cos(z_q, z_n)``.
        chunk_size: queries per chunk.

    Returns:
        ``(scores, ids)``, both (Q, k), sorted by decreasing score.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: use a positive number of queries per chunk")
    Q, k = topk_ids.shape
    parts = []
    for s in range(0, Q, chunk_size):
        q = q_tokens[s:s + chunk_size]  # (Qc, P+N, C)
        ids = topk_ids[s:s + chunk_size].reshape(-1).cpu()  # (Qc*k,)
        rows = db_tokens[ids] if torch.is_tensor(db_tokens) else \
            torch.as_tensor(db_tokens[ids.numpy()])
        n_feats = rows.to(q.device).reshape(len(q), k, *rows.shape[1:])  # (Qc, k, P+N, C)
        scores = model.conditional_similarity(q, n_feats)  # (Qc, k)
        if mix != 1.0:
            zq = model.forward_head(q)  # (Qc, E)
            zn = model.forward_head(n_feats.flatten(0, 1)).reshape(len(q), k, -1)
            scores = mix * scores + (1.0 - mix) * (zn * zq.unsqueeze(1)).sum(-1)
        parts.append(scores)
    scores = torch.cat(parts)  # (Q, k)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), topk_ids.to(order.device).gather(1, order)


def _create_cross_image(backbone: str, **kwargs) -> CrossImageDML:
    return build(CrossImageDML, backbone=backbone, **kwargs)


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
