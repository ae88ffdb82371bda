"""End-to-end Revisited evaluation on the generated landmark set (in-process, tiny model)."""

import json
import os

import numpy as np
import pytest
import torch

from finegrain import create_model
from finegrain.data import build_dataset
from finegrain.data.synthetic_landmarks import LandmarksConfig, generate_landmarks
from finegrain.evaluation.revisited import evaluate
from finegrain.models.tiny import tiny_kwargs
from finegrain.errors import InputError
from finegrain.retrieval.descriptors import DescriptorMismatch, load_descriptors, save_descriptors
from finegrain.retrieval.pipeline import (ExtractOptions, PictureOptions, PostprocessOptions,
                                          format_table, rank_database, retrieval_eval)

SMALL = LandmarksConfig(num_landmarks=3, queries_per_landmark=2, easy_per_landmark=2,
                        hard_per_landmark=2, junk_per_landmark=1, num_distractors=5,
                        train_per_landmark=2, extra_train=0)
# the shared tiny DALG at 64 px, the scale of the generated landmark images
TINY = {**tiny_kwargs("dalg_deit_tiny_patch16_224"), "num_classes": 4, "img_size": 64}
PRE = {"resize": "longest_side", "img_size": 64, "upscale": False, "scales": [1.0],
       "mean": [0.5] * 3,
       "std": [0.5] * 3}
# queries cropped to bbx, crops scaled by their full image's factor (what 'embed' records)
PRE_Q = {**PRE, "crop_query_bbx": True, "crop_scale": "full_image"}
KEYS = {"mAP", "mP@1", "mP@5", "mP@10"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_landmarks(str(tmp_path_factory.mktemp("lm")), SMALL)


def _oracle(root, tmp_path, dim=16):
    """Descriptors that encode the ground truth: a landmark's queries, positives and junk
    share one direction, every other image has its own."""
    q = build_dataset("synthetic_landmarks", root, "query")
    n_db, nq = len(q.imlist), len(q.qimlist)
    eye = np.eye(dim + n_db, dtype=np.float32)
    lm_of_q = [q.gnd[i]["easy"][0] for i in range(nq)]  # any positive identifies the landmark
    owner = {}
    for i, g in enumerate(q.gnd):
        for j in list(g["easy"]) + list(g["hard"]) + list(g["junk"]):
            owner[j] = lm_of_q[i]
    db = np.stack([eye[owner.get(j, j) + dim] for j in range(n_db)])
    qv = np.stack([eye[lm_of_q[i] + dim] for i in range(nq)])
    meta = dict(model_name="oracle", checkpoint_hash="gt", dataset="synthetic_landmarks")
    save_descriptors(tmp_path / "q", qv, q.qimlist, split="query", preprocessing=PRE_Q, **meta)
    save_descriptors(tmp_path / "g", db, q.imlist, split="gallery", preprocessing=PRE, **meta)
    return str(tmp_path / "q"), str(tmp_path / "g"), q


def test_end_to_end_tiny_model(root, tmp_path):
    torch.manual_seed(0)
    model = create_model("dalg_deit_tiny_patch16_224", **TINY)
    out = tmp_path / "eval"
    metrics = retrieval_eval(model, "synthetic_landmarks", root, out=str(out),
                             extract=ExtractOptions(img_size=64, progress=False),
                             picture=PictureOptions("best", queries=2))
    assert set(metrics) == {"easy", "medium", "hard"}
    for m in metrics.values():
        assert set(m) == KEYS and all(0.0 <= v <= 1.0 for v in m.values())
    report = json.loads((out / "retrieval.json").read_text())
    assert report["metrics"] == metrics and report["num_queries"] == 6
    assert report["model_name"] == "dalg_deit_tiny_patch16_224"
    assert report["preprocessing"]["img_size"] == 64
    assert os.path.getsize(out / "top10.png") > 10_000
    best = report["picture_queries"]
    aps = report["ap_medium"]
    assert aps[best[0]] == max(aps)
    # the descriptors written beside the metrics reproduce the numbers without a model
    again = retrieval_eval(None, "synthetic_landmarks", root, picture=PictureOptions("none"),
                           query_descriptors=str(out / "query"),
                           gallery_descriptors=str(out / "gallery"))
    assert again == metrics
    assert "medium" in format_table(metrics)


def test_oracle_descriptors_give_map_one(root, tmp_path):
    qn, gn, _ = _oracle(root, tmp_path)
    metrics = retrieval_eval(None, "synthetic_landmarks", root, query_descriptors=qn,
                             gallery_descriptors=gn, out=str(tmp_path / "o"),
                             picture=PictureOptions("worst"))
    for setting in ("easy", "medium", "hard"):
        assert metrics[setting]["mAP"] == pytest.approx(1.0)
        assert metrics[setting]["mP@1"] == pytest.approx(1.0)
    assert (tmp_path / "o" / "top10.png").is_file()


def test_report_holds_the_reranking_parameters_as_used(root, tmp_path):
    """retrieval.json gives k1, k2, lambda, rerank_k, aqe_n, aqe_alpha as passed, not the
    defaults; the metrics are those of rank_database with the same options."""
    qn, gn, q = _oracle(root, tmp_path)
    post = PostprocessOptions(aqe=True, aqe_n=2, aqe_alpha=2.0, rerank=True, rerank_k=7, k1=6,
                              k2=3, lambda_value=0.5)
    retrieval_eval(None, "synthetic_landmarks", root, query_descriptors=qn,
                   gallery_descriptors=gn, out=str(tmp_path / "r"), post=post,
                   picture=PictureOptions("none"))
    rep = json.loads((tmp_path / "r" / "retrieval.json").read_text())
    assert rep["aqe"] == {"n": 2, "alpha": 2.0}
    assert rep["rerank"] == {"k": 7, "k1": 6, "k2": 3, "lambda": 0.5}
    plain = tmp_path / "p"
    retrieval_eval(None, "synthetic_landmarks", root, query_descriptors=qn,
                   gallery_descriptors=gn, out=str(plain), picture=PictureOptions("none"))
    rep = json.loads((plain / "retrieval.json").read_text())
    assert rep["aqe"] is None and rep["rerank"] is None


def test_distractors_appended_and_checked(root, tmp_path):
    qn, gn, q = _oracle(root, tmp_path, dim=40)
    rng = np.random.default_rng(0)
    dis = rng.standard_normal((30, 40 + len(q.imlist))).astype(np.float32)
    dis[:, 40:] = 0  # orthogonal to every landmark direction
    dis /= np.linalg.norm(dis, axis=1, keepdims=True)
    save_descriptors(tmp_path / "r1m", dis, [f"d{i}" for i in range(30)], model_name="oracle",
                     checkpoint_hash="gt", preprocessing=PRE, dataset="revisitop1m",
                     split="gallery")
    m = retrieval_eval(None, "synthetic_landmarks", root, distractors=str(tmp_path / "r1m"),
                       query_descriptors=qn, gallery_descriptors=gn, out=str(tmp_path / "d"))
    assert m["medium"]["mAP"] == pytest.approx(1.0)
    rep = json.loads((tmp_path / "d" / "retrieval.json").read_text())
    assert rep["num_distractors"] == 30
    save_descriptors(tmp_path / "bad", dis, [f"d{i}" for i in range(30)], model_name="other",
                     checkpoint_hash="gt", preprocessing=PRE, dataset="revisitop1m",
                     split="gallery")
    with pytest.raises(DescriptorMismatch, match="model_name"):
        retrieval_eval(None, "synthetic_landmarks", root, distractors=str(tmp_path / "bad"),
                       query_descriptors=qn, gallery_descriptors=gn)


def test_distractors_must_be_the_r1m_set_and_disjoint_from_the_ground_truth(root, tmp_path):
    """The gallery file passed as distractors (every positive a second time, unlabelled) or a
    file of another set is refused, naming the file and the fix; it used to be appended and
    mAP fell (5.2 -> 2.6 Medium on a real run)."""
    qn, gn, q = _oracle(root, tmp_path)
    kw = dict(query_descriptors=qn, gallery_descriptors=gn, picture=PictureOptions("none"))
    with pytest.raises(InputError, match=r"dataset 'synthetic_landmarks', split 'gallery'.*"
                                         r"finegrain embed CKPT --dataset revisitop1m"):
        retrieval_eval(None, "synthetic_landmarks", root, distractors=gn, **kw)
    gallery = load_descriptors(gn)
    names = [f"d{i}" for i in range(len(gallery) - 1)] + [q.imlist[3]]
    save_descriptors(tmp_path / "r1m", np.asarray(gallery.vectors), names, model_name="oracle",
                     checkpoint_hash="gt", preprocessing=PRE, dataset="revisitop1m",
                     split="gallery")
    with pytest.raises(InputError, match=rf"1 of its names are synthetic_landmarks images "
                                         rf"\(first: '{q.imlist[3]}'\).*disjoint"):
        retrieval_eval(None, "synthetic_landmarks", root, distractors=str(tmp_path / "r1m"),
                       **kw)
    save_descriptors(tmp_path / "r1m", np.asarray(gallery.vectors), names[:-1] + ["d_last"],
                     model_name="oracle", checkpoint_hash="gt", preprocessing=PRE,
                     dataset="revisitop1m", split="gallery")
    out = tmp_path / "ok"  # disjoint names of the R1M set: accepted, appended after the database
    retrieval_eval(None, "synthetic_landmarks", root, distractors=str(tmp_path / "r1m"),
                   out=str(out), **kw)
    assert json.loads((out / "retrieval.json").read_text())["num_distractors"] == len(names)


def test_rank_database_with_aqe_and_rerank_are_full_permutations(root, tmp_path):
    rng = np.random.default_rng(1)
    db = rng.standard_normal((40, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:3] + 0.1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    plain = rank_database(q, db)
    np.testing.assert_array_equal(plain[:, 0], np.argsort(-(db @ q[0]), kind="stable"))
    for kw in (dict(aqe=True, aqe_n=2), dict(rerank=True, rerank_k=10),
               dict(aqe=True, rerank=True, rerank_k=10)):
        r = rank_database(q, db, PostprocessOptions(**kw))
        assert r.shape == (40, 3)
        assert all(sorted(r[:, i]) == list(range(40)) for i in range(3))
    r = rank_database(q, db, PostprocessOptions(rerank=True, rerank_k=10))
    np.testing.assert_array_equal(r[10:], plain[10:])  # only the shortlist moves
    assert all(set(r[:10, i]) == set(plain[:10, i]) for i in range(3))


def test_oracle_ranking_through_the_metric(root):
    """The ranking layout the pipeline produces (n_db, nq) is what evaluate expects."""
    q = build_dataset("synthetic_landmarks", root, "query")
    n = len(q.imlist)
    cols = []
    for g in q.gnd:
        head = list(g["easy"]) + list(g["hard"]) + list(g["junk"])
        cols.append(head + [j for j in range(n) if j not in head])
    m = evaluate(np.array(cols).T, q.gnd)
    assert all(m[s]["mAP"] == pytest.approx(1.0) for s in m)
    worst = evaluate(np.array(cols).T[::-1].copy(), q.gnd)
    assert worst["medium"]["mAP"] < 0.5


@pytest.fixture
def roxford_files(tmp_path, shared_data):
    """Real roxford5k ground truth (no images needed) and random descriptor files of it."""
    import shutil
    root = tmp_path / "roxford5k"
    os.makedirs(root / "jpg")
    shutil.copy(shared_data / "revisitop" / "gnd_roxford5k.pkl", root)
    q = build_dataset("roxford5k", str(root), "query")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((11, 32)).astype(np.float32)
    db = centres[np.arange(len(q.imlist)) % 11] + rng.standard_normal(
        (len(q.imlist), 32)).astype(np.float32)
    qv = centres[np.arange(70) % 11] + 0.5 * rng.standard_normal((70, 32)).astype(np.float32)
    meta = dict(model_name="m", checkpoint_hash="h", dataset="roxford5k")
    save_descriptors(tmp_path / "q", qv / np.linalg.norm(qv, axis=1, keepdims=True),
                     q.qimlist, split="query", preprocessing=PRE_Q, **meta)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    save_descriptors(tmp_path / "g", db, q.imlist, split="gallery", preprocessing=PRE, **meta)
    return str(root), tmp_path, db, q


def test_descriptor_files_are_matched_by_name_on_real_gnd(roxford_files):
    """A valid gallery file in another order gives the same metrics (an order
    mismatch once dropped Medium mAP silently); names missing from the ground truth are refused."""
    root, tmp, db, q = roxford_files
    kw = dict(query_descriptors=str(tmp / "q"), picture=PictureOptions("none"))
    ref = retrieval_eval(None, "roxford5k", root, gallery_descriptors=str(tmp / "g"), **kw)
    perm = np.random.default_rng(1).permutation(len(db))
    save_descriptors(tmp / "shuffled", db[perm], [q.imlist[i] for i in perm],
                     model_name="m", checkpoint_hash="h", preprocessing=PRE,
                     dataset="roxford5k", split="gallery")
    got = retrieval_eval(None, "roxford5k", root, gallery_descriptors=str(tmp / "shuffled"),
                         **kw)
    assert got == ref and 0 < ref["medium"]["mAP"] < 1
    names = list(q.imlist)
    names[17] = "not_an_oxford_image"
    save_descriptors(tmp / "renamed", db, names, model_name="m", checkpoint_hash="h",
                     preprocessing=PRE, dataset="roxford5k", split="gallery")
    with pytest.raises(ValueError, match=f"{q.imlist[17]}.*has no descriptor.*finegrain embed"):
        retrieval_eval(None, "roxford5k", root, gallery_descriptors=str(tmp / "renamed"), **kw)


@pytest.mark.parametrize("field,value,message", [
    ("dataset", "rparis6k", "dataset 'rparis6k', not 'roxford5k'"),
    ("split", "gallery", "split 'gallery', not 'query'"),
    ("crop_query_bbx", False, "not cropped to their bbx"),
    ("crop_scale", None, "not scaled by their full image's factor")])
def test_query_file_of_another_dataset_or_convention_is_refused(roxford_files, field, value,
                                                                message):
    root, tmp, _, q = roxford_files
    from finegrain.retrieval.descriptors import load_descriptors
    d = load_descriptors(tmp / "q")
    meta = {k: v for k, v in d.meta.items() if k not in ("format", "version", "count", "dim",
                                                         "dtype", "names", "labels")}
    if field in ("dataset", "split"):
        meta[field] = value
    else:
        meta["preprocessing"] = {**meta["preprocessing"], field: value}
    save_descriptors(tmp / "bad", np.asarray(d.vectors), d.names, **meta)
    with pytest.raises(ValueError, match=message) as e:
        retrieval_eval(None, "roxford5k", root, query_descriptors=str(tmp / "bad"),
                       gallery_descriptors=str(tmp / "g"), picture=PictureOptions("none"))
    assert "bad.json" in str(e.value) and "--dataset roxford5k" in str(e.value)
