"""The generated landmark set: Revisited layout, deterministic, sensible easy / hard / junk."""

import hashlib
import os
import pickle

import numpy as np
import pytest

from finegrain.data import build_dataset, list_datasets
from finegrain.data.synthetic_landmarks import (GND_NAME, LandmarksConfig, generate_landmarks,
                                                random_scene, render_view)
from finegrain.evaluation.revisited import load_gnd

SMALL = LandmarksConfig(num_landmarks=3, queries_per_landmark=1, easy_per_landmark=2,
                        hard_per_landmark=2, junk_per_landmark=1, num_distractors=4,
                        train_per_landmark=3, extra_train=1)


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f.endswith((".jpg", ".pkl", ".txt")):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_layout_and_reader(tmp_path):
    folder = generate_landmarks(str(tmp_path), SMALL)
    assert "synthetic_landmarks" in list_datasets()
    gnd = load_gnd(os.path.join(folder, GND_NAME))  # the evaluation's own loader reads it
    assert set(gnd) >= {"imlist", "qimlist", "gnd"} and len(gnd["qimlist"]) == 3
    assert len(gnd["imlist"]) == 3 * (2 + 2 + 1) + 4
    q = build_dataset("synthetic_landmarks", str(tmp_path), "query", config=SMALL)
    g = build_dataset("synthetic_landmarks", folder, "gallery")  # the tree itself works too
    t = build_dataset("synthetic_landmarks", folder, "train")
    assert len(q) == 3 and len(g) == 19 and len(t) == (3 + 1) * 3 and t.num_classes == 4
    assert q.task == "retrieval" and t.gnd == q.gnd
    seen = set()
    for i, e in enumerate(q.gnd):
        assert len(e["easy"]) == 2 and len(e["hard"]) == 2 and len(e["junk"]) == 1
        ids = set(e["easy"]) | set(e["hard"]) | set(e["junk"])
        assert not ids & seen  # each database view belongs to one landmark
        seen |= ids
        x1, y1, x2, y2 = e["bbx"]  # the reader crops the query to its bbx
        assert q.load_image(i).shape[1:] == (round(y2) - round(y1), round(x2) - round(x1))
    for ds in (q, g, t):
        sizes = [ds.load_image(i).shape[1:] for i in range(len(ds))]
        if ds is not q:
            assert all(64 <= min(s) and max(s) <= 128 for s in sizes)


def test_deterministic_and_cached(tmp_path):
    a = generate_landmarks(str(tmp_path / "a"), SMALL)
    b = generate_landmarks(str(tmp_path / "b"), SMALL)
    assert _digest(a) == _digest(b)
    mtime = os.path.getmtime(os.path.join(a, GND_NAME))
    assert generate_landmarks(str(tmp_path / "a"), SMALL) == a  # cached: not rewritten
    assert os.path.getmtime(os.path.join(a, GND_NAME)) == mtime
    c = generate_landmarks(str(tmp_path / "a"), LandmarksConfig(**{**SMALL.__dict__, "seed": 1}))
    assert c != a and _digest(c) != _digest(a)
    with open(os.path.join(a, GND_NAME), "rb") as f:
        assert pickle.load(f)["imlist"][0] == "db_0000"


def test_visibility_orders_easy_hard_junk():
    """By construction: easy views show the building best, junk views barely."""
    vis = {k: [] for k in ("easy", "hard", "junk")}
    for s in range(4):
        sc = random_scene(np.random.default_rng([9, s]))
        for kind in vis:
            for r in range(6):
                vis[kind].append(render_view(sc, kind, np.random.default_rng([s, r, len(kind)]),
                                             SMALL)[2])
    easy, hard, junk = (np.mean(vis[k]) for k in ("easy", "hard", "junk"))
    assert easy > hard > junk and junk < 0.05 and easy > 0.2


def test_unknown_split(tmp_path):
    from finegrain.data import DatasetError
    with pytest.raises(DatasetError, match="unknown split"):
        build_dataset("synthetic_landmarks", str(tmp_path), "test", config=SMALL)
