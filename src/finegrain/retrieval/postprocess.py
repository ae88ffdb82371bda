"""Post-processing of a first search: alpha query expansion and k-reciprocal re-ranking.

- **alpha-QE** (Radenovic, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human
  Annotation", TPAMI 2018, arXiv:1711.02512): the query is replaced by the normalised weighted
  sum of itself and its top-``n`` database neighbours,
  ``q' = normalize(q + sum_{i=1..n} max(q . d_i, 0) ** alpha * d_i)`` (the query's own weight
  is ``(q . q) ** alpha = 1``), then searched again. ``alpha = 3`` as in the paper; ``n`` is the
  paper's tuned ``n_QE``: default 10 here (reading: negative similarities get weight 0 rather
  than a negative one, which an odd alpha would give).
- **k-reciprocal re-ranking** (Zhong et al., CVPR 2017, arXiv:1701.08398) through
  :func:`finegrain.evaluation.reid.re_rank` (never re-implemented). A landmark database can
  hold 1M images, so re-ranking runs on a **shortlist**: the union of every query's first
  search results; re-ranked candidates come first, the rest of the ranking keeps its order.
  Distances given to ``re_rank`` are Euclidean between L2-normalised descriptors,
  ``sqrt(2 - 2 cos)``.

Descriptors are L2-normalised float32 rows; the database may be a memory-mapped array.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["alpha_query_expansion", "aqe_search", "k_reciprocal_rerank", "rerank_shortlist"]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, n: int = 10,
                          alpha: float = 3.0) -> np.ndarray:
    """Expanded queries from each query's top-``n`` neighbours (alpha-QE).

    Args:
        queries: (nq, D) L2-normalised queries.
        neighbours: (nq, >= n, D) descriptors of each query's neighbours, best first.
        n: neighbours used (0: queries unchanged).
        alpha: similarity exponent (paper: 3).

    Returns:
        (nq, D) float32, L2-normalised.
    """
    q = np.asarray(queries, dtype=np.float32)
    if n <= 0:
        return q.copy()
    nb = np.asarray(neighbours, dtype=np.float32)[:, :n]  # (nq, n, D)
    if nb.ndim != 3 or nb.shape[0] != q.shape[0] or nb.shape[2] != q.shape[1]:
        raise ValueError(f"neighbours must be (nq, n, D) = ({q.shape[0]}, {n}, {q.shape[1]}); "
                         f"got {nb.shape}")
    sims = np.einsum("qd,qnd->qn", q, nb)  # (nq, n)
    w = np.maximum(sims, 0.0) ** alpha
    return _normalize(q + np.einsum("qn,qnd->qd", w, nb)).astype(np.float32)


def aqe_search(queries: np.ndarray, get_vectors: Callable[[np.ndarray], np.ndarray],
               search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], k: int,
               n: int = 10, alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Search, expand with alpha-QE, search again.

    Args:
        queries: (nq, D) queries.
        get_vectors: database ids (m,) -> (m, D) descriptors (a memory-mapped array's
            ``__getitem__`` or an index's ``reconstruct``).
        search: ``(queries, k) -> (scores (nq, k), ids (nq, k))``; ids < 0 mean "no result".
        k: results of the second search.
        n: neighbours of the expansion.
        alpha: similarity exponent.
    """
    _, ids = search(queries, max(n, 1))
    if (ids[:, :n] < 0).any():
        raise ValueError(f"the first search returned fewer than n={n} neighbours for some "
                         f"query; lower --aqe-n or search a larger database")
    nb = get_vectors(ids[:, :n].reshape(-1)).reshape(ids.shape[0], n, -1)  # (nq, n, D)
    return search(alpha_query_expansion(queries, nb, n, alpha), k)


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(na, nb) Euclidean distances between L2-normalised rows, ``sqrt(2 - 2 a.b)``."""
    return np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)).astype(np.float32)


def k_reciprocal_rerank(queries: np.ndarray, candidates: np.ndarray, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
    """(nq, C) re-ranked distances of queries to candidate descriptors (Zhong et al.).

    Args:
        queries: (nq, D) L2-normalised.
        candidates: (C, D) L2-normalised database descriptors (the shortlist).
        k1, k2, lambda_value: as :func:`finegrain.evaluation.reid.re_rank` (20, 6, 0.3).
    """
    from ..evaluation.reid import re_rank
    q = np.asarray(queries, dtype=np.float32)
    g = np.asarray(candidates, dtype=np.float32)
    return re_rank(_euclidean(q, g), _euclidean(q, q), _euclidean(g, g), k1=k1, k2=k2,
                   lambda_value=lambda_value)


def rerank_shortlist(queries: np.ndarray, ids: np.ndarray,
                     get_vectors: Callable[[np.ndarray], np.ndarray], k1: int = 20, k2: int = 6,
                     lambda_value: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's shortlist by k-reciprocal distances.

    Args:
        queries: (nq, D) queries.
        ids: (nq, K) first-search database ids, best first (``-1`` padding allowed).
        get_vectors: ids (m,) -> (m, D) database descriptors.
        k1, k2, lambda_value: re-ranking parameters.

    Returns:
        ``(ids (nq, K), distances (nq, K))``: for every query its own K shortlist ids sorted by
        re-ranked distance (the neighbourhood graph is built on the union of all shortlists).
    """
    ids = np.asarray(ids)
    cand = np.unique(ids[ids >= 0])  # (C,) sorted union
    dist = k_reciprocal_rerank(queries, get_vectors(cand), k1, k2, lambda_value)  # (nq, C)
    col = np.searchsorted(cand, np.where(ids >= 0, ids, cand[0]))  # (nq, K) column of each id
    d = np.take_along_axis(dist, col, axis=1)
    d = np.where(ids >= 0, d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(d, order, axis=1)

