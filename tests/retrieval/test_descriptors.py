"""Descriptor files: NAME.npy (memory-mapped float32) + NAME.json, and the compatibility check."""

import json

import numpy as np
import pytest

from finegrain.loading import checkpoint_hash
from finegrain.retrieval.descriptors import (DescriptorMismatch, check_compatible,
                                             descriptor_paths, load_descriptors, save_descriptors,
                                             signature)

PRE = {"resize": "longest_side", "img_size": 512, "upscale": False, "scales": [1.0],
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_query_bbx": False}


def _save(path, n=5, d=8, **kw):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float64)
    args = dict(model_name="dalg_x", checkpoint_hash="abc", preprocessing=PRE)
    args.update(kw)
    save_descriptors(path, x, [f"im{i}" for i in range(n)], labels=list(range(n)), **args)
    return x


def test_round_trip_memory_mapped(tmp_path):
    x = _save(tmp_path / "db", dataset="roxford5k", split="gallery")
    d = load_descriptors(tmp_path / "db.json")  # any of NAME, NAME.npy, NAME.json
    assert isinstance(d.vectors, np.memmap) and d.vectors.dtype == np.float32
    np.testing.assert_array_equal(d.vectors, x.astype(np.float32))
    assert d.names == [f"im{i}" for i in range(5)] and d.labels == list(range(5))
    assert d.meta["split"] == "gallery" and d.meta["dim"] == 8 and d.meta["count"] == 5
    assert d.meta["preprocessing"] == PRE
    assert descriptor_paths("a/b.npy") == ("a/b.npy", "a/b.json")


def with_old_names(path) -> None:
    """Rewrite a descriptor / manifest / shard JSON or an index manifest as files written
    before 2026-11-30 say it: ``preprocessing.image_size`` (the key kept in place)."""
    with open(path) as f:
        meta = json.load(f)
    meta["preprocessing"] = {("image_size" if k == "img_size" else k): v
                             for k, v in meta["preprocessing"].items()}
    with open(path, "w") as f:
        json.dump(meta, f)


def test_a_record_without_upscale_reads_as_the_enlarging_it_was_made_with(tmp_path):
    """Descriptors extracted before ``preprocessing.upscale`` existed enlarged small images;
    they read as ``upscale: true``, so today's (never enlarging) queries are refused
    against them instead of being compared with a differently scaled database."""
    _save(tmp_path / "old")
    meta = json.load(open(tmp_path / "old.json"))
    del meta["preprocessing"]["upscale"]
    json.dump(meta, open(tmp_path / "old.json", "w"))
    old = load_descriptors(tmp_path / "old")
    assert old.meta["preprocessing"]["upscale"] is True
    _save(tmp_path / "new")
    with pytest.raises(DescriptorMismatch, match="upscale"):
        check_compatible(load_descriptors(tmp_path / "new").meta, old.meta)
    _save(tmp_path / "again", preprocessing={**PRE, "upscale": True})
    check_compatible(load_descriptors(tmp_path / "again").meta, old.meta)


def test_a_file_saying_image_size_reads_as_img_size(tmp_path):
    x = _save(tmp_path / "old")
    _save(tmp_path / "new")
    with_old_names(tmp_path / "old.json")
    assert json.load(open(tmp_path / "old.json"))["preprocessing"]["image_size"] == 512
    old, new = load_descriptors(tmp_path / "old"), load_descriptors(tmp_path / "new")
    assert old.meta["preprocessing"] == PRE and list(old.meta["preprocessing"]) == list(PRE)
    np.testing.assert_array_equal(old.vectors, x.astype(np.float32))
    assert signature(old.meta) == signature(new.meta)
    assert signature(old.meta)["preprocessing.img_size"] == 512
    check_compatible(new.meta, old.meta)
    check_compatible(old.meta, new.meta)
    _save(tmp_path / "other", preprocessing={**PRE, "img_size": 256})
    with pytest.raises(DescriptorMismatch, match="img_size"):
        check_compatible(old.meta, load_descriptors(tmp_path / "other").meta)


def test_checkpoint_hash_is_sha256_prefix(tmp_path):
    import hashlib
    p = tmp_path / "x.ckpt"
    p.write_bytes(b"weights" * 1000)
    assert checkpoint_hash(p) == hashlib.sha256(b"weights" * 1000).hexdigest()[:16]


def test_compatibility_names_the_differing_field(tmp_path):
    _save(tmp_path / "a")
    _save(tmp_path / "b", preprocessing={**PRE, "crop_query_bbx": True})  # allowed to differ
    a, b = load_descriptors(tmp_path / "a"), load_descriptors(tmp_path / "b")
    check_compatible(a.meta, b.meta)
    _save(tmp_path / "c", checkpoint_hash="other")
    with pytest.raises(DescriptorMismatch, match="checkpoint_hash"):
        check_compatible(a.meta, load_descriptors(tmp_path / "c").meta)
    _save(tmp_path / "d", preprocessing={**PRE, "scales": [0.7071, 1.0, 1.4142]})
    with pytest.raises(DescriptorMismatch, match="preprocessing.scales"):
        check_compatible(a.meta, load_descriptors(tmp_path / "d").meta)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        save_descriptors(tmp_path / "x", np.zeros((2, 3)), ["a", "a"], "m", "h", PRE)
    with pytest.raises(ValueError, match="NaN"):
        save_descriptors(tmp_path / "x", np.full((1, 3), np.nan), ["a"], "m", "h", PRE)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_descriptors(tmp_path / "nope")
    _save(tmp_path / "y")
    meta = json.loads((tmp_path / "y.json").read_text())
    meta["count"] = 4
    (tmp_path / "y.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="out of sync"):
        load_descriptors(tmp_path / "y")
