"""k-nearest-neighbour search with faiss: exact search and any ``index_factory`` index.

``knn`` is the exact search of in-memory arrays (``IndexFlatIP`` / ``IndexFlatL2``, queries in
chunks); ``blockwise_knn`` is the exact inner-product search of (memory-mapped) descriptor files
read a block of rows at a time, with a running top-k and, optionally, the exact position of
chosen rows in each query's full ranking (Revisited +1M evaluation); ``build_index`` +
``search`` cover approximate indexes for million-image galleries (``"IVF4096,SQ8"``,
``"IVF1024,PQ32"``, ``"HNSW32"``, ``"PCA128,IVF1024,Flat"`` ...).

Metrics (:func:`metric_name`; the names of :mod:`finegrain.evaluation.reid` and the DML
losses): ``metric="cosine"`` scores ``s = q . x``, the inner product (faiss
``METRIC_INNER_PRODUCT``), which is the cosine similarity ``cos(q, x)`` of the L2-normalised
descriptors every extraction writes (vectors are not normalised again here); higher is closer.
``metric="euclidean"`` scores ``d = |q - x|^2``, the *squared* L2 distance (faiss
``METRIC_L2``); lower is closer. (``reid.compute_distance``'s ``"cosine"`` is the distance
``1 - cos``: the same ranking.) ``"ip"`` / ``"l2"``, faiss's names used before 2026-11-30,
are accepted as aliases. Rows are sorted best first; ids are row numbers of the database.
"""

from __future__ import annotations

from typing import Any, Sequence

import faiss
import numpy as np
import torch

from ..errors import InputError

__all__ = ["knn", "blockwise_knn", "database_rows", "create_index", "train_index",
           "set_search_params", "build_index", "search", "metric_name", "METRIC_ALIASES",
           "tie_order"]

#: ``"cosine"``: inner product of L2-normalised descriptors (higher = closer);
#: ``"euclidean"``: squared L2 distance (lower = closer).
_METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "euclidean": faiss.METRIC_L2}
#: Older names (faiss's) -> today's: accepted wherever a metric is passed or read back
#: (``index.json`` files written before 2026-11-30 say ``"ip"``).
METRIC_ALIASES = {"ip": "cosine", "l2": "euclidean"}


def _as_float32(x: Any, name: str) -> np.ndarray:
    """(N, D) C-contiguous float32 copy-if-needed of an array or tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D (num_vectors, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf")
    return arr


def metric_name(metric: str) -> str:
    """The metric's name today: ``"cosine"`` or ``"euclidean"`` (module docstring), with the
    older ``"ip"`` / ``"l2"`` translated; the one place retrieval metric names are checked.

    Raises:
        InputError (a ValueError): any other value; the message names the accepted ones.
    """
    name = METRIC_ALIASES.get(metric, metric) if isinstance(metric, str) else metric
    if name not in _METRICS:
        raise InputError(f"metric must be 'cosine' (inner product of L2-normalised "
                         f"descriptors) or 'euclidean' (squared L2 distance); the older names "
                         f"'ip' / 'l2' mean the same; got {metric!r}")
    return name


def _metric(metric: str) -> int:
    return _METRICS[metric_name(metric)]


def _chunked_search(
    index: faiss.Index, queries: np.ndarray, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if queries.shape[1] != index.d:
        raise InputError(f"queries have dim {queries.shape[1]} but the index holds dim {index.d}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    nq = queries.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    for a in range(0, nq, chunk_size):
        b = min(a + chunk_size, nq)
        scores[a:b], ids[a:b] = _tie_ordered_search(index, queries[a:b], k)
    return scores, ids


def tie_order(scores: np.ndarray, ids: np.ndarray, higher_is_better: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``(scores, ids)`` best first and equal scores by id (ascending), the
    order of :func:`blockwise_knn` (``retrieval eval``); ids -1 (no result) last."""
    key = -scores if higher_is_better else scores
    order = np.lexsort((ids, key, ids < 0), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _tie_ordered_search(index: faiss.Index, q: np.ndarray, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(q, k)`` with exact ties in :func:`tie_order`'s order. faiss picks any of
    the rows tied at the k-th score, so the search asks for more until the row after the cut
    scores strictly worse (or the whole index is returned)."""
    n = int(index.ntotal)
    higher = index.metric_type == faiss.METRIC_INNER_PRODUCT
    want = k
    while True:
        wide = min(want + 1, n)
        s, i = index.search(q, wide)
        if wide <= k:
            break
        cut, after = s[:, k - 1], s[:, wide - 1]
        tied = (i[:, wide - 1] >= 0) & (cut == after)
        if not tied.any() or wide == n:
            break
        want = min(2 * want, n)
    s, i = tie_order(s, i, higher)
    return s[:, :k], i[:, :k]


def knn(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor | None,
    k: int,
    metric: str = "cosine",
    index: faiss.Index | None = None,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every query in the database.

    Args:
        queries: (nq, D) query descriptors.
        database: (nb, D) database descriptors; may be None when ``index`` is given.
        k: neighbours per query; clipped to the database size.
        metric: ``"cosine"`` (inner product ``q . x``: the cosine similarity of L2-normalised
            vectors, higher = closer) or ``"euclidean"`` (squared L2 ``|q - x|^2``, lower =
            closer); ``"ip"`` / ``"l2"`` are the older names. Ignored when ``index`` is given
            (the index has its own).
        index: an already filled faiss index to search instead of building a flat one.
        chunk_size: queries searched per call (bounds the (chunk, nb) score buffer).

    Returns:
        ``(scores, ids)``: (nq, k) float32 scores and (nq, k) int64 database row numbers,
        best first.
    """
    q = _as_float32(queries, "queries")
    if index is None:
        if database is None:
            raise InputError("knn needs a database array or a filled index")
        db = _as_float32(database, "database")
        if db.shape[1] != q.shape[1]:
            raise InputError(f"queries have dim {q.shape[1]} but database has dim {db.shape[1]}")
        index = faiss.IndexFlat(db.shape[1], _metric(metric))
        index.add(db)
    if index.ntotal == 0:
        raise InputError("the database is empty")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    return _chunked_search(index, q, min(int(k), int(index.ntotal)), chunk_size)


def database_rows(databases: Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (m,) of arrays numbered one after the other, as (m, D) float32 (reads only
    those rows of memory-mapped arrays)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((len(ids), databases[0].shape[1]), dtype=np.float32)
    start = 0
    for part in databases:
        sel = np.flatnonzero((ids >= start) & (ids < start + len(part)))
        if sel.size:
            out[sel] = part[ids[sel] - start]
        start += len(part)
    if ids.size and (ids.min() < 0 or ids.max() >= start):
        raise InputError(f"row ids must be in [0, {start}), got {ids.min()}..{ids.max()}")
    return out


def _merge_top(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, first: int, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of a running top list and a block's scores (rows ``first ...``), best
    first, equal scores ordered by row id."""
    nq, b = s.shape
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(first, first + b), (nq, b))],
                            axis=1)
    width = cand_s.shape[1]
    kk = min(k, width)
    if kk < width:  # keep every score >= the kk-th largest (ties included), then cut by id
        thr = np.partition(cand_s, width - kk, axis=1)[:, width - kk]
        r, c = np.nonzero(cand_s >= thr[:, None])
    else:
        r, c = np.divmod(np.arange(nq * width), width)
    order = np.lexsort((cand_i[r, c], -cand_s[r, c], r))
    r, c = r[order], c[order]
    keep = np.arange(len(r)) - np.searchsorted(r, np.arange(nq))[r] < kk
    r, c = r[keep], c[keep]
    return cand_s[r, c].reshape(nq, kk), cand_i[r, c].reshape(nq, kk)


def blockwise_knn(queries: np.ndarray | torch.Tensor, databases: Sequence[np.ndarray], k: int,
                  targets: Sequence[np.ndarray] | None = None, block_size: int = 32768
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """Exact inner-product top-k against arrays read a block of rows at a time.

    The ``databases`` (e.g. a gallery and memory-mapped +1M distractors) are searched as one,
    their rows numbered one after the other, without being copied or loaded whole: each block
    is scored in float64 (so the ranking does not depend on the block size), a running top-k
    is kept, and non-finite scores are refused naming the row. Equal scores are ordered by
    row id. With ``targets``, the exact 0-based position of those rows in each query's
    **complete** ranking is counted too (for Revisited metrics, which need the rank of every
    positive and junk image, however far down). Memory: about ``nq x (rows + k)`` scores and
    one block of rows, with ``rows = min(block_size, max(1024, 2**22 // nq))``.

    Args:
        queries: (nq, D) queries.
        databases: (n_j, D) float32 arrays (may be ``np.load(..., mmap_mode="r")``).
        k: results per query (clipped to the total number of rows).
        targets: per query, distinct row ids whose ranked positions are wanted.
        block_size: most database rows scored at a time.

    Returns:
        ``(scores (nq, k) float32, ids (nq, k) int64, positions)``; ``positions[i]`` is an
        int64 array aligned with ``targets[i]`` (None without targets).
    """
    q = _as_float32(queries, "queries").astype(np.float64)
    nq, dim = q.shape
    for j, part in enumerate(databases):
        if part.ndim != 2 or part.shape[1] != dim:
            raise InputError(f"database {j} has shape {part.shape}; queries have dim {dim}")
    n = sum(len(p) for p in databases)
    if n == 0:
        raise InputError("the database is empty")
    if k < 1 or block_size < 1:
        raise InputError(f"k and block_size must be >= 1, got {k}, {block_size}")
    k = min(int(k), n)
    rows = min(block_size, max(1024, 2 ** 22 // max(nq, 1)))
    best_s = np.empty((nq, 0))
    best_i = np.empty((nq, 0), dtype=np.int64)
    tgt = _Targets(q, databases, targets) if targets is not None else None
    start = 0
    for part in databases:
        for a in range(0, len(part), rows):
            block = np.asarray(part[a:a + rows], dtype=np.float64)
            s = q @ block.T  # (nq, B)
            if not np.isfinite(s).all():
                bad = start + a + int(np.flatnonzero(~np.isfinite(s).all(axis=0))[0])
                raise InputError(f"database row {bad} (rows numbered across the database "
                                 f"files) contains NaN or inf; extract its descriptor again")
            best_s, best_i = _merge_top(best_s, best_i, s, start + a, k)
            if tgt is not None:
                tgt.count(s, start + a)
        start += len(part)
    return best_s.astype(np.float32), best_i, None if tgt is None else tgt.positions()


class _Targets:
    """Counts, block by block, how many rows rank before each target row of each query."""

    def __init__(self, q: np.ndarray, databases: Sequence[np.ndarray],
                 targets: Sequence[np.ndarray]):
        if len(targets) != len(q):
            raise InputError(f"{len(targets)} target lists for {len(q)} queries")
        self.ids = [np.asarray(t, dtype=np.int64).reshape(-1) for t in targets]
        union = np.unique(np.concatenate(self.ids)) if self.ids else np.empty(0, np.int64)
        u_scores = q @ database_rows(databases, union).astype(np.float64).T  # (nq, |U|)
        self.asc, self.t_asc, self.id_asc, self.before, self.ahead = [], [], [], [], []
        for i, ids in enumerate(self.ids):
            t = u_scores[i, np.searchsorted(union, ids)]
            asc = np.lexsort((-ids, t))  # ascending score, ties: larger id first (ranks later)
            self.asc.append(asc)
            self.t_asc.append(t[asc])
            self.id_asc.append(ids[asc])
            # targets ranked before each target (by score, then id; duplicates count once)
            rank = np.empty(len(ids), dtype=np.int64)
            rank[asc] = len(ids) - 1 - np.arange(len(ids))
            self.before.append(rank)
            self.ahead.append(np.zeros(len(ids) + 1, dtype=np.int64))

    def count(self, s: np.ndarray, first: int) -> None:
        """Add a block's scores ``s`` (nq, B) of rows ``first ...``."""
        b = s.shape[1]
        for i, ids in enumerate(self.ids):
            if not len(ids):
                continue
            row = s[i]
            inside = ids[(ids >= first) & (ids < first + b)]
            if inside.size:  # targets are ordered among themselves in __init__
                row = row.copy()
                row[inside - first] = -np.inf
            t = self.t_asc[i]
            r = np.searchsorted(t, row, side="right")  # thresholds <= score
            self.ahead[i] += np.bincount(r, minlength=len(t) + 1)
            tie = np.flatnonzero((r > 0) & (row == t[np.maximum(r - 1, 0)]))
            for c in tie:  # equal score: the row ranks after targets with a smaller id
                eq = np.flatnonzero(t == row[c])
                late = eq[self.id_asc[i][eq] < first + c]
                self.ahead[i][late + 1] -= 1  # undo "ahead of" for those thresholds only
                self.ahead[i][late] += 1

    def positions(self) -> list[np.ndarray]:
        out = []
        for i, ids in enumerate(self.ids):
            h = self.ahead[i]
            ahead_asc = np.cumsum(h[::-1])[::-1][1:]  # rows scoring above threshold j
            pos = np.empty(len(ids), dtype=np.int64)
            pos[self.asc[i]] = ahead_asc
            out.append(pos + self.before[i])
        return out


def create_index(dim: int, factory: str, metric: str = "cosine") -> faiss.Index:
    """An empty faiss index from an ``index_factory`` string.

    Args:
        dim: descriptor dimension D.
        factory: faiss factory string (``"Flat"``, ``"IVF4096,SQ8"``, ``"HNSW32"`` ...).
        metric: ``"cosine"`` or ``"euclidean"`` (:func:`metric_name`).

    Raises:
        InputError: unknown metric, or a factory string faiss refuses (its reason quoted).
    """
    try:
        return faiss.index_factory(int(dim), factory, _metric(metric))
    except RuntimeError as e:
        raise InputError(f"faiss cannot build {factory!r} for {dim}-d descriptors: "
                         f"{str(e).strip().splitlines()[-1]}; see the faiss index_factory "
                         f"strings (Flat, IVF4096,SQ8, HNSW32 ...)") from None


def train_index(index: faiss.Index, vectors: Any, train_size: int | None = None,
                seed: int = 0, source: str = "the descriptors") -> int:
    """Train an index that needs it (IVF / PQ / SQ) on a seeded random sample of rows.

    Args:
        index: an empty index from :func:`create_index` (left as is when already trained).
        vectors: (N, D) descriptors: an array, a memory-mapped one or any row container that
            takes an index array (only the sampled rows are read).
        train_size: rows drawn at random without replacement, in row order; ``None`` or a
            size >= N trains on every row.
        seed: seed of the sample.
        source: what ``vectors`` is, for error messages.

    Returns:
        Rows trained on (0: the index needs no training).
    """
    if index.is_trained:
        return 0
    n = len(vectors)
    size = n if train_size is None else int(train_size)
    if size < 1:
        raise InputError(f"--train-size must be >= 1, got {size}")
    rows = np.arange(n) if size >= n else np.sort(
        np.random.default_rng(seed).choice(n, size, replace=False))
    try:
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    except RuntimeError as e:  # e.g. fewer training points than IVF cells
        raise InputError(f"faiss cannot train this index on {len(rows)} rows of {source}: "
                         f"{str(e).strip().splitlines()[-1]}; IVF needs about 39 vectors per "
                         f"cell: use --kind Flat or 'auto' for a set this small") from None
    return len(rows)


def set_search_params(index: faiss.Index, params: dict[str, int], factory: str = "") -> None:
    """Set faiss search parameters (``nprobe``, ``efSearch``, ``k_factor_rf`` ...) on an index
    (they stay set and are saved with it); refuses one the index does not have."""
    for name, value in params.items():
        try:
            faiss.ParameterSpace().set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise InputError(f"index {factory or type(index).__name__!r} has no search "
                             f"parameter {name} (nprobe is for IVF indexes, efSearch for "
                             f"HNSW)") from None


def _given(nprobe: int | None, ef_search: int | None) -> dict[str, int]:
    return {k: v for k, v in (("nprobe", nprobe), ("efSearch", ef_search)) if v is not None}


def build_index(
    database: np.ndarray | torch.Tensor,
    factory: str = "Flat",
    metric: str = "cosine",
    train_size: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
    add_chunk_size: int = 65536,
) -> faiss.Index:
    """Build and fill a bare faiss index from an ``index_factory`` string (ids = row numbers).

    The steps are those of :meth:`finegrain.retrieval.index.Index.build` (the index folder
    of ``finegrain index build``): :func:`create_index`, :func:`train_index`,
    :func:`set_search_params`.

    Args:
        database: (nb, D) descriptors to add (ids = row numbers).
        factory: faiss factory string, e.g. ``"Flat"``, ``"IVF4096,SQ8"``, ``"IVF1024,PQ32"``,
            ``"HNSW32"``, ``"PCA128,IVF1024,Flat"``.
        metric: ``"cosine"`` or ``"euclidean"`` (:func:`metric_name`).
        train_size: train on this many rows drawn at random (seeded) instead of all of them
            (IVF / PQ training on 1M+ vectors); ignored by indexes that need no training.
        nprobe: IVF cells visited per query (stored in the index).
        ef_search: HNSW search depth (stored in the index).
        seed: seed of the training sample.
        add_chunk_size: rows added per call.

    Returns:
        The trained, filled index.
    """
    db = _as_float32(database, "database")
    index = create_index(db.shape[1], factory, metric)
    train_index(index, db, train_size, seed, "the database")
    for a in range(0, db.shape[0], add_chunk_size):
        index.add(db[a : a + add_chunk_size])
    set_search_params(index, _given(nprobe, ef_search), factory)
    return index


def search(
    index: faiss.Index,
    queries: np.ndarray | torch.Tensor,
    k: int,
    nprobe: int | None = None,
    ef_search: int | None = None,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Search a filled faiss index (exact or approximate).

    Args:
        index: index from :func:`build_index` or ``faiss.read_index``.
        queries: (nq, D) query descriptors.
        k: neighbours per query (clipped to the index size; approximate indexes may return
            fewer, padded with id -1).
        nprobe: IVF cells visited per query (set on the index, stays set).
        ef_search: HNSW search depth (set on the index, stays set).
        chunk_size: queries searched per call.

    Returns:
        ``(scores, ids)``: (nq, k) float32 and (nq, k) int64, best first.
    """
    set_search_params(index, _given(nprobe, ef_search))
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if index.ntotal == 0:
        raise InputError("the index is empty")
    return _chunked_search(
        index, _as_float32(queries, "queries"), min(int(k), int(index.ntotal)), chunk_size
    )
