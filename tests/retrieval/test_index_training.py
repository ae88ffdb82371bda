"""IVF trains on a sample by default (--train-size overrides), --kind auto keeps a
user's --nprobe, and ids can be removed from an IVF fast-scan index (folder stays consistent)."""

import argparse
import json
import os

import faiss
import numpy as np
import pytest

import finegrain.retrieval.index as index_mod
from finegrain.errors import InputError
from finegrain.retrieval.commands import register
from finegrain.retrieval.descriptors import save_descriptors
from finegrain.retrieval.index import Index, default_train_size, index_files

PRE = {"resize": "longest_side", "img_size": 64, "scales": [1.0], "mean": [0.5] * 3,
       "std": [0.5] * 3}


def _desc(path, n, d=32, seed=0, prefix="db"):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    save_descriptors(path, x, [f"{prefix}{i}" for i in range(n)], model_name="m",
                     checkpoint_hash="h", preprocessing=PRE)
    return str(path), x


def _cli(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_ivf_trains_on_a_sample_by_default(tmp_path, monkeypatch):
    ip = faiss.METRIC_INNER_PRODUCT
    assert default_train_size(faiss.index_factory(512, "IVF4096,SQ8", ip)) == 64 * 4096
    assert default_train_size(faiss.index_factory(32, "IVF16,Flat", ip)) == 65536
    assert default_train_size(faiss.index_factory(32, "PQ8", ip)) == 65536
    name, _ = _desc(tmp_path / "db", 3000)
    monkeypatch.setattr(index_mod, "MIN_TRAIN_SIZE", 0)  # 64 x 16 cells = 1,024 of 3,000
    seen = []
    train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: (seen.append(len(x)),
                                                                      train(self, x)))
    assert Index.build(name, "IVF16,Flat").manifest["train_size"] == 1024
    assert Index.build(name, "IVF16,Flat", train_size=700).manifest["train_size"] == 700
    assert Index.build(name, "IVF16,Flat", train_size=10**9).manifest["train_size"] == 3000
    assert seen == [1024, 700, 3000]
    assert Index.build(name, "Flat").manifest["train_size"] == 0  # nothing to train
    out = tmp_path / "cli.index"
    assert _cli("index", "build", name, "--kind", "IVF16,Flat", "--train-size", 900,
                "--out", out) == 0
    assert json.loads((out / "index.json").read_text())["train_size"] == 900
    with pytest.raises(InputError, match="train-size"):
        Index.build(name, "IVF16,Flat", train_size=0)


def test_auto_keeps_the_users_nprobe(tmp_path, monkeypatch):
    name, _ = _desc(tmp_path / "db", 2000)
    monkeypatch.setattr(index_mod, "default_factory",
                        lambda n: ("IVF16,Flat", {"nprobe": 4}) if n >= 1000 else ("Flat", {}))
    assert Index.build(name, "auto").manifest["params"] == {"nprobe": 4}
    assert Index.build(name, "auto", nprobe=9).manifest["params"] == {"nprobe": 9}
    small, _ = _desc(tmp_path / "small", 200, seed=1)
    assert Index.build(small, "auto").manifest["factory"] == "Flat"
    with pytest.raises(InputError, match="auto chose Flat.*no nprobe"):
        Index.build(small, "auto", nprobe=9)


def test_remove_from_ivf_fast_scan_index(tmp_path):
    name, db = _desc(tmp_path / "db", 3000)
    folder = str(tmp_path / "fs.index")
    assert _cli("index", "build", name, "--kind", "IVF16,PQ8x4fs", "--nprobe", 16,
                "--out", folder) == 0
    index = Index.load(folder)
    q = db[:20]
    before = index.search(q, k=5)
    gone = sorted({n for row in before.names for n in row[:2]})
    assert _cli("index", "remove", folder, *gone) == 0
    index = Index.load(folder)  # the folder is consistent (load checks the counts)
    assert len(index) == index.index.ntotal == 3000 - len(gone)
    after = index.search(q, k=5)
    assert not set(gone) & {n for row in after.names for n in row}
    assert index.add(_desc(tmp_path / "more", 50, seed=3, prefix="x")[0]) == 50
    assert len(index) == index.index.ntotal == 3050 - len(gone)
    index.save(folder)
    assert Index.load(folder).search(q, k=3).ids.shape == (20, 3)
    with pytest.raises(InputError, match="fast-scan"):  # faiss would crash: refused
        Index.load(folder).reconstruct(np.array([index.ids[0]]))
    assert os.path.isfile(index_files(folder)["index.faiss"])
    refined = str(tmp_path / "rf.index")  # the refine stage keeps vectors: reconstruct works
    Index.build(name, "IVF16,PQ8x4fs,RFlat").save(refined)
    np.testing.assert_array_equal(Index.load(refined).reconstruct(np.array([5])), db[5:6])


def test_index_folder_and_bare_index_are_built_alike(tmp_path):
    """``Index.build`` and ``search.build_index`` share one builder: same sample, same
    training, same search parameters, same results."""
    from finegrain.retrieval.search import build_index
    path, x = _desc(tmp_path / "db", 1200)
    folder = Index.build(path, "IVF16,Flat", train_size=700, nprobe=4, seed=3)
    bare = build_index(x, "IVF16,Flat", train_size=700, nprobe=4, seed=3)
    c1 = faiss.extract_index_ivf(folder.index).quantizer.reconstruct_n(0, 16)
    c2 = faiss.extract_index_ivf(bare).quantizer.reconstruct_n(0, 16)
    np.testing.assert_array_equal(c1, c2)
    assert folder.manifest["train_size"] == 700
    assert faiss.extract_index_ivf(bare).nprobe == 4
    r = folder.search(x[:5], 10)
    np.testing.assert_array_equal(r.ids, bare.search(x[:5], 10)[1])
