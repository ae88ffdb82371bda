"""Deep-metric-learning metrics: Recall@K, MAP@R and NMI (CUB / Cars196 / SOP / In-Shop).

Conventions (``spec/protocols.md``), checked against pytorch-metric-learning's
``AccuracyCalculator`` (``avg_of_avgs=False``):

- similarity is the inner product of L2-normalised embeddings (cosine similarity);
- without a separate query set every sample queries all the others (itself excluded: CUB,
  Cars196, SOP); with one (In-Shop) the queries search the given gallery;
- Recall@K: fraction of queries with at least one same-class sample among their K nearest
  neighbours (Recall@1 is PML's ``precision_at_1``);
- MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): with R the number of
  same-class samples in the searched set (the query itself excluded),
  ``MAP@R = (1/R) sum_{i<=R} P@i * rel_i``, averaged over queries;
- queries whose class has no other sample in the searched set are left out of Recall@K and
  MAP@R, as PML does;
- NMI: k-means (faiss, seeded, 20 iterations, k = number of classes) on the normalised query
  embeddings, then normalised mutual information with the arithmetic-mean normaliser (the
  default of scikit-learn's ``normalized_mutual_info_score``).

Equal similarities are ordered by gallery index. Neighbours are found a chunk of queries at a
time (``chunk_size x N`` similarities), so SOP's 60,502 test images fit in a few hundred MB:
one ``torch.topk`` of k + 1 per row (no full sort; rows with equal scores are fixed up), the
(C, k) bookkeeping in numpy. 10,000 x 128 (100 classes, Recall@1-8 + MAP@R): 1.19 s against
3.03 s for pytorch-metric-learning's ``AccuracyCalculator`` (P@1 + MAP@R, faiss k-NN), timed
alternately in one run of ``benchmarks/evaluation.py --cases dml`` on 2 shared CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate", "normalized_mutual_info", "kmeans_assign", "stable_topk"]

_CHUNK_ELEMENTS = 1 << 23  # similarities per chunk when chunk_size is None


def _as_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim != ndim:
        shape = "(num_samples, dim)" if ndim == 2 else "(num_samples,)"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    return t


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of every row, equal scores ordered by column index.

    ``torch.topk`` leaves the order (and, at the k-th value, the choice) of equal scores to the
    implementation; this returns what a stable descending sort of each row would. One
    ``torch.topk`` of k + 1 per row (no full sort); only rows with equal scores are re-ordered,
    and only rows whose k-th and (k+1)-th scores are equal are selected again.

    Args:
        scores: (C, N) scores (NaN-free).
        k: number of entries per row, 1 <= k <= N.

    Returns:
        ``(values, indices)``, both (C, k), best first.
    """
    c, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1)  # (C, k+1), values descending
    v = vals.cpu().numpy()  # tie checks in numpy: small tensors cost more in torch threads
    boundary = v[:, k] == v[:, k - 1] if k < n else np.zeros(c, dtype=bool)
    inner = (v[:, 1:k] == v[:, : k - 1]).any(axis=1) & ~boundary
    vals, idx = vals[:, :k], idx[:, :k]
    if inner.any():  # the right set, equal scores in any order: sort them by column
        rows = torch.from_numpy(np.flatnonzero(inner)).to(scores.device)
        sub = idx[rows].sort(dim=1).values
        val, order = torch.sort(scores[rows].gather(1, sub), dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = val, sub.gather(1, order)
    if boundary.any():  # the k-th value is tied with the (k+1)-th: choose the set by column
        rows = torch.from_numpy(np.flatnonzero(boundary)).to(scores.device)
        vals[rows], idx[rows] = _stable_topk_tied(scores[rows], k)
    return vals, idx


def _stable_topk_tied(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stable_topk` of rows whose k-th and (k+1)-th largest scores are equal."""
    vals, idx = torch.topk(scores, k, dim=1)
    kth = vals[:, k - 1 : k]
    tie = scores == kth
    need = k - (scores > kth).sum(dim=1, keepdim=True)
    sel = (scores > kth) | (tie & (tie.cumsum(dim=1) <= need))
    idx = sel.nonzero()[:, 1].view(-1, k)  # the set, in column order
    vals, order = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def kmeans_assign(
    x: np.ndarray | torch.Tensor, k: int, seed: int = 0, niter: int = 20
) -> np.ndarray:
    """Cluster ``x`` with faiss k-means and return each row's nearest centroid.

    Args:
        x: (N, D) points.
        k: number of clusters, 1 <= k <= N.
        seed: k-means seed (initial centroids).
        niter: k-means iterations (PML uses 20).

    Returns:
        (N,) int64 cluster index of every point.
    """
    import faiss

    data = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
    n, d = data.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed), verbose=False)
    km.train(data)
    _, assign = km.index.search(data, 1)
    return assign[:, 0].astype(np.int64)


def normalized_mutual_info(
    labels_true: np.ndarray | torch.Tensor, labels_pred: np.ndarray | torch.Tensor
) -> float:
    """Normalised mutual information, ``MI / mean(H(true), H(pred))``.

    The value of scikit-learn's ``normalized_mutual_info_score`` (``average_method=
    "arithmetic"``), including its limit cases: 1.0 when both labelings put everything in one
    group, 0.0 when the mutual information is 0. The contingency table is kept sparse, so
    11,316 classes x 11,316 clusters (SOP) costs O(N).

    Args:
        labels_true: (N,) class labels.
        labels_pred: (N,) cluster labels.

    Returns:
        NMI in [0, 1].
    """
    a = np.asarray(torch.as_tensor(labels_true).cpu()).reshape(-1)
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labels_true has {a.size} entries but labels_pred has {b.size}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n_a, n_b = int(ai.max(initial=-1)) + 1, int(bi.max(initial=-1)) + 1
    if (n_a == n_b == 1) or (n_a == n_b == 0):
        return 1.0
    pi = np.bincount(ai, minlength=n_a).astype(np.float64)
    pj = np.bincount(bi, minlength=n_b).astype(np.float64)
    if n_a == 1 or n_b == 1:
        return 0.0
    pair, nz = np.unique(ai.astype(np.int64) * n_b + bi, return_counts=True)
    nz = nz.astype(np.float64)
    total = nz.sum()
    outer = pi[pair // n_b] * pj[pair % n_b]
    log_outer = -np.log(outer) + np.log(pi.sum()) + np.log(pj.sum())
    contingency_nm = nz / total
    mi = contingency_nm * (np.log(nz) - np.log(total)) + contingency_nm * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    mi = float(np.clip(mi.sum(), 0.0, None))
    if mi == 0:
        return 0.0

    def entropy(p: np.ndarray) -> float:
        return float(-np.sum((p / p.sum()) * (np.log(p) - np.log(p.sum()))))

    return float(mi / np.mean([entropy(pi), entropy(pj)]))


def evaluate(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    query: np.ndarray | torch.Tensor | None = None,
    query_labels: np.ndarray | torch.Tensor | None = None,
    nmi: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R and NMI of embeddings (see the module docstring for the conventions).

    Args:
        embeddings: (N, D) embeddings of the searched set (all test images, or the In-Shop
            gallery); L2-normalised here.
        labels: (N,) their class labels.
        ks: the K of Recall@K (CUB/Cars: 1, 2, 4, 8; SOP: 1, 10, 100, 1000; In-Shop: 1, 10,
            20, 30, 40, 50); K is clipped to the number of searchable samples.
        query: optional (Q, D) query embeddings searched against ``embeddings`` (In-Shop);
            None means all-vs-all with the query itself excluded.
        query_labels: (Q,) labels of ``query``; required with it.
        nmi: also compute NMI (k-means on the queries, k = number of their classes).
        seed: k-means seed.
        chunk_size: queries per chunk (None: about 8M similarities per chunk).

    Returns:
        ``{"R@1": float, "R@2": float, ..., "MAP@R": float, "NMI": float}`` (NMI only when
        asked), fractions in [0, 1].

    Raises:
        ValueError: on shape mismatches, NaN embeddings, or when no query has a same-class
            sample to find.
    """
    db = _as_tensor(embeddings, "embeddings", 2).float()
    db_labels = _as_tensor(labels, "labels", 1)
    if db_labels.shape[0] != db.shape[0]:
        raise ValueError(
            f"embeddings has {db.shape[0]} rows but labels has {db_labels.shape[0]} entries"
        )
    all_vs_all = query is None
    if all_vs_all:
        if query_labels is not None:
            raise ValueError("query_labels was given without query; pass both or neither")
        q, q_labels = db, db_labels
    else:
        if query_labels is None:
            raise ValueError("query was given without query_labels; pass both")
        q = _as_tensor(query, "query", 2).float()
        q_labels = _as_tensor(query_labels, "query_labels", 1)
        if q_labels.shape[0] != q.shape[0]:
            raise ValueError(
                f"query has {q.shape[0]} rows but query_labels has {q_labels.shape[0]} entries"
            )
        if q.shape[1] != db.shape[1]:
            raise ValueError(f"query has dim {q.shape[1]} but embeddings has dim {db.shape[1]}")
    if torch.isnan(db).any() or torch.isnan(q).any():
        raise ValueError("embeddings contain NaN")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    db = torch.nn.functional.normalize(db, p=2, dim=1)
    q = db if all_vs_all else torch.nn.functional.normalize(q, p=2, dim=1)
    n_db, n_q = db.shape[0], q.shape[0]
    searchable = n_db - int(all_vs_all)
    if searchable < 1:
        raise ValueError("need at least 2 samples for all-vs-all retrieval")

    # R per query: same-class samples in the searched set, the query itself excluded.
    uniq, db_count = torch.unique(db_labels, return_counts=True)
    loc = torch.searchsorted(uniq, q_labels.to(uniq.dtype)).clamp(max=len(uniq) - 1)
    r_per_q = torch.where(uniq[loc] == q_labels, db_count[loc], 0) - int(all_vs_all)  # (Q,)

    chunk = max(1, _CHUNK_ELEMENTS // n_db) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    k_clip = [min(k, searchable) for k in ks]
    db_np, q_np = db_labels.numpy(), q_labels.numpy()
    hits = torch.zeros(len(ks), dtype=torch.float64)
    map_sum = 0.0
    num_valid = 0
    with torch.no_grad():
        for a in range(0, n_q, chunk):
            b = min(a + chunk, n_q)
            r = r_per_q[a:b]
            keep = r > 0
            if not keep.any():
                continue
            sims = q[a:b] @ db.t()  # (C, N)
            if all_vs_all:
                sims[torch.arange(b - a), torch.arange(a, b)] = -torch.inf
            if not keep.all():
                sims, r = sims[keep], r[keep]
            k_need = min(max(max(k_clip), int(r.max())), searchable)
            _, idx = stable_topk(sims, k_need)  # (C, K)
            # the rest on (C, K) arrays in numpy (single-threaded: no thread sync per op)
            match = db_np[idx.numpy()] == q_np[a:b][keep.numpy()][:, None]  # (C, K)
            found = np.cumsum(match, axis=1)  # same-class samples among the first i
            for i, k in enumerate(k_clip):
                hits[i] += int((found[:, k - 1] > 0).sum())
            pos = np.arange(1, k_need + 1, dtype=np.float64)
            r_np = r.numpy()
            rel = match & (pos[None, :] <= r_np[:, None])  # relevant within the first R
            precision = np.where(rel, found / pos, 0.0)  # P@i where relevant
            map_sum += float((precision.sum(axis=1) / r_np).sum())
            num_valid += int(keep.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a same-class sample in the searched set; check the labels (and that "
            "query_labels use the gallery's label space)"
        )
    out = {f"R@{k}": float(h / num_valid) for k, h in zip(ks, hits)}
    out["MAP@R"] = map_sum / num_valid
    if nmi:
        num_classes = int(torch.unique(q_labels).numel())
        out["NMI"] = normalized_mutual_info(
            q_labels.numpy(), kmeans_assign(q, num_classes, seed=seed)
        )
    return out
