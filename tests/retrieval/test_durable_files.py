"""Retrieval files that a kill or a damaged disk cannot tear: an ``index add`` killed at any
step of its save leaves the previous index (or the new one) searchable, never a mix; a
truncated shard, descriptor array or ``index.faiss`` is one paragraph naming the file; a full
disk keeps the previous index."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from finegrain import atomic
from finegrain.atomic import DiskFullError
from finegrain.cli import main
from finegrain.errors import EXIT_USER_ERROR, InputError
from finegrain.retrieval.descriptors import load_descriptors, save_descriptors
from finegrain.retrieval.index import Index, index_files

PRE = {"resize": "longest_side", "img_size": 64, "upscale": False, "scales": [1.0],
       "mean": [0.5] * 3, "std": [0.5] * 3}


def _descriptors(path, n, offset=0, dim=16):
    rng = np.random.default_rng(offset)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    save_descriptors(path, x, [f"im{offset + i}" for i in range(n)], model_name="m",
                     checkpoint_hash="h", preprocessing=PRE)
    return x


# a child process that adds descriptors to an index and SIGKILLs itself at the n-th step of
# the save (a rename, an fsync or a removal): the instants at which files change
_KILLED_ADD = textwrap.dedent("""
    import os, signal, sys
    from finegrain.retrieval.index import Index
    folder, extra, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps = [0]
    def counted(fn):
        def wrapped(*a, **k):
            if steps[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            steps[0] += 1
            return fn(*a, **k)
        return wrapped
    index = Index.load(folder)
    index.add(extra)
    os.replace, os.fsync, os.remove = counted(os.replace), counted(os.fsync), counted(os.remove)
    index.save(folder)
    print("steps", steps[0])
""")


def _add(folder, extra, n):
    return subprocess.run([sys.executable, "-c", _KILLED_ADD, str(folder), str(extra), str(n)],
                          capture_output=True, text=True, timeout=120)


def test_a_killed_index_add_leaves_the_previous_index_searchable(tmp_path):
    _descriptors(tmp_path / "db", 40)
    extra = _descriptors(tmp_path / "more", 10, offset=40)
    probe = tmp_path / "probe"  # not killed: counts the steps of one save
    Index.build(load_descriptors(tmp_path / "db"), "Flat").save(str(probe))
    total = int(_add(probe, tmp_path / "more", 10 ** 6).stdout.split()[-1])
    assert total >= 8  # three data files (write, fsync, rename, folder fsync) + the manifest
    seen = set()
    for n in range(total):
        case = tmp_path / f"k{n}"
        Index.build(load_descriptors(tmp_path / "db"), "Flat").save(str(case))
        r = _add(case, tmp_path / "more", n)
        assert r.returncode == -9, (n, r.stderr[-400:])
        index = Index.load(str(case))  # never "index.faiss holds ... but ids.json ..."
        assert len(index) in (40, 50), n
        seen.add(len(index))
        hits = index.search(extra[:2], k=1)
        if len(index) == 50:
            assert hits.names[0][0] == "im40" and hits.names[1][0] == "im41"
        # the next save works and clears what the kill left
        index.save(str(case))
        assert not [f for f in os.listdir(case) if ".tmp-" in f]
        assert sorted(os.listdir(case)) == sorted(os.path.basename(p) for p in
                                                   index_files(str(case)).values())
    assert seen == {40, 50}  # kills before the commit keep the old, after it the new


def test_a_full_disk_during_an_index_save_keeps_the_previous_index(tmp_path, monkeypatch):
    _descriptors(tmp_path / "db", 20)
    _descriptors(tmp_path / "more", 5, offset=20)
    folder = str(tmp_path / "ix")
    Index.build(load_descriptors(tmp_path / "db"), "Flat").save(folder)
    index = Index.load(folder)
    index.add(str(tmp_path / "more"))
    write = atomic._write_file

    def full(tmp, data):  # the disk fills while ids.G.json is written
        if os.path.basename(tmp).startswith(".ids."):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(tmp, data)
    monkeypatch.setattr(atomic, "_write_file", full)
    with pytest.raises(DiskFullError, match=r"no space left .* while writing ids\.2\.json"):
        index.save(folder)
    monkeypatch.undo()
    assert len(Index.load(folder)) == 20  # the previous index, whole


def test_truncated_files_are_named(tmp_path, capsys):
    _descriptors(tmp_path / "db", 30)
    npy = tmp_path / "db.npy"
    data = npy.read_bytes()
    npy.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=r"db\.npy \(\d+ bytes\) is truncated or damaged"):
        load_descriptors(tmp_path / "db")
    npy.write_bytes(data)
    folder = str(tmp_path / "ix")
    assert main(["index", "build", str(tmp_path / "db"), "--kind", "Flat", "--out",
                 folder]) == 0
    faiss_file = index_files(folder)["index.faiss"]
    blob = open(faiss_file, "rb").read()
    open(faiss_file, "wb").write(blob[:len(blob) // 3])
    _descriptors(tmp_path / "q", 2, offset=99)
    assert main(["index", "search", folder, str(tmp_path / "q")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert os.path.basename(faiss_file) in err and "truncated or damaged" in err
    assert "Traceback" not in err


def test_a_truncated_shard_is_named_by_index_build(tmp_path, capsys):
    """A manifest whose shard lost its tail (numpy: 'mmap length is greater than file
    size'): ``index build`` names the shard and says how to recompute it."""
    _descriptors(tmp_path / "whole", 12)
    d = load_descriptors(tmp_path / "whole")
    shards = tmp_path / "set.shards"
    shards.mkdir()
    entries = []
    for i, a in enumerate(range(0, 12, 4)):
        np.save(shards / f"{i:06d}.npy", np.asarray(d.vectors[a:a + 4]))
        entries.append({"path": f"set.shards/{i:06d}.npy", "count": 4})
    meta = {**d.meta, "format": "finegrain-descriptor-manifest", "shards": entries,
            "skipped": []}
    (tmp_path / "set.manifest.json").write_text(json.dumps(meta))
    assert len(load_descriptors(tmp_path / "set.manifest.json")) == 12
    shard = shards / "000001.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["index", "build", str(tmp_path / "set"), "--kind", "Flat", "--out",
                 str(tmp_path / "ix")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "000001.npy" in err and "truncated or damaged" in err and "finegrain embed" in err
    assert not (tmp_path / "ix").exists() or not os.listdir(tmp_path / "ix")


def test_a_folder_of_the_older_layout_still_opens_and_is_upgraded_on_save(tmp_path):
    _descriptors(tmp_path / "db", 10)
    folder = str(tmp_path / "ix")
    Index.build(load_descriptors(tmp_path / "db"), "Flat").save(folder)
    files = index_files(folder)
    head = json.load(open(files["index.json"]))
    for role, path in files.items():  # rename to the fixed names of older folders
        if role != "index.json":
            os.replace(path, os.path.join(folder, role))
    head.pop("files"), head.pop("generation")
    json.dump(head, open(files["index.json"], "w"))
    index = Index.load(folder)
    assert len(index) == 10
    index.save(folder)
    assert sorted(os.listdir(folder)) == ["descriptors.1.json", "ids.1.json", "index.1.faiss",
                                          "index.json"]
    assert len(Index.load(folder)) == 10
