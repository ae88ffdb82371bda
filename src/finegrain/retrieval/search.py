"""k-nearest-neighbour search with faiss: exact search and any ``index_factory`` index.

``knn`` is the exact search every pipeline uses (``IndexFlatIP`` / ``IndexFlatL2``, queries in
chunks); ``build_index`` + ``search`` cover approximate indexes for million-image galleries
(``"IVF4096,SQ8"``, ``"IVF1024,PQ32"``, ``"HNSW32"``, ``"PCA128,IVF1024,Flat"`` ...).

Scores: ``metric="ip"`` returns inner products (higher is better; cosine similarity on
L2-normalised descriptors), ``metric="l2"`` returns *squared* L2 distances (lower is better),
as faiss does. Rows are sorted best first; ids are row numbers of the database.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

__all__ = ["knn", "build_index", "search"]

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def _as_float32(x: Any, name: str) -> np.ndarray:
    """(N, D) C-contiguous float32 copy-if-needed of an array or tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_vectors, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _metric(metric: str) -> int:
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    return _METRICS[metric]


def _chunked_search(
    index: faiss.Index, queries: np.ndarray, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dim {queries.shape[1]} but the index holds dim {index.d}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    nq = queries.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    for a in range(0, nq, chunk_size):
        b = min(a + chunk_size, nq)
        scores[a:b], ids[a:b] = index.search(queries[a:b], k)
    return scores, ids


def knn(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor | None,
    k: int,
    metric: str = "ip",
    index: faiss.Index | None = None,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every query in the database.

    Args:
        queries: (nq, D) query descriptors.
        database: (nb, D) database descriptors; may be None when ``index`` is given.
        k: neighbours per query; clipped to the database size.
        metric: ``"ip"`` (inner product, higher = closer) or ``"l2"`` (squared L2, lower =
            closer). Ignored when ``index`` is given (the index has its own).
        index: an already filled faiss index to search instead of building a flat one.
        chunk_size: queries searched per call (bounds the (chunk, nb) score buffer).

    Returns:
        ``(scores, ids)``: (nq, k) float32 scores and (nq, k) int64 database row numbers,
        best first.
    """
    q = _as_float32(queries, "queries")
    if index is None:
        if database is None:
            raise ValueError("knn needs a database array or a filled index")
        db = _as_float32(database, "database")
        if db.shape[1] != q.shape[1]:
            raise ValueError(f"queries have dim {q.shape[1]} but database has dim {db.shape[1]}")
        index = faiss.IndexFlat(db.shape[1], _metric(metric))
        index.add(db)
    if index.ntotal == 0:
        raise ValueError("the database is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _chunked_search(index, q, min(int(k), int(index.ntotal)), chunk_size)


def build_index(
    database: np.ndarray | torch.Tensor,
    factory: str = "Flat",
    metric: str = "ip",
    train_size: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
    add_chunk_size: int = 65536,
) -> faiss.Index:
    """Build and fill a faiss index from an ``index_factory`` string.

    Args:
        database: (nb, D) descriptors to add (ids = row numbers).
        factory: faiss factory string, e.g. ``"Flat"``, ``"IVF4096,SQ8"``, ``"IVF1024,PQ32"``,
            ``"HNSW32"``, ``"PCA128,IVF1024,Flat"``.
        metric: ``"ip"`` or ``"l2"``.
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
    try:
        index = faiss.index_factory(db.shape[1], factory, _metric(metric))
    except RuntimeError as exc:
        raise ValueError(
            f"faiss cannot build index {factory!r} for dim {db.shape[1]}: {exc}"
        ) from exc
    if not index.is_trained:
        train = db
        if train_size is not None and train_size < db.shape[0]:
            rows = np.sort(
                np.random.default_rng(seed).choice(db.shape[0], int(train_size), replace=False)
            )
            train = db[rows]
        index.train(train)
    for a in range(0, db.shape[0], add_chunk_size):
        index.add(db[a : a + add_chunk_size])
    _set_params(index, nprobe, ef_search)
    return index


def _set_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError as exc:
            raise ValueError(
                f"the index {type(index).__name__} has no parameter {name}: {exc}"
            ) from exc


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
    _set_params(index, nprobe, ef_search)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index.ntotal == 0:
        raise ValueError("the index is empty")
    return _chunked_search(
        index, _as_float32(queries, "queries"), min(int(k), int(index.ntotal)), chunk_size
    )
