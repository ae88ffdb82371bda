"""Index folders: exact search equals brute force, add / remove, save / load, refusals."""

import json
import shutil

import numpy as np
import pytest

from finegrain.retrieval.descriptors import DescriptorMismatch, save_descriptors
from finegrain.retrieval.index import Index, default_factory

PRE = {"resize": "longest_side", "img_size": 64, "scales": [1.0], "mean": [0.5] * 3,
       "std": [0.5] * 3}


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _desc(path, x, prefix="db", **kw):
    args = dict(model_name="dalg_tiny", checkpoint_hash="h1", preprocessing=PRE)
    args.update(kw)
    save_descriptors(path, x, [f"{prefix}{i}" for i in range(len(x))], **args)
    return str(path)


def _brute(q, db, k):
    s = q @ db.T
    return np.sort(s, axis=1)[:, ::-1][:, :k], np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_flat_search_equals_brute_force(tmp_path):
    db, q = _unit(300, 16, 0), _unit(7, 16, 1)
    index = Index.build(_desc(tmp_path / "db", db), factory="Flat")
    res = index.search(q, k=10)
    ref_s, ref_i = _brute(q, db, 10)
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_allclose(res.scores, ref_s, rtol=1e-5, atol=1e-6)
    assert res.names[0] == [f"db{i}" for i in ref_i[0]]


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16"])
def test_add_remove_save_load(tmp_path, factory):
    db, extra, q = _unit(400, 16, 0), _unit(50, 16, 2), _unit(5, 16, 1)
    params = {"IVF8,Flat": dict(nprobe=8), "HNSW16": dict(ef_search=64)}.get(factory, {})
    index = Index.build(_desc(tmp_path / "db", db), factory=factory, **params)
    assert index.add(_desc(tmp_path / "extra", extra, prefix="x")) == 50
    full = np.concatenate([db, extra])
    # remove the true top-3 of every query: they must disappear, the rest stays exact
    top = _brute(q, full, 3)[1]
    names = [index.names[i] for i in np.unique(top)]
    assert index.remove(names) == len(names)
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 450 - len(names)
    res = loaded.search(q, k=5)
    keep = np.setdiff1d(np.arange(450), np.unique(top))
    ref_i = keep[_brute(q, full[keep], 5)[1]]
    assert not set(res.names[0]) & set(names)
    if factory == "Flat":
        np.testing.assert_array_equal(res.ids, ref_i)
    else:  # approximate, but on 450 points with these parameters the top-5 is found
        assert (res.ids == ref_i).mean() >= 0.9
    assert loaded.manifest["mode"] == ("ivf" if factory.startswith("IVF") else "idmap")
    assert bool(loaded.removed) == (factory == "HNSW16")  # HNSW cannot delete: marked
    # reconstruct returns the stored vectors
    np.testing.assert_allclose(loaded.reconstruct(res.ids[0, :2]), full[res.ids[0, :2]], atol=1e-5)
    # adding a name twice is refused
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(_desc(tmp_path / "extra2", extra[:2], prefix="x"))
    with pytest.raises(KeyError, match="not in the index"):
        loaded.remove(["nope"])


def test_refuses_other_model_or_preprocessing(tmp_path):
    index = Index.build(_desc(tmp_path / "db", _unit(20, 8, 0)), factory="Flat")
    other = _desc(tmp_path / "o", _unit(3, 8, 1), prefix="o", checkpoint_hash="h2")
    with pytest.raises(DescriptorMismatch, match="checkpoint_hash: 'h1' in the index vs 'h2'"):
        index.add(other)
    from finegrain.retrieval.descriptors import load_descriptors
    q = _desc(tmp_path / "q", _unit(3, 8, 1), prefix="q",
              preprocessing={**PRE, "img_size": 512})
    with pytest.raises(DescriptorMismatch, match="img_size"):
        index.search(load_descriptors(q), k=2)


def test_default_factory_and_bad_factory(tmp_path):
    assert default_factory(1000)[0] == "Flat"
    fac, params = default_factory(1_000_000)
    assert fac.startswith("IVF") and params["nprobe"] > 0
    with pytest.raises(ValueError, match="faiss cannot build"):
        Index.build(_desc(tmp_path / "db", _unit(20, 8, 0)), factory="NotAnIndex")
    with pytest.raises(ValueError, match="no search parameter nprobe"):
        Index.build(str(tmp_path / "db"), factory="Flat", nprobe=4)


@pytest.mark.parametrize("metric,old_name", [("cosine", "ip"), ("euclidean", "l2")])
def test_an_index_folder_saying_ip_or_l2_loads_and_searches_alike(tmp_path, metric, old_name):
    """index.json written before 2026-11-30 says "ip" / "l2": it loads as "cosine" /
    "euclidean", searches identically, and is written back with today's name."""
    db, q = _unit(100, 16, 0), _unit(5, 16, 1)
    new = Index.build(_desc(tmp_path / "db", db), factory="Flat", metric=metric).save(
        str(tmp_path / "new"))
    old = str(shutil.copytree(new, tmp_path / "old"))
    man = json.load(open(f"{old}/index.json"))
    assert man["metric"] == metric
    json.dump({**man, "metric": old_name}, open(f"{old}/index.json", "w"))
    a, b = Index.load(old), Index.load(new)
    assert a.manifest["metric"] == metric and a.manifest == b.manifest
    ra, rb = a.search(q, k=10), b.search(q, k=10)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    assert ra.names == rb.names
    a.remove(["db0"])
    a.save(old)
    assert json.load(open(f"{old}/index.json"))["metric"] == metric
