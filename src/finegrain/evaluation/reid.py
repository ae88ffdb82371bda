"""Re-identification metrics: CMC, mAP, mINP, k-reciprocal re-ranking and threshold calibration.

Protocol (Market-1501 / DukeMTMC-reID / MSMT17 / VeRi-776, see ``spec/protocols.md``): for every
query, gallery samples with the **same identity and the same camera** are removed; the query is
skipped when no gallery sample of its identity remains. On what is left:

- CMC rank-k: fraction of queries whose first true match is within the top k, as torchreid's
  ``eval_market1501``;
- mAP: mean of the non-interpolated average precision, as torchreid / fast-reid;
- mINP: mean of ``n_pos / (rank of the hardest positive)`` (Ye et al., TPAMI 2021), as fast-reid's
  ``evaluate_rank``.

The reference evaluators ``np.argsort`` every row of the distance matrix and loop over queries.
Here only the *ranks of the positives* are computed: the rank of a positive in the filtered list
is the number of gallery samples sorted before it minus the number of removed (junk) samples
sorted before it. Rows are sorted in chunks with ``np.sort`` (values only, vectorised), each
same-identity sample is placed by binary search, and the junk correction uses only the handful
of same-identity samples of each query. Equal distances are ordered by gallery
index (a **stable** sort, ``np.argsort(kind="stable")``); torchreid's default quicksort orders
ties arbitrarily, so results match the references exactly whenever a row has no ties (float32
distances over a large gallery do tie now and then).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate", "evaluate_features", "compute_distance", "re_rank", "calibrate"]

_CHUNK_ELEMENTS = 1 << 23  # distances per chunk when chunk_size is None (32 MiB of float32)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or sequence) as a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a numeric array or tensor, got {type(x).__name__}")
    return arr


def _check_ids(
    q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, num_q: int, num_g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate identity / camera arrays against the (num_q, num_g) problem size."""
    out = []
    for name, arr, n in (
        ("q_pids", q_pids, num_q),
        ("g_pids", g_pids, num_g),
        ("q_camids", q_camids, num_q),
        ("g_camids", g_camids, num_g),
    ):
        a = _as_numpy(arr, name).reshape(-1)
        if a.shape[0] != n:
            side = "queries" if name.startswith("q_") else "gallery samples"
            raise ValueError(f"{name} has {a.shape[0]} entries but there are {n} {side}")
        out.append(a)
    return out[0], out[1], out[2], out[3]


def _auto_chunk(num_g: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
    return int(chunk_size)


def _evaluate_rows(
    get_rows: Callable[[int, int], np.ndarray],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
    chunk_size: int,
) -> dict[str, Any]:
    """Core of :func:`evaluate`; ``get_rows(a, b)`` gives queries a..b-1's distances, (b-a, G)."""
    num_q, num_g = q_pids.shape[0], g_pids.shape[0]
    if num_g == 0:
        raise ValueError("the gallery is empty: distmat has 0 columns")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = min(int(max_rank), num_g)

    # Gallery grouped by identity (stable: gallery index order inside a group).
    g_order = np.argsort(g_pids, kind="stable")
    uniq, starts, counts = np.unique(g_pids[g_order], return_index=True, return_counts=True)
    loc = np.clip(np.searchsorted(uniq, q_pids), 0, max(len(uniq) - 1, 0))
    present = uniq[loc] == q_pids
    q_start = np.where(present, starts[loc], 0)
    q_count = np.where(present, counts[loc], 0)

    first_hist = np.zeros(max_rank, dtype=np.int64)  # queries whose first match is at rank r
    ap_sum = 0.0
    inp_sum = 0.0
    num_valid = 0
    for a in range(0, num_q, chunk_size):
        b = min(a + chunk_size, num_q)
        cnt = q_count[a:b]
        width = int(cnt.max()) if cnt.size else 0
        if width == 0:
            continue
        slot = np.arange(width)
        in_group = slot[None, :] < cnt[:, None]  # (C, S)
        gidx = g_order[np.minimum(q_start[a:b, None] + slot[None, :], num_g - 1)]  # (C, S)
        is_pos = in_group & (g_camids[gidx] != q_camids[a:b, None])
        is_junk = in_group & ~is_pos
        valid_q = is_pos.any(axis=1)
        if not valid_q.any():
            continue
        keep = np.flatnonzero(valid_q)
        gidx, in_group, is_pos, is_junk = gidx[keep], in_group[keep], is_pos[keep], is_junk[keep]

        dist = np.asarray(get_rows(a, b))
        if dist.shape != (b - a, num_g):
            raise ValueError(
                f"distance rows {a}:{b} have shape {dist.shape}, expected {(b - a, num_g)}"
            )
        if keep.size < b - a:
            dist = dist[keep]
        if not np.issubdtype(dist.dtype, np.floating):
            dist = dist.astype(np.float64)
        srt = np.sort(dist, axis=1)  # (C, G); NaN sorts last
        if np.isnan(srt[:, -1]).any():
            raise ValueError(
                "distmat contains NaN; check the features (e.g. zero vectors with cosine)"
            )
        dvals = np.take_along_axis(dist, gidx, axis=1)  # (C, S)

        # Rank of every same-identity sample among all gallery samples, in stable-sort order:
        # (# smaller distances) + (# equal distances at a smaller gallery index).
        rank_all = np.empty(dvals.shape, dtype=np.int64)
        tied = np.zeros(dvals.shape, dtype=bool)
        for r in range(dvals.shape[0]):  # a binary search per sample (numpy beats torch here)
            rank_all[r] = np.searchsorted(srt[r], dvals[r], side="left")
            tied[r] = np.searchsorted(srt[r], dvals[r], side="right") - rank_all[r] > 1
        tied &= in_group
        for r in np.flatnonzero(tied.any(axis=1)):
            t = np.flatnonzero(tied[r])
            equal = dist[r][None, :] == dvals[r, t, None]  # (T, G)
            earlier = np.arange(num_g)[None, :] < gidx[r, t, None]
            rank_all[r, t] += (equal & earlier).sum(axis=1)

        # Order the same-identity samples as the stable sort does: by (distance, index).
        order = np.lexsort((gidx, dvals, ~in_group), axis=-1)
        rank_all = np.take_along_axis(rank_all, order, axis=1)
        is_pos = np.take_along_axis(is_pos, order, axis=1)
        is_junk = np.take_along_axis(is_junk, order, axis=1)
        junk_before = np.cumsum(is_junk, axis=1) - is_junk
        pos_before = np.cumsum(is_pos, axis=1) - is_pos  # j, the 0-based index among positives
        rank = rank_all - junk_before  # 0-based rank in the list without junk

        n_pos = is_pos.sum(axis=1)
        precision = (pos_before + 1.0) / np.where(is_pos, rank + 1.0, 1.0)
        ap = np.where(is_pos, precision, 0.0).sum(axis=1) / n_pos
        first = np.where(is_pos, rank, num_g).min(axis=1)
        last = np.where(is_pos, rank, -1).max(axis=1)
        ap_sum += float(ap.sum())
        inp_sum += float((n_pos / (last + 1.0)).sum())
        first_hist += np.bincount(first[first < max_rank], minlength=max_rank)
        num_valid += keep.size

    if num_valid == 0:
        raise ValueError(
            "no query identity appears in the gallery under another camera: every query was "
            "skipped; check that q_pids/g_pids and q_camids/g_camids come from the same dataset"
        )
    return {
        "cmc": np.cumsum(first_hist) / num_valid,
        "mAP": ap_sum / num_valid,
        "mINP": inp_sum / num_valid,
    }


def evaluate(
    distmat: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query-gallery distance matrix (Market-1501 protocol).

    Gallery samples with the query's identity *and* camera are removed per query; queries with
    no remaining true match are skipped. Equal distances are ordered by gallery index (stable).

    Args:
        distmat: (Q, G) distances, smaller = more similar (numpy or torch, any float dtype).
        q_pids: (Q,) query identities.
        g_pids: (G,) gallery identities (distractors keep their own id, e.g. 0).
        q_camids: (Q,) query cameras.
        g_camids: (G,) gallery cameras.
        max_rank: length of the CMC curve; clipped to G as torchreid does.
        chunk_size: query rows sorted at a time (None: about 8M distances per chunk).

    Returns:
        ``{"cmc": (min(max_rank, G),) float64 array, "mAP": float, "mINP": float}``, fractions
        in [0, 1]; ``cmc[k]`` is the rank-(k+1) accuracy.

    Raises:
        ValueError: on shape mismatches, NaN distances, or when no query has a valid match.
    """
    dist = _as_numpy(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {dist.shape}")
    num_q, num_g = dist.shape
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    return _evaluate_rows(
        lambda a, b: dist[a:b], *ids, max_rank=max_rank, chunk_size=_auto_chunk(num_g, chunk_size)
    )


def _prepare(feats: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row preparation shared by chunked and full distance computation."""
    if metric == "euclidean":
        return feats, feats.pow(2).sum(dim=1)
    if metric == "cosine":
        return torch.nn.functional.normalize(feats, p=2, dim=1), None
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def _distance_block(
    q: tuple[torch.Tensor, torch.Tensor | None], g: tuple[torch.Tensor, torch.Tensor | None]
) -> torch.Tensor:
    """(Q, G) distances between prepared query and gallery features."""
    if q[1] is None:  # 1 - q.g in one pass
        return torch.addmm(q[0].new_ones(1), q[0], g[0].t(), beta=1, alpha=-1)
    return torch.addmm(q[1][:, None] + g[1][None, :], q[0], g[0].t(), beta=1, alpha=-2)


def _as_features(x: np.ndarray | torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x).to(dtype)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, dim), got shape {tuple(t.shape)}")
    return t


def compute_distance(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    metric: str = "euclidean",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Query-gallery distance matrix, the way torchreid's ``compute_distance_matrix`` builds it.

    ``"euclidean"`` is the *squared* Euclidean distance ``|q|^2 + |g|^2 - 2 q.g`` (same ranking
    as Euclidean); ``"cosine"`` is the distance ``1 - cos(q, g)`` (features L2-normalised
    here). Both are distances, lower is closer (retrieval's ``"cosine"`` is the similarity
    ``cos``: the same ranking).

    Args:
        q_feats: (Q, D) query features.
        g_feats: (G, D) gallery features.
        metric: ``"euclidean"`` or ``"cosine"``.
        dtype: torch dtype of the computation (``torch.float32`` or ``torch.float64``).

    Returns:
        (Q, G) tensor of distances in ``dtype`` on the features' device.
    """
    q = _as_features(q_feats, "q_feats", dtype)
    g = _as_features(g_feats, "g_feats", dtype)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats has dim {q.shape[1]} but g_feats has dim {g.shape[1]}")
    with torch.no_grad():
        return _distance_block(_prepare(q, metric), _prepare(g, metric))


def evaluate_features(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """:func:`evaluate` on features, computing distances for a chunk of queries at a time.

    Gives the numbers of ``evaluate(compute_distance(q_feats, g_feats, metric), ...)`` while
    never holding more than ``chunk_size x G`` distances (plus their sorted copy), so
    MSMT17-sized problems (11,659 x 82,161) run in a few hundred MB.

    Args:
        q_feats: (Q, D) query features.
        g_feats: (G, D) gallery features.
        q_pids: (Q,) query identities.
        g_pids: (G,) gallery identities.
        q_camids: (Q,) query cameras.
        g_camids: (G,) gallery cameras.
        metric: ``"euclidean"`` (squared, as torchreid) or ``"cosine"`` (``1 - cos``).
        max_rank: length of the CMC curve (clipped to G).
        chunk_size: queries per chunk (None: about 8M distances per chunk).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the distance computation.

    Returns:
        ``{"cmc": (min(max_rank, G),) array, "mAP": float, "mINP": float}``.
    """
    q = _as_features(q_feats, "q_feats", dtype)
    g = _as_features(g_feats, "g_feats", dtype)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats has dim {q.shape[1]} but g_feats has dim {g.shape[1]}")
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0])
    with torch.no_grad():
        g_prep = _prepare(g, metric)

    def rows(a: int, b: int) -> np.ndarray:
        with torch.no_grad():
            return _distance_block(_prepare(q[a:b], metric), g_prep).cpu().numpy()

    return _evaluate_rows(
        rows, *ids, max_rank=max_rank, chunk_size=_auto_chunk(g.shape[0], chunk_size)
    )


# ---------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# ---------------------------------------------------------------------------------------------


class _BlockDistance:
    """The (N, N) matrix ``[[q_q, q_g], [q_g^T, g_g]]`` of the reference, read without building it.

    The reference squares it (float32), divides every column by its maximum and transposes; row
    ``i`` of that matrix is column ``i`` of the squared block matrix over its maximum. Rows and
    single entries are computed here on demand, element for element as the reference does.
    """

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> None:
        self.dtype = np.result_type(q_g, q_q, g_g)  # what np.concatenate would produce
        self.q_g, self.q_q, self.g_g = (np.asarray(x, dtype=self.dtype) for x in (q_g, q_q, g_g))
        self.num_q, self.num_g = q_g.shape
        self.n = self.num_q + self.num_g
        self.col_max = np.empty(self.n, dtype=np.float32)

    def raw_rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1 of the squared, transposed block matrix, before normalisation, (b-a, N)."""
        nq = self.num_q
        parts = []
        if a < nq:  # query i: [q_q[:, i], q_g[i, :]]
            e = min(b, nq)
            parts.append(np.concatenate([self.q_q[:, a:e].T, self.q_g[a:e]], axis=1))
        if b > nq:  # gallery g: [q_g[:, g], g_g[:, g]]
            s, e = max(a, nq) - nq, b - nq
            parts.append(np.concatenate([self.q_g[:, s:e].T, self.g_g[:, s:e].T], axis=1))
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return np.power(block, 2).astype(np.float32)

    def entries(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Normalised entries ``dist[i, j]`` (float32) for index arrays ``i``, ``j`` (one shape)."""
        nq = self.num_q
        raw = np.empty(i.shape, dtype=self.dtype)
        iq, jq = i < nq, j < nq
        m = iq & jq
        raw[m] = self.q_q[j[m], i[m]]
        m = ~iq & jq
        raw[m] = self.q_g[j[m], i[m] - nq]
        m = iq & ~jq
        raw[m] = self.q_g[i[m], j[m] - nq]
        m = ~iq & ~jq
        raw[m] = self.g_g[j[m] - nq, i[m] - nq]
        return np.power(raw, 2).astype(np.float32) / self.col_max[i]


def _reciprocal(rank: np.ndarray, chunk: int) -> np.ndarray:
    """``out[i, a]``: is ``i`` among the first K neighbours of ``rank[i, a]``? (N, K) bool."""
    n, _ = rank.shape
    out = np.empty(rank.shape, dtype=bool)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        back = rank[rank[a:b]]  # (c, K, K): neighbours of the neighbours
        out[a:b] = (back == np.arange(a, b)[:, None, None]).any(axis=2)
    return out


def _row_unique(idx: np.ndarray, sentinel: int) -> np.ndarray:
    """Sort each row and replace repeated entries by ``sentinel`` (which sorts last), (n, M)."""
    idx = np.sort(idx, axis=1)
    dup = np.zeros(idx.shape, dtype=bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    idx[dup] = sentinel
    return np.sort(idx, axis=1)


def re_rank(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_size: int | None = None,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
    k-reciprocal Encoding", CVPR 2017), numerically equal to the reference implementation
    (``person-re-ranking`` / torchreid ``utils/rerank.py``, the version taking distances).

    Steps, as in the reference: distances are squared and divided by their column maximum;
    ``initial_rank`` is ``np.argsort`` of every row (so ties are ordered exactly as there); the
    k-reciprocal set of each sample (k1) is expanded by the k1/2-reciprocal sets of its members
    that share more than 2/3 of it; ``V`` holds ``exp(-d)`` weights on that set, averaged over the
    k2 nearest neighbours (query expansion); the Jaccard distance uses ``sum min(V_q, V_g)``; the
    result is ``(1 - lambda) * jaccard + lambda * original``.

    Memory: the reference builds five (N, N) matrices, N = Q + G (about ``24 N^2`` bytes: 8.9 GB
    for Market-1501's 19,281 images, 211 GB for MSMT17's 93,820). Here ``V`` is kept sparse and
    every (N, N) quantity is computed ``chunk_size`` rows at a time from the three inputs, so
    besides the inputs (``g_g_dist`` alone is ``4 G^2`` bytes in float32: 1.0 GB for Market,
    27 GB for MSMT17) it needs the (Q, G) float32 output, ``chunk_size x N`` work rows and
    O(N k1^2) indices: Market-1501 fits in about 3 GB in total. Time is dominated by sorting
    N rows of N distances.

    Args:
        q_g_dist: (Q, G) query-gallery distances.
        q_q_dist: (Q, Q) query-query distances.
        g_g_dist: (G, G) gallery-gallery distances.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: neighbours averaged in the local query expansion (paper: 6; 1 disables it).
        lambda_value: weight of the original distance (paper: 0.3).
        chunk_size: rows processed at a time (None: about 8M distances per chunk).

    Returns:
        (Q, G) float32 re-ranked distances.
    """
    qg = _as_numpy(q_g_dist, "q_g_dist")
    qq = _as_numpy(q_q_dist, "q_q_dist")
    gg = _as_numpy(g_g_dist, "g_g_dist")
    if qg.ndim != 2:
        raise ValueError(f"q_g_dist must be 2-D (Q, G), got shape {qg.shape}")
    num_q, num_g = qg.shape
    if qq.shape != (num_q, num_q) or gg.shape != (num_g, num_g):
        raise ValueError(
            f"with q_g_dist of shape {qg.shape}, q_q_dist must be {(num_q, num_q)} and g_g_dist "
            f"{(num_g, num_g)}; got {qq.shape} and {gg.shape}"
        )
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    dist = _BlockDistance(qg, qq, gg)
    n = dist.n
    chunk = _auto_chunk(n, chunk_size)

    # Pass 1: normalisation constants and the first neighbours of every row (np.argsort, as the
    # reference, so that ties come out in the same order).
    k_fwd = min(k1 + 1, n)
    k_half = min(int(np.around(k1 / 2.0)) + 1, n)
    width = max(k_fwd, min(k2, n))
    initial_rank = np.empty((n, width), dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        rows = dist.raw_rows(a, b)
        dist.col_max[a:b] = rows.max(axis=1)
        if not np.all(dist.col_max[a:b] > 0):
            raise ValueError("a sample has zero distance to every sample; re-ranking is undefined")
        rows = 1.0 * rows / dist.col_max[a:b, None]
        initial_rank[a:b] = np.argsort(rows, axis=1)[:, :width]
    if np.isnan(dist.col_max).any():
        raise ValueError("the distance matrices contain NaN")

    # k-reciprocal sets R(i, k1) and R(j, k1/2), as masks over the forward neighbours.
    fwd = initial_rank[:, :k_fwd]  # (N, K1)
    half = initial_rank[:, :k_half]  # (N, Kh)
    elems = chunk * n  # elements per work chunk
    small = max(1, elems // (k_fwd * k_fwd))
    recip = _reciprocal(fwd, small)  # (N, K1)
    recip_h = _reciprocal(half, small)  # (N, Kh)
    len_h = recip_h.sum(axis=1)  # |R(j, k1/2)|

    # Expansion: add R(j, k1/2) for every j in R(i, k1) sharing more than 2/3 of it with R(i, k1).
    members = []
    small = max(1, elems // (k_fwd * k_half * k_fwd))
    for a in range(0, n, small):
        b = min(a + small, n)
        f, rf = fwd[a:b], recip[a:b]  # (c, K1)
        cand, rc = half[f], recip_h[f]  # (c, K1, Kh): R(j, k1/2) of each forward neighbour j
        in_set = ((cand[..., None] == f[:, None, None, :]) & rf[:, None, None, :]).any(axis=3)
        inter = (in_set & rc).sum(axis=2)  # (c, K1)
        take = rf & (inter > 2.0 / 3 * len_h[f])  # (c, K1)
        idx = np.concatenate(
            [np.where(rf, f, n), np.where((take[..., None] & rc), cand, n).reshape(b - a, -1)],
            axis=1,
        )
        idx = _row_unique(idx, n)
        members.append(idx[:, : int((idx < n).sum(axis=1).max())])  # drop all-padding columns
    width = max(m.shape[1] for m in members)
    v_idx = np.concatenate(  # (N, S) sorted, padded with N
        [np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=n) for m in members], axis=0
    )
    valid = v_idx < n
    rows_i = np.broadcast_to(np.arange(n)[:, None], v_idx.shape)
    v_val = np.zeros(v_idx.shape, dtype=np.float32)
    weight = np.exp(-dist.entries(rows_i[valid], v_idx[valid]))
    v_val[valid] = weight
    v_val = 1.0 * v_val / v_val.sum(axis=1, keepdims=True)

    # Local query expansion: V_i <- mean of V over the k2 nearest neighbours of i.
    if k2 != 1:
        nb = initial_rank[:, : min(k2, n)]  # (N, k2)
        e_idx = v_idx[nb].reshape(n, -1)  # (N, k2 * S), neighbour-major order
        e_val = v_val[nb].reshape(n, -1)
        order = np.argsort(e_idx, axis=1, kind="stable")
        e_idx = np.take_along_axis(e_idx, order, axis=1)
        e_val = np.take_along_axis(e_val, order, axis=1)
        key = (np.arange(n)[:, None] * (n + 1) + e_idx).ravel()
        start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        sums = np.add.reduceat(e_val.ravel(), start) / np.float32(nb.shape[1])
        key = key[start]
        rows, cols = key // (n + 1), key % (n + 1)
        keep = cols < n
        rows, cols, vals = rows[keep], cols[keep], sums[keep].astype(np.float32)
    else:
        rows, cols, vals = rows_i[valid], v_idx[valid], v_val[valid]
    nz = vals != 0
    rows, cols, vals = rows[nz], cols[nz], vals[nz]

    # Jaccard distance of query rows to gallery rows: sum_k min(V[q, k], V[g, k]) over shared k.
    is_q = rows < num_q
    g_rows, g_cols, g_vals = rows[~is_q], cols[~is_q], vals[~is_q]
    order = np.argsort(g_cols, kind="stable")  # gallery entries grouped by column k
    g_rows, g_vals = g_rows[order] - num_q, g_vals[order]
    col_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(g_cols, minlength=n), out=col_ptr[1:])
    q_rows, q_cols, q_vals = rows[is_q], cols[is_q], vals[is_q]  # sorted by row (then column)
    pairs = col_ptr[q_cols + 1] - col_ptr[q_cols]  # gallery partners of every query entry
    per_query = np.bincount(q_rows, weights=pairs, minlength=num_q)
    q_ptr = np.zeros(num_q + 1, dtype=np.int64)
    np.cumsum(np.bincount(q_rows, minlength=num_q), out=q_ptr[1:])

    final = np.empty((num_q, num_g), dtype=np.float32)
    budget = max(1 << 22, num_g)  # (query, gallery) pairs and output cells per step
    a = 0
    while a < num_q:
        b, load = a, 0.0
        while b < num_q and (
            b == a or (load + per_query[b] <= budget and (b - a + 1) * num_g <= budget)
        ):
            load += per_query[b]
            b += 1
        s, e = q_ptr[a], q_ptr[b]
        cnt = pairs[s:e]
        ent = np.repeat(np.arange(s, e), cnt)  # query entry of each pair
        offs = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        gpos = col_ptr[q_cols[ent]] + offs  # its gallery partner
        contrib = np.minimum(q_vals[ent], g_vals[gpos])
        flat = (q_rows[ent] - a) * num_g + g_rows[gpos]
        temp_min = np.bincount(flat, weights=contrib, minlength=(b - a) * num_g)
        temp_min = temp_min.astype(np.float32).reshape(b - a, num_g)
        jaccard = 1 - temp_min / (2.0 - temp_min)
        original = np.power(dist.q_g[a:b], 2).astype(np.float32) / dist.col_max[a:b, None]
        final[a:b] = jaccard * (1 - lambda_value) + original * lambda_value
        a = b
    return final


# ---------------------------------------------------------------------------------------------
# Verification thresholds
# ---------------------------------------------------------------------------------------------


def calibrate(
    dist_pos: np.ndarray | torch.Tensor,
    dist_neg: np.ndarray | torch.Tensor,
    far: Sequence[float] = (1e-3, 1e-2),
) -> dict[str, Any]:
    """Decision thresholds for verification ("same identity?") from labelled pair distances.

    A pair is accepted as the same identity when its distance is **strictly below** the
    threshold. For every target false-accept rate ``f`` the threshold is the largest one whose
    FAR = (accepted negatives) / (negatives) is <= f; TAR is then (accepted positives) /
    (positives). The equal-error point is the threshold, among the pair distances and +inf,
    minimising ``|FAR - FRR|`` (FRR = 1 - TAR; the smallest such threshold), with
    ``eer = (FAR + FRR) / 2`` there.

    Args:
        dist_pos: (P,) distances of genuine pairs (same identity).
        dist_neg: (M,) distances of impostor pairs (different identities).
        far: target false-accept rates, each in [0, 1].

    Returns:
        ``{"far": (F,) targets, "threshold": (F,), "tar": (F,), "far_achieved": (F,),
        "eer": float, "eer_threshold": float}`` (float64 arrays; a threshold may be ``inf``,
        meaning "accept everything").
    """
    pos = np.sort(_as_numpy(dist_pos, "dist_pos").astype(np.float64).ravel())
    neg = np.sort(_as_numpy(dist_neg, "dist_neg").astype(np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"need at least one genuine and one impostor distance, got {pos.size} and {neg.size}"
        )
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("pair distances contain NaN")
    targets = np.asarray(far, dtype=np.float64).ravel()
    if ((targets < 0) | (targets > 1)).any():
        raise ValueError(f"far targets must lie in [0, 1], got {targets.tolist()}")
    n_pos, n_neg = pos.size, neg.size

    # m = the most impostors that may be accepted: the largest integer with m / n_neg <= f.
    m = np.floor(targets * n_neg).astype(np.int64)
    m = np.where((m + 1) / n_neg <= targets, m + 1, m)
    m = np.where(m / n_neg > targets, m - 1, m)
    threshold = np.where(m < n_neg, neg[np.minimum(m, n_neg - 1)], np.inf)
    tar = np.searchsorted(pos, threshold, side="left") / n_pos
    far_achieved = np.searchsorted(neg, threshold, side="left") / n_neg

    cand = np.unique(np.concatenate([pos, neg, [np.inf]]))
    far_c = np.searchsorted(neg, cand, side="left") / n_neg
    frr_c = 1.0 - np.searchsorted(pos, cand, side="left") / n_pos
    best = int(np.argmin(np.abs(far_c - frr_c)))
    return {
        "far": targets,
        "threshold": threshold.astype(np.float64),
        "tar": tar,
        "far_achieved": far_achieved,
        "eer": float((far_c[best] + frr_c[best]) / 2),
        "eer_threshold": float(cand[best]),
    }
