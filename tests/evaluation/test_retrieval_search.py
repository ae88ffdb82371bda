"""finegrain.retrieval.search against numpy brute force."""

import numpy as np
import pytest
import torch

from finegrain.retrieval import build_index, knn, search
from finegrain.retrieval.search import metric_name


def _data(seed=0, nb=500, nq=40, d=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nq, d)).astype(np.float32), rng.standard_normal((nb, d)).astype(
        np.float32
    )


def _brute(q, db, k, metric):
    q64, db64 = q.astype(np.float64), db.astype(np.float64)
    if metric == "cosine":
        s = q64 @ db64.T
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((q64[:, None] - db64[None]) ** 2).sum(-1)
        ids = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_exact(metric):
    q, db = _data()
    scores, ids = knn(q, torch.from_numpy(db), 10, metric=metric, chunk_size=7)
    ref_s, ref_ids = _brute(q, db, 10, metric)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (40, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old,new", [("ip", "cosine"), ("l2", "euclidean")])
def test_older_metric_names_are_aliases(old, new):
    """faiss's names (the retrieval names before 2026-11-30) give the same search."""
    q, db = _data()
    assert metric_name(old) == metric_name(new) == new
    for a, b in zip(knn(q, db, 10, metric=old), knn(q, db, 10, metric=new)):
        np.testing.assert_array_equal(a, b)
    _, ids = search(build_index(db, "Flat", metric=old), q, 5)
    np.testing.assert_array_equal(ids, _brute(q, db, 5, new)[1])


def test_knn_clips_k_and_reuses_index():
    q, db = _data(nb=5)
    scores, ids = knn(q, db, 50)
    assert ids.shape == (40, 5)
    index = build_index(db, "Flat", metric="euclidean")
    s2, i2 = knn(q, None, 3, index=index)
    np.testing.assert_array_equal(i2, _brute(q, db, 3, "euclidean")[1])


def test_build_index_flat_and_ivf():
    q, db = _data(seed=1, nb=2000)
    index = build_index(db, "Flat", metric="cosine")
    _, ids = search(index, q, 5)
    np.testing.assert_array_equal(ids, _brute(q, db, 5, "cosine")[1])
    ivf = build_index(db, "IVF16,Flat", metric="euclidean", train_size=1000, nprobe=16)
    _, ids = search(ivf, q, 5)  # every cell visited: exact
    np.testing.assert_array_equal(ids, _brute(q, db, 5, "euclidean")[1])
    hnsw = build_index(db, "HNSW16", metric="euclidean", ef_search=64)
    _, ids = search(hnsw, q, 5, ef_search=128)
    assert (ids[:, 0] == _brute(q, db, 1, "euclidean")[1][:, 0]).mean() > 0.9


def test_errors():
    q, db = _data()
    with pytest.raises(ValueError, match="metric") as e:
        knn(q, db, 3, metric="cos")
    assert all(f"'{m}'" in str(e.value) for m in ("cosine", "euclidean", "ip", "l2", "cos"))
    with pytest.raises(ValueError, match="dim"):
        knn(q[:, :3], db, 3)
    with pytest.raises(ValueError, match="cannot build"):
        build_index(db, "NotAnIndex")
    with pytest.raises(ValueError, match="nprobe"):
        build_index(db, "Flat", nprobe=4)
