"""Deep-metric-learning losses: a factory over pytorch-metric-learning (pml), and the same
pair-based losses read from a **precomputed similarity matrix** S.

Two entry points:

- :func:`build_dml_loss` ``(name, embedding_dim, num_classes, **kwargs)``: the library loss
  for embeddings z (B, D). Names: ``multi_similarity`` (default; Wang et al., CVPR 2019),
  ``margin`` (Wu et al., ICCV 2017), ``proxy_anchor`` (Kim et al., CVPR 2020), ``triplet``
  (triplet margin, all triplets), ``arcface`` (Deng et al., CVPR 2019), ``contrastive``
  (Hadsell et al., CVPR 2006). Hyper-parameters are pml's defaults unless given.
- :func:`build_similarity_loss` ``(name, **kwargs)``: the pair-based ones
  (:data:`PAIR_LOSSES`) as :class:`SimilarityMatrixLoss`, ``loss(S, labels)`` with S (B, B).
  Used for the conditional similarities of cross-image attention
  (``spec/cross_image_attention.md``), which are not inner products of any embedding.

How S reaches the library code (the reading we chose): pml losses call
``self.distance(embeddings, ref_emb)`` and then only index the (B, B) matrix it returns, so
:class:`SimilarityMatrix` is a ``BaseDistance`` that takes S as its "embeddings" and returns it
(a copy: pml miners write into the matrix). The library's own loss code then runs on S
unchanged; nothing is re-derived here. Each loss keeps the geometry of its pml default:

- ``multi_similarity`` reads cosine similarities (pml default ``CosineSimilarity``): S as is;
- ``contrastive``, ``triplet``, ``margin`` read Euclidean distances (pml default
  ``LpDistance`` on normalised embeddings): the caller passes them (``loss(S, y, dist=D)``,
  ``D`` computed from the vectors' difference, exact) or S becomes ``d = sqrt(2 - 2 S)``, the
  distance of unit vectors with cosine S, guarded (:func:`similarity_to_distance`).

Precision near S = 1: an fp32 S holds 1 - S to about 1e-7, so ``sqrt(2 - 2 S)`` at
d = 8e-4 (1 - S = 3.2e-7) has a gradient off by 10-30 % against float64, and by ~100 % below
d = 3e-4. The guard floors ``2 - 2 S`` at ``16 eps`` (fp32: d >= 1.4e-3, where the error is
at most ~5 %): closer pairs get no gradient from S alone rather than a wrong one. The
cross-image model passes ``dist`` (from the vectors' difference) for these losses, so its
gradient is exact: 5e-5 relative error against float64 at d = 8e-4 (tested).

So ``loss_S(z_n z_n^T) == loss_pml(z)`` with ``z_n = normalize(z)``, for every pair loss and its
defaults (tested); ``distance="cosine"`` reads S as cosine for every loss (then equal to the
pml loss built with ``distance=CosineSimilarity()``).

Proxy losses (``proxy_anchor``, ``arcface``) compare embeddings with learned class proxies,
so they have no form on S: they apply to z only. Losses and similarities are fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance

__all__ = ["PAIR_LOSSES", "PROXY_LOSSES", "DML_LOSSES", "MINERS", "build_dml_loss",
           "build_miner", "DISTANCE_FLOOR_EPS", "similarity_to_distance", "SimilarityMatrix",
           "SimilarityMatrixLoss", "build_similarity_loss", "EmbeddingLoss",
           "build_embedding_loss"]

PAIR_LOSSES = ("multi_similarity", "contrastive", "triplet", "margin")
"""Losses that only read a (B, B) similarity / distance matrix: usable on z and on S."""

PROXY_LOSSES = ("proxy_anchor", "arcface")
"""Losses with learned class proxies (need ``num_classes`` and ``embedding_dim``): z only."""

DML_LOSSES = PAIR_LOSSES + PROXY_LOSSES

MINERS = ("multi_similarity",)

# pml's default geometry per pair loss (see the module docstring).
_DEFAULT_DISTANCE = {"multi_similarity": "cosine", "contrastive": "euclidean",
                     "triplet": "euclidean", "margin": "euclidean"}


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (autocast) to fp32; fp32 / fp64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pml_class(name: str) -> type:
    table = {"multi_similarity": pml_losses.MultiSimilarityLoss,
             "contrastive": pml_losses.ContrastiveLoss,
             "triplet": pml_losses.TripletMarginLoss,
             "margin": pml_losses.MarginLoss,
             "proxy_anchor": pml_losses.ProxyAnchorLoss,
             "arcface": pml_losses.ArcFaceLoss}
    if name not in table:
        raise ValueError(f"unknown DML loss {name!r}; choose one of {', '.join(DML_LOSSES)}")
    return table[name]


def _distance_name(name: str, distance: str | None) -> str:
    d = _DEFAULT_DISTANCE[name] if distance is None else distance
    if d not in ("cosine", "euclidean"):
        raise ValueError(f"distance={distance!r}: use 'cosine', 'euclidean' or None (the "
                         f"loss's pytorch-metric-learning default)")
    return d


def build_dml_loss(name: str = "multi_similarity", embedding_dim: int | None = None,
                   num_classes: int | None = None, distance: str | None = None,
                   **kwargs) -> nn.Module:
    """The pytorch-metric-learning loss ``name`` for embeddings (B, D).

    Args:
        name: one of :data:`DML_LOSSES`.
        embedding_dim: embedding size D (proxy losses only).
        num_classes: number of training classes (proxy losses only).
        distance: ``"cosine"`` (the cosine similarity of the embeddings, pml
            ``CosineSimilarity``: higher is closer), ``"euclidean"`` (the Euclidean distance
            ``|z_i - z_j|`` of the L2-normalised embeddings, pml ``LpDistance(p=2)``, not
            squared: lower is closer) or None for the library default of the loss.
        **kwargs: the loss's own hyper-parameters (``alpha``, ``beta``, ``base``, ``margin``,
            ``pos_margin`` ...), passed to the pml class.

    Returns:
        the pml loss module: ``loss(z, labels)`` -> scalar.
    """
    cls = _pml_class(name)
    if name in PROXY_LOSSES:
        if embedding_dim is None or num_classes is None:
            raise ValueError(f"loss {name!r} learns one proxy per class: pass embedding_dim "
                             f"and num_classes (the number of training classes, e.g. "
                             f"num_classes=100 for cub200_dml; `finegrain train` links it "
                             f"from data.num_classes)")
        if distance is not None:
            raise ValueError(f"loss {name!r} compares with its proxies by cosine; drop "
                             f"distance={distance!r}")
        return cls(num_classes=num_classes, embedding_size=embedding_dim, **kwargs)
    if distance is not None:
        kwargs["distance"] = CosineSimilarity() if _distance_name(name, distance) == "cosine" \
            else LpDistance(p=2, normalize_embeddings=True)
    return cls(**kwargs)


def build_miner(name: str | None, distance: BaseDistance | None = None,
                **kwargs) -> nn.Module | None:
    """A pml miner (``"multi_similarity"``: the MS paper's pair mining, epsilon 0.1) or None.

    Args:
        name: one of :data:`MINERS`, or None for no mining (all pairs).
        distance: the geometry the miner reads (default: cosine similarity of embeddings).
        **kwargs: the miner's hyper-parameters (``epsilon``).
    """
    if name is None:
        return None
    if name != "multi_similarity":
        raise ValueError(f"unknown miner {name!r}; choose one of {', '.join(MINERS)} or None")
    if distance is not None:
        kwargs["distance"] = distance
    return pml_miners.MultiSimilarityMiner(**kwargs)


DISTANCE_FLOOR_EPS = 16
""":func:`similarity_to_distance` floors ``2 - 2 S`` at ``DISTANCE_FLOOR_EPS * eps(dtype)``."""


def similarity_to_distance(sim: torch.Tensor) -> torch.Tensor:
    """``d = sqrt(max(2 - 2 S, 16 eps))``: the Euclidean distance of unit vectors with cosine S.

    The floor (fp32: d >= 1.4e-3; fp64: 6e-8) is where S still resolves d: below it the
    gradient -1/d of a rounded S is wrong by 5-100 %, so those pairs get none (and the unused
    diagonal S_ii = 1 a finite, zero one). For exact distances pass ``dist`` to
    :class:`SimilarityMatrixLoss`, computed from the vectors' difference.
    """
    floor = DISTANCE_FLOOR_EPS * torch.finfo(sim.dtype).eps
    return (2.0 - 2.0 * sim).clamp_min(floor).sqrt()


class SimilarityMatrix(BaseDistance):
    """A pml distance whose input already is the (B, B) similarity matrix S.

    ``distance(S)`` returns S (``as_distance=False``; a similarity, ``is_inverted=True``) or
    :func:`similarity_to_distance` ``(S)`` (``as_distance=True``; the Euclidean distance of
    unit vectors whose cosine is S). With ``precomputed=True`` the input already is in the
    loss's geometry (S, or the distances D) and is returned as is. It always returns a new
    tensor: pml miners write into the matrix.

    Args:
        as_distance: the loss reads Euclidean distances of unit vectors, not similarities.
        precomputed: the input is already D (``as_distance``) or S: no conversion
            (:class:`SimilarityMatrixLoss` converts, or takes the caller's exact D).
    """

    def __init__(self, as_distance: bool = False, precomputed: bool = False, **kwargs):
        super().__init__(normalize_embeddings=False, is_inverted=not as_distance, **kwargs)
        self.as_distance = as_distance
        self.precomputed = precomputed

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        if query_emb is not ref_emb or query_emb.shape[0] != query_emb.shape[1]:
            raise ValueError("SimilarityMatrix reads one square (B, B) matrix S; pass S as "
                             "the embeddings and no ref_emb")
        if self.as_distance and not self.precomputed:
            return similarity_to_distance(query_emb)
        return query_emb.clone()

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor):
        raise NotImplementedError("a precomputed similarity matrix has no per-pair form; "
                                  "use a loss from PAIR_LOSSES")


class SimilarityMatrixLoss(nn.Module):
    """A pml pair-based loss (+ optional miner) that reads a precomputed similarity matrix.

    ``loss(S, labels, dist=None)``: S (B, B) with ``S[a, b]`` the similarity of anchor a to b
    (need not be symmetric: rows are anchors), labels (B,). Losses that read Euclidean
    distances use ``dist`` (B, B), the distances of the same pairs computed from the vectors
    (``||u - v||``: exact near S = 1), when given, else :func:`similarity_to_distance` (S);
    losses that read cosines ignore ``dist``. Computed in fp32.

    Args:
        loss: a pml loss from :data:`PAIR_LOSSES` built with ``distance=SimilarityMatrix(...)``.
        miner: optional pml miner built with the same distance.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        if not isinstance(loss.distance, SimilarityMatrix):
            raise ValueError("SimilarityMatrixLoss needs a loss built with "
                             "distance=SimilarityMatrix(); use build_similarity_loss()")
        self.loss = loss
        self.miner = miner

    @property
    def reads_distance(self) -> bool:
        """True when the loss reads Euclidean distances (then pass ``dist``)."""
        return self.loss.distance.as_distance

    def forward(self, sim: torch.Tensor, labels: torch.Tensor,
                dist: torch.Tensor | None = None) -> torch.Tensor:
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"similarity matrix must be (batch_size, batch_size), got "
                             f"{tuple(sim.shape)}")
        if labels.ndim != 1 or labels.shape[0] != sim.shape[0]:
            raise ValueError(f"labels must be (batch_size,) = ({sim.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if dist is not None and dist.shape != sim.shape:
            raise ValueError(f"dist must have the shape of the similarity matrix "
                             f"{tuple(sim.shape)}, got {tuple(dist.shape)}")
        reader = self.loss.distance
        mat = _fp32(sim)
        if reader.as_distance and reader.precomputed:  # the loss reads D: given, or from S
            mat = _fp32(dist) if dist is not None else similarity_to_distance(mat)
        elif dist is not None and reader.as_distance:
            raise ValueError("this loss converts S itself (SimilarityMatrix(precomputed="
                             "False)); build it with build_similarity_loss() to pass dist")
        indices = self.miner(mat, labels) if self.miner is not None else None
        return self.loss(mat, labels, indices)


def build_similarity_loss(name: str = "multi_similarity", distance: str | None = None,
                          miner: str | None = None, miner_kwargs: dict | None = None,
                          **kwargs) -> SimilarityMatrixLoss:
    """The pml pair-based loss ``name`` reading a precomputed similarity matrix S (B, B).

    Args:
        name: one of :data:`PAIR_LOSSES` (proxy losses have no form on S).
        distance: how the loss reads S: ``"cosine"`` (S as is), ``"euclidean"``
            (``sqrt(2 - 2 S)``) or None for the geometry of the loss's pml default
            (cosine for ``multi_similarity``, Euclidean for the others).
        miner: optional miner name (:data:`MINERS`), reading S too.
        miner_kwargs: the miner's hyper-parameters.
        **kwargs: the loss's hyper-parameters, as for :func:`build_dml_loss`.

    Returns:
        ``loss(S, labels, dist=None)`` -> scalar; equal to ``build_dml_loss(name,
        distance=distance, **kwargs)(z, labels)`` when ``S = normalize(z) normalize(z)^T``
        (and ``dist`` their distances, if given).
    """
    if name not in PAIR_LOSSES:
        raise ValueError(f"cond_loss {name!r} is not pair-based; a loss on a similarity "
                         f"matrix is one of {', '.join(PAIR_LOSSES)} (proxy losses apply to "
                         f"embeddings only)")
    as_distance = _distance_name(name, distance) == "euclidean"
    reader = SimilarityMatrix(as_distance=as_distance, precomputed=True)
    loss = _pml_class(name)(distance=reader, **kwargs)
    mine = build_miner(miner, distance=copy.deepcopy(reader), **(miner_kwargs or {}))
    return SimilarityMatrixLoss(loss, mine)


class EmbeddingLoss(nn.Module):
    """A pml loss (+ optional miner) on embeddings z (B, D), computed in fp32.

    Args:
        loss: any pml loss (see :func:`build_dml_loss`).
        miner: optional pml miner.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (batch_size, embedding_size), got "
                             f"{tuple(embeddings.shape)}")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be (batch_size,) = ({embeddings.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        z = _fp32(embeddings)
        indices = self.miner(z, labels) if self.miner is not None else None
        return self.loss(z, labels, indices)


def build_embedding_loss(name: str = "multi_similarity", embedding_dim: int | None = None,
                         num_classes: int | None = None, distance: str | None = None,
                         miner: str | None = None, miner_kwargs: dict | None = None,
                         **kwargs) -> EmbeddingLoss:
    """:func:`build_dml_loss` plus an optional miner, as ``loss(z, labels)`` in fp32.

    Args:
        name: one of :data:`DML_LOSSES`.
        embedding_dim: embedding size (proxy losses).
        num_classes: number of training classes (proxy losses).
        distance: as for :func:`build_dml_loss`.
        miner: optional miner name (:data:`MINERS`); it reads the loss's geometry.
        miner_kwargs: the miner's hyper-parameters.
        **kwargs: the loss's hyper-parameters.
    """
    loss = build_dml_loss(name, embedding_dim, num_classes, distance, **kwargs)
    if miner is not None and name in PROXY_LOSSES:
        raise ValueError(f"loss {name!r} compares with class proxies, not pairs: drop "
                         f"miner={miner!r}")
    mine = None if miner is None else build_miner(miner, distance=copy.deepcopy(loss.distance),
                                                  **(miner_kwargs or {}))
    return EmbeddingLoss(loss, mine)
