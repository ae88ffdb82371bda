"""Honest ANN defaults: the index ``--kind auto`` builds keeps recall@100 >= 0.9
against exact search on data without large clusters (small clusters in a low-dimensional
latent, no clusters), and a user's ``--nprobe`` is kept.

``FLAT_MAX`` is lowered so that ``auto`` picks its approximate index at 20k vectors (above
``FLAT_MAX`` it is the same rule of nlist and nprobe as for a 1M gallery)."""

import numpy as np
import pytest

import finegrain.retrieval.index as index_mod
from finegrain.retrieval.descriptors import save_descriptors
from finegrain.retrieval.index import Index, default_factory
from finegrain.retrieval.search import knn

PRE = {"resize": "longest_side", "img_size": 64, "scales": [1.0], "mean": [0.5] * 3,
       "std": [0.5] * 3}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def small_clusters(n: int, nq: int, d: int = 64, seed: int = 0):
    """~16 points per cluster, centres N(0, I) in a 16-d latent mapped linearly to d dims,
    plus noise (benchmarks/retrieval.py ``small_cluster_descriptors``); queries are new points
    of the clusters. Returns (database (n, d), queries (nq, d))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 16, 16))
    mixing = rng.standard_normal((16, d)) / 4.0

    def draw(m):
        z = centres[rng.integers(len(centres), size=m)] + 0.5 * rng.standard_normal((m, 16))
        return _unit(z @ mixing + 0.3 * rng.standard_normal((m, d)))
    return draw(n), draw(nq)


def no_clusters(n: int, nq: int, d: int = 64, seed: int = 0):
    """Anisotropic Gaussian, standard deviation (i + 1) ** -0.5 along a random orthonormal
    basis (``unclustered_descriptors``). Returns (database (n, d), queries (nq, d))."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scaled = ((np.arange(d) + 1.0) ** -0.5)[:, None] * basis.T
    return _unit(rng.standard_normal((n, d)) @ scaled), _unit(rng.standard_normal((nq, d)) @ scaled)


def _save(path, x):
    save_descriptors(path, x, [f"db{i}" for i in range(len(x))], model_name="m",
                     checkpoint_hash="h", preprocessing=PRE)
    return str(path)


@pytest.mark.parametrize("make", [small_clusters, no_clusters])
def test_auto_index_reaches_recall_090(tmp_path, monkeypatch, make):
    monkeypatch.setattr(index_mod, "FLAT_MAX", 0)  # the approximate default at 20k
    db, q = make(20_000, 300)
    index = Index.build(_save(tmp_path / "db", db), "auto")
    factory, params = default_factory(len(db), dim=db.shape[1])
    assert factory != "Flat" and index.manifest["factory"] == factory
    assert index.manifest["params"] == params
    ids = index.search(q, k=100).ids
    _, gt = knn(q, db, 100)  # ids are row numbers: added in order from 0
    recall = np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(ids, gt)])
    assert recall >= 0.9, f"{factory} {params}: recall@100 {recall:.3f}"


def test_auto_keeps_a_users_nprobe(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "FLAT_MAX", 0)
    name = _save(tmp_path / "db", no_clusters(3000, 1)[0])
    _, params = default_factory(3000, dim=64)
    assert params["nprobe"] != 3
    index = Index.build(name, "auto", nprobe=3)
    assert index.manifest["params"] == {**params, "nprobe": 3}
    assert index_mod.faiss.extract_index_ivf(index.index).nprobe == 3
    assert Index.build(name, "auto").manifest["params"] == params


def test_default_factory_sizes():
    assert default_factory(1000) == ("Flat", {})
    assert default_factory(1_000_000) == (index_mod.LARGE_GALLERY_FACTORY,
                                          index_mod.LARGE_GALLERY_PARAMS)
    assert default_factory(index_mod.FLAT_MAX - 1) == ("Flat", {})
    for n in (index_mod.FLAT_MAX, 1_000_000, 10_000_000):
        factory, params = default_factory(n)
        nlist = int(factory.split(",")[0][3:])
        assert factory.startswith("IVF") and 0 < params["nprobe"] <= nlist
        assert n >= 39 * nlist  # faiss wants >= 39 training vectors per cell
