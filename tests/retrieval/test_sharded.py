"""Past one machine: ``finegrain embed`` on Lightning's predict loop. Two DDP
processes (CPU, gloo) write the descriptors of one process, in the same name order; a killed
extraction resumes without recomputing finished shards; a manifest is read as one memory-mapped
set by ``index build``, ``index search`` and ``retrieval eval``."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from finegrain.data.synthetic_landmarks import generate_landmarks
from finegrain.loading import open_model
from finegrain.retrieval.descriptors import ConcatRows, load_descriptors
from finegrain.retrieval.extract import embed_dataset
from finegrain.retrieval.sharded import embed_sharded, finished_shards, shard_folder

from .test_commands import SMALL, _ckpt, main
from .test_descriptors import with_old_names

OPTS = dict(img_size=64, num_workers=0, progress=False, accelerator="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    root = generate_landmarks(str(tmp / "data"), SMALL)
    ck, _ = _ckpt(tmp / "a.ckpt", 0)
    return tmp, root, ck


def test_concat_rows_reads_like_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 1, 5)]
    full, lazy = np.concatenate(parts), ConcatRows(parts)
    assert lazy.shape == full.shape and len(lazy) == 9 and lazy.ndim == 2
    for key in (0, 3, -1, slice(1, 2), slice(2, 8), slice(None), slice(1, 9, 3), slice(5, 2),
                np.array([8, 0, 3, 3]), [4], full[:, 0] > 0, (slice(2, 6), 1),
                (np.array([1, 7]), slice(0, 2)), (4, 2)):
        np.testing.assert_array_equal(lazy[key], full[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(lazy), full)
    assert lazy[0:3].base is not None  # within one shard: a view, not a copy
    with pytest.raises(IndexError):
        lazy[9]


def test_two_processes_write_the_descriptors_of_one(setup):
    """2 CPU processes on gloo (ddp_spawn) with shards of 4 images: the same names in the same
    order and the same descriptors as one process."""
    tmp, root, ck = setup
    one = embed_sharded(ck, "synthetic_landmarks", root, "gallery", str(tmp / "one"),
                        shard_size=4, **OPTS)
    assert one["computed"] == one["count"] and not os.path.exists(shard_folder(tmp / "one"))
    assert os.path.isfile(tmp / "one.npy") and os.path.isfile(tmp / "one.json")
    assert not os.path.exists(tmp / "one.manifest.json")
    # the CLI: 2 processes, shards kept with their manifest
    assert main(["embed", ck, "--dataset", "synthetic_landmarks", "--root", root, "--split",
                 "gallery", "--out", str(tmp / "two"), "--img-size", "64", "--accelerator",
                 "cpu", "--devices", "2", "--strategy", "ddp_spawn", "--num-workers", "0",
                 "--shard-size", "4", "--no-merge"]) == 0
    a, b = load_descriptors(tmp / "one"), load_descriptors(tmp / "two")
    assert os.path.isfile(tmp / "two.manifest.json") and not os.path.exists(tmp / "two.npy")
    ranks = {json.load(open(os.path.join(shard_folder(tmp / "two"), f)))["rank"]
             for f in os.listdir(shard_folder(tmp / "two")) if f.endswith(".json")}
    assert ranks == {0, 1}  # both processes wrote shards
    assert isinstance(b.vectors, ConcatRows) and len(b.vectors.parts) == -(-len(a) // 4)
    assert b.names == a.names and b.labels == a.labels
    np.testing.assert_allclose(np.asarray(b.vectors), np.asarray(a.vectors), atol=1e-6)
    assert b.meta["checkpoint_hash"] == a.meta["checkpoint_hash"] and b.path == str(tmp / "two")
    # same shards, same grouping: the rows are bit-identical to one process
    np.testing.assert_array_equal(np.asarray(b.vectors), np.asarray(a.vectors))


def _r1m_folder(folder, landmarks_root) -> str:
    """An R1M-layout distractor set (``revisitop1m.txt`` + ``jpg/``) of five of the generated
    gallery's images under R1M-style names."""
    src = sorted(glob.glob(os.path.join(landmarks_root, "jpg", "*.jpg")))[:5]
    rels = [f"{i:x}/{i:02x}/{i:012x}.jpg" for i in range(len(src))]
    for s, r in zip(src, rels):
        os.makedirs(os.path.dirname(os.path.join(folder, "jpg", r)), exist_ok=True)
        shutil.copy(s, os.path.join(folder, "jpg", r))
    with open(os.path.join(folder, "revisitop1m.txt"), "w") as f:
        f.write("\n".join(rels) + "\n")
    return str(folder)


def test_manifest_is_read_as_one_set_by_index_and_retrieval_eval(setup):
    tmp, root, ck = setup
    embed_sharded(ck, "synthetic_landmarks", root, "gallery", str(tmp / "merged"),
                  shard_size=4, **OPTS)
    embed_sharded(ck, "synthetic_landmarks", root, "gallery", str(tmp / "sharded"),
                  shard_size=4, merge=False, **OPTS)
    assert isinstance(load_descriptors(tmp / "sharded").vectors, ConcatRows)
    assert load_descriptors(str(tmp / "sharded.manifest.json")).names == load_descriptors(
        tmp / "merged").names
    # one process, one shard: the rows of the in-process extraction (extract), bit for bit;
    # smaller shards group images differently (float rounding only)
    loaded = open_model(ck)
    model, meta = loaded.model, loaded.meta
    ref, names, _, _, _ = embed_dataset(model, "synthetic_landmarks", root, "gallery",
                                        img_size=64, meta=meta, batch_size=16, progress=False)
    embed_sharded(ck, "synthetic_landmarks", root, "gallery", str(tmp / "whole"), **OPTS)
    assert load_descriptors(tmp / "whole").names == names
    np.testing.assert_array_equal(np.asarray(load_descriptors(tmp / "whole").vectors), ref)
    np.testing.assert_allclose(np.asarray(load_descriptors(tmp / "merged").vectors), ref,
                               atol=1e-6)
    # index build / search and retrieval eval read the manifest as one descriptor set
    embed_sharded(ck, "synthetic_landmarks", root, "query", str(tmp / "q"), shard_size=2,
                  merge=False, **OPTS)
    r1m = _r1m_folder(tmp / "r1m", root)
    for name in ("merged", "sharded"):
        embed_sharded(ck, "revisitop1m", r1m, "gallery", str(tmp / f"r1m_{name}"),
                      shard_size=2, merge=name == "merged", **OPTS)
        ix = str(tmp / f"{name}.index")
        assert main(["index", "build", str(tmp / name), "--out", ix]) == 0
        assert main(["index", "search", ix, str(tmp / "q"), "-k", "5",
                     "--out", str(tmp / f"{name}.res.json")]) == 0
        assert main(["retrieval", "eval", "--dataset", "synthetic_landmarks", "--root", root,
                     "--queries", str(tmp / "q"), "--gallery", str(tmp / name),
                     "--distractors", str(tmp / f"r1m_{name}"), "--out",
                     str(tmp / f"ev_{name}"), "--picture", "none"]) == 0
    res = [json.loads((tmp / f"{n}.res.json").read_text())["queries"]
           for n in ("merged", "sharded")]
    assert res[0] == res[1]
    ev = [json.loads((tmp / f"ev_{n}" / "retrieval.json").read_text())["metrics"]
          for n in ("merged", "sharded")]
    assert ev[0] == ev[1]


class _Counting:
    """Counts the images the wrapped model is run on (its forward calls)."""

    def __init__(self, model):
        self.model, self.images = model, 0

    def wrap(self):
        counter, inner = self, self.model
        orig = inner.forward

        def forward(x, *a, **k):
            counter.images += x.shape[0]
            return orig(x, *a, **k)
        inner.forward = forward
        return inner


def test_killed_extraction_resumes_without_recomputing_finished_shards(setup):
    tmp, root, ck = setup
    out = str(tmp / "res")
    loaded = open_model(ck)
    model, meta = loaded.model, loaded.meta
    c = _Counting(model)
    first = embed_sharded(ck, "synthetic_landmarks", root, "gallery", out, shard_size=4,
                          merge=False, model=c.wrap(), meta=meta, **OPTS)
    n = first["count"]
    assert c.images == n and first["resumed"] == 0
    ref = np.asarray(load_descriptors(out).vectors)
    first_names = load_descriptors(out).names
    folder = shard_folder(out)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".npy"))
    assert len(shards) == -(-n // 4)
    mtimes = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in shards}
    # a kill: shard 1 lost its rows, shard 2 was being written (a .tmp, no JSON), and the
    # manifest of the end was never written
    os.remove(os.path.join(folder, "000001.npy"))
    os.replace(os.path.join(folder, "000002.npy"), os.path.join(folder, ".000002.npy.tmp-99"))
    shutil.copy(os.path.join(folder, ".000002.npy.tmp-99"), os.path.join(folder, "000002.npy.tmp"))
    os.remove(os.path.join(folder, "000002.json"))
    os.remove(out + ".manifest.json")
    c.images = 0
    again = embed_sharded(ck, "synthetic_landmarks", root, "gallery", out, shard_size=4,
                          merge=False, model=model, meta=meta, **OPTS)
    assert c.images == 8 and again["computed"] == 8  # shards 1 and 2 only
    assert again["resumed"] == len(shards) - 2
    now = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in shards}
    assert all(now[f] == mtimes[f] for f in shards if f not in ("000001.npy", "000002.npy"))
    assert not any(".tmp" in f for f in os.listdir(folder))
    d = load_descriptors(out)
    assert d.names == first_names and isinstance(d.vectors, ConcatRows)
    np.testing.assert_array_equal(np.asarray(d.vectors), ref)
    # nothing left to compute: the re-run only merges (into the single-process files)
    c.images = 0
    last = embed_sharded(ck, "synthetic_landmarks", root, "gallery", out, shard_size=4,
                         model=model, meta=meta, **OPTS)
    assert c.images == 0 and last["resumed"] == len(shards)
    d = load_descriptors(out)
    assert isinstance(d.vectors, np.memmap) and d.names == first_names
    np.testing.assert_array_equal(np.asarray(d.vectors), ref)
    assert not os.path.exists(folder) and not os.path.exists(out + ".manifest.json")


def test_shards_of_another_extraction_are_refused(setup):
    tmp, root, ck = setup
    out = str(tmp / "other")
    embed_sharded(ck, "synthetic_landmarks", root, "query", out, shard_size=2, merge=False,
                  **OPTS)
    os.remove(out + ".manifest.json")
    with pytest.raises(ValueError, match="another extraction .*img_size|preprocessing"):
        embed_sharded(ck, "synthetic_landmarks", root, "query", out, shard_size=2,
                      **{**OPTS, "img_size": 48})
    with pytest.raises(ValueError, match="start over"):
        embed_sharded(ck, "synthetic_landmarks", root, "query", out, shard_size=3, **OPTS)
    js = os.path.join(shard_folder(out), "000000.json")
    meta = json.load(open(js))
    with open(js, "w") as f:  # a block of other images (another dataset root, say)
        json.dump({**meta, "names": meta["names"][::-1]}, f)
    with pytest.raises(ValueError, match="names"):
        embed_sharded(ck, "synthetic_landmarks", root, "query", out, shard_size=2, **OPTS)
    with open(js, "w") as f:
        json.dump(meta, f)
    # shards written before 2026-11-30 say preprocessing.image_size: still the same extraction
    for f in os.listdir(shard_folder(out)):
        if f.endswith(".json"):
            with_old_names(os.path.join(shard_folder(out), f))
    assert "image_size" in json.load(open(js))["preprocessing"]
    # the same extraction resumes: every shard is finished, only the merge is left
    info = embed_sharded(ck, "synthetic_landmarks", root, "query", out, shard_size=2, **OPTS)
    assert info["computed"] == 0 and info["resumed"] == info["shards"]
    assert len(load_descriptors(out)) == info["count"]
    assert json.load(open(out + ".json"))["preprocessing"]["img_size"] == 64  # today's name
    assert finished_shards(out, [], {}) == []


def test_unreadable_image_drops_its_row_and_name_in_its_shard(setup, tmp_path):
    import shutil
    tmp, root, ck = setup
    copy = tmp_path / "lm"
    shutil.copytree(root, copy)
    ref = load_descriptors(tmp / "merged")
    bad = 5
    with open(copy / "jpg" / f"{ref.names[bad]}.jpg", "wb") as f:
        f.write(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped"):
        embed_sharded(ck, "synthetic_landmarks", str(copy), "gallery", str(tmp_path / "s"),
                      shard_size=4, merge=False, on_error="skip", **OPTS)
    d = load_descriptors(tmp_path / "s")
    assert d.names == ref.names[:bad] + ref.names[bad + 1:] and d.meta["skipped"] == [bad]
    np.testing.assert_array_equal(np.asarray(d.vectors),
                                  np.delete(np.asarray(ref.vectors), bad, axis=0))
