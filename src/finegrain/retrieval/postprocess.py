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
  hold 1M images, so re-ranking runs on a **shortlist**: each query's first ``rerank_k``
  results, re-ranked on a graph of that query and its own shortlist alone, queries taken
  ``batch_size`` at a time (memory: ``batch_size * K`` vectors and a ``(K+1)^2`` graph, not
  the ``C x C`` graph of the union of all shortlists); a query's result does not depend on the
  other queries or the batch size. Re-ranked candidates come first, the rest of the ranking
  keeps its order. Distances given to ``re_rank`` are Euclidean between L2-normalised
  descriptors, ``sqrt(2 - 2 cos)``.
- :func:`postprocessed_search` is the one search + alpha-QE + re-ranking path of both
  ``finegrain index search`` and ``retrieval eval``: the re-ranking uses the **expanded**
  query when alpha-QE is on. Its parameters are one :class:`PostprocessOptions`, which also
  writes them, as used, to ``retrieval.json`` (:meth:`PostprocessOptions.report`).

Descriptors are L2-normalised float32 rows; the database may be a memory-mapped array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InputError

__all__ = ["alpha_query_expansion", "aqe_search", "expand_queries", "k_reciprocal_rerank",
           "rerank_shortlist", "PostprocessOptions", "postprocessed_search"]

Search = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
GetVectors = Callable[[np.ndarray], np.ndarray]


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
        raise InputError(f"neighbours must be (nq, n, D) = ({q.shape[0]}, {n}, {q.shape[1]}); "
                         f"got {nb.shape}")
    sims = np.einsum("qd,qnd->qn", q, nb)  # (nq, n)
    w = np.maximum(sims, 0.0) ** alpha
    return _normalize(q + np.einsum("qn,qnd->qd", w, nb)).astype(np.float32)


def expand_queries(queries: np.ndarray, get_vectors: GetVectors, search: Search, n: int = 10,
                   alpha: float = 3.0) -> np.ndarray:
    """alpha-QE queries: search the top ``n``, expand each query with them (``(nq, D)``)."""
    _, ids = search(queries, max(n, 1))
    if (ids[:, :n] < 0).any() or ids.shape[1] < n:
        raise InputError(f"the first search returned fewer than n={n} neighbours for some "
                         f"query; lower --aqe-n or search a larger database")
    nb = get_vectors(ids[:, :n].reshape(-1)).reshape(ids.shape[0], n, -1)  # (nq, n, D)
    return alpha_query_expansion(queries, nb, n, alpha)


def aqe_search(queries: np.ndarray, get_vectors: GetVectors, search: Search, k: int,
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
    return search(expand_queries(queries, get_vectors, search, n, alpha), k)


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


def rerank_shortlist(queries: np.ndarray, ids: np.ndarray, get_vectors: GetVectors,
                     k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's shortlist by k-reciprocal distances on its own shortlist.

    Every query is re-ranked on the graph of itself and its K candidates only, so its result
    does not depend on the other queries nor on ``batch_size``; queries are taken
    ``batch_size`` at a time, so memory is bounded by ``batch_size * K`` vectors (one
    ``get_vectors`` call per batch) plus a ``(K + 1)^2`` graph.

    Args:
        queries: (nq, D) queries.
        ids: (nq, K) first-search database ids, best first (``-1`` padding allowed).
        get_vectors: ids (m,) -> (m, D) database descriptors.
        k1, k2, lambda_value: re-ranking parameters.
        batch_size: queries whose candidate vectors are fetched together.

    Returns:
        ``(ids (nq, K), distances (nq, K))``: every query's own K shortlist ids sorted by
        re-ranked distance (``-1`` padding last, distance inf).
    """
    q = np.asarray(queries, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    out_ids = np.empty_like(ids)
    out_d = np.empty(ids.shape, dtype=np.float32)
    for a in range(0, len(ids), batch_size):
        block = ids[a:a + batch_size]
        vectors = np.asarray(get_vectors(block[block >= 0]), dtype=np.float32)  # row-major
        start = 0
        for r, row in enumerate(block):
            ok = row >= 0
            m = int(ok.sum())
            d = np.full(len(row), np.inf, dtype=np.float32)
            if m:
                d[ok] = k_reciprocal_rerank(q[a + r:a + r + 1], vectors[start:start + m], k1,
                                            k2, lambda_value)[0]
            start += m
            order = np.argsort(d, kind="stable")
            out_ids[a + r], out_d[a + r] = row[order], d[order]
    return out_ids, out_d


@dataclass(frozen=True)
class PostprocessOptions:
    """alpha-QE and k-reciprocal re-ranking of a first search, as used by
    :func:`postprocessed_search` (``--aqe``, ``--aqe-n``, ``--aqe-alpha``, ``--rerank``,
    ``--rerank-k`` of ``index search`` and ``retrieval eval``).

    Args:
        aqe: alpha query expansion.
        aqe_n: neighbours of the expansion (paper's n_QE; 10).
        aqe_alpha: similarity exponent (paper: 3).
        rerank: k-reciprocal re-ranking of each query's first ``rerank_k`` results.
        rerank_k: shortlist re-ranked (the rest keeps the first ranking's order).
        k1, k2, lambda_value: :func:`finegrain.evaluation.reid.re_rank` (20, 6, 0.3).
        batch_size: queries re-ranked together (results do not depend on it).
    """

    aqe: bool = False
    aqe_n: int = 10
    aqe_alpha: float = 3.0
    rerank: bool = False
    rerank_k: int = 100
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    batch_size: int = 64

    def depth(self, k: int) -> int:
        """Results the (expanded) query is searched for: ``max(k, rerank_k)`` with
        re-ranking, else ``k``."""
        return max(k, self.rerank_k) if self.rerank else k

    def report(self) -> dict[str, Any]:
        """The parameters as used, for a report: ``{"aqe": {"n", "alpha"} | None,
        "rerank": {"k", "k1", "k2", "lambda"} | None}``."""
        return {"aqe": {"n": self.aqe_n, "alpha": self.aqe_alpha} if self.aqe else None,
                "rerank": {"k": self.rerank_k, "k1": self.k1, "k2": self.k2,
                           "lambda": self.lambda_value} if self.rerank else None}


def postprocessed_search(queries: np.ndarray, search: Search, get_vectors: GetVectors, k: int,
                         options: PostprocessOptions | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Search with optional alpha-QE and k-reciprocal re-ranking: the one code path of
    ``finegrain index search`` and ``retrieval eval``.

    1. alpha-QE (``options.aqe``): the queries are replaced by their expansion
       (:func:`expand_queries`);
    2. the (expanded) queries are searched for ``options.depth(k)`` results
       (``max(k, rerank_k)`` with re-ranking, else ``k``);
    3. re-ranking (``options.rerank``): each query's first ``rerank_k`` results are re-ordered
       by :func:`rerank_shortlist` with the **expanded** query; later results keep their order.

    Args:
        queries: (nq, D) L2-normalised queries.
        search: ``(queries, k) -> (scores, ids)``, ids ``-1`` for "no result".
        get_vectors: database ids (m,) -> (m, D) descriptors.
        k: results returned per query.
        options: alpha-QE and re-ranking (``None``: neither, a plain search).

    Returns:
        ``(scores (nq, k), ids (nq, k))``: scores are the search's, except in the re-ranked
        shortlist where they are minus the re-ranked distance.
    """
    o = options or PostprocessOptions()
    q = np.asarray(queries, dtype=np.float32)
    if o.aqe:
        q = expand_queries(q, get_vectors, search, o.aqe_n, o.aqe_alpha)
    scores, ids = search(q, o.depth(k))
    if o.rerank:
        K = min(o.rerank_k, ids.shape[1])
        head, dist = rerank_shortlist(q, ids[:, :K], get_vectors, o.k1, o.k2, o.lambda_value,
                                      o.batch_size)
        ids = np.concatenate([head, ids[:, K:]], axis=1)
        scores = np.concatenate([-dist, scores[:, K:]], axis=1).astype(np.float32)
    return scores[:, :k], ids[:, :k]
