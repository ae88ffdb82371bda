"""The retrieval sub-commands, run in-process: embed, index build / search / add / remove,
retrieval eval, and the refusal of descriptors from another checkpoint."""

import argparse
import json

import numpy as np
import pytest
import torch

from finegrain import create_model
from finegrain.data.synthetic_landmarks import LandmarksConfig, generate_landmarks
from finegrain.models.tiny import tiny_kwargs
from finegrain.retrieval.commands import register
from finegrain.loading import checkpoint_hash
from finegrain.retrieval.descriptors import DescriptorMismatch, load_descriptors
from finegrain.retrieval.index import index_files

SMALL = LandmarksConfig(num_landmarks=3, queries_per_landmark=1, easy_per_landmark=2,
                        hard_per_landmark=1, junk_per_landmark=1, num_distractors=3,
                        train_per_landmark=2, extra_train=0)
# the shared tiny DALG at 64 px, the scale of the generated landmark images
KWARGS = {**tiny_kwargs("dalg_deit_tiny_patch16_224"), "num_classes": 4, "img_size": 64}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finegrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _ckpt(path, seed):
    """A finegrain checkpoint as the engine writes it: Lightning layout (``model.`` prefix)
    plus the self-description (``finegrain_meta``; also under ``hyper_parameters.meta``)."""
    torch.manual_seed(seed)
    model = create_model("dalg_deit_tiny_patch16_224", **KWARGS)
    meta = {"model_name": "dalg_deit_tiny_patch16_224", "model_kwargs": KWARGS,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "img_size": 64,
            "task": "retrieval", "dataset": "synthetic_landmarks", "class_names": []}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta, "hyper_parameters": {"meta": meta}}, path)
    return str(path), model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmd")
    root = generate_landmarks(str(tmp / "data"), SMALL)
    ck, model = _ckpt(tmp / "a.ckpt", 0)
    ck2, _ = _ckpt(tmp / "b.ckpt", 1)
    return tmp, root, ck, ck2, model


def test_embed_writes_descriptors_of_the_checkpoint(setup, capsys):
    tmp, root, ck, _, model = setup
    assert main(["embed", ck, "--dataset", "synthetic_landmarks", "--root", root, "--split",
                 "gallery", "--out", str(tmp / "db"), "--img-size", "64"]) == 0
    d = load_descriptors(tmp / "db")
    assert d.meta["checkpoint_hash"] == checkpoint_hash(ck) and d.meta["split"] == "gallery"
    assert d.meta["model_name"] == "dalg_deit_tiny_patch16_224" and d.dim == 16
    assert d.meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    np.testing.assert_allclose(np.linalg.norm(d.vectors, axis=1), 1.0, atol=1e-5)
    assert "img/s" in capsys.readouterr().out
    # the checkpoint's weights were used: same descriptors as the in-memory model
    from finegrain.data import build_dataset
    from finegrain.retrieval.extract import extract, retrieval_transform
    ds = build_dataset("synthetic_landmarks", root, "gallery",
                       transform=retrieval_transform(64, (0.5,) * 3, (0.5,) * 3))
    np.testing.assert_allclose(d.vectors, extract(model.eval(), ds, progress=False), atol=1e-5)
    # without --img-size: the checkpoint's training size (meta img_size 64)
    assert main(["embed", ck, "--dataset", "synthetic_landmarks", "--root", root, "--split",
                 "query", "--out", str(tmp / "q")]) == 0
    assert load_descriptors(tmp / "q").meta["preprocessing"]["img_size"] == 64


def test_index_build_search_add_remove(setup, capsys):
    tmp, root, ck, ck2, _ = setup
    ix = str(tmp / "gallery.index")
    assert main(["index", "build", str(tmp / "db"), "--kind", "Flat", "--out", ix]) == 0
    out = str(tmp / "res.json")
    assert main(["index", "search", ix, str(tmp / "q"), "-k", "5", "--out", out]) == 0
    res = json.loads(open(out).read())
    db, q = load_descriptors(tmp / "db"), load_descriptors(tmp / "q")
    ref = np.argsort(-(np.asarray(q.vectors) @ np.asarray(db.vectors).T), axis=1)[:, :5]
    assert [r["names"] for r in res["queries"]] == [[db.names[j] for j in row] for row in ref]
    for flag in (["--aqe", "--aqe-n", "2"], ["--rerank", "--rerank-k", "8"]):
        assert main(["index", "search", ix, str(tmp / "q"), "-k", "5", *flag, "--out", out]) == 0
        assert all(len(r["names"]) == 5 for r in json.loads(open(out).read())["queries"])
    first = res["queries"][0]["names"][0]
    assert main(["index", "remove", ix, first]) == 0
    assert main(["index", "search", ix, str(tmp / "q"), "-k", "5", "--out", out]) == 0
    assert first not in json.loads(open(out).read())["queries"][0]["names"]
    # add: the query descriptors (same model) can be added; then they are found first
    assert main(["index", "add", ix, str(tmp / "q")]) == 0
    assert main(["index", "search", ix, str(tmp / "q"), "-k", "1", "--out", out]) == 0
    assert [r["names"][0] for r in json.loads(open(out).read())["queries"]] == q.names
    assert "removed 1" in capsys.readouterr().out


def test_metric_names_and_their_older_aliases_build_the_same_index(setup, capsys):
    """--metric euclidean and --metric l2 (cosine and ip) write identical index folders and
    search results; the files say today's name."""
    tmp = setup[0]
    got = {}
    for metric in ("euclidean", "l2", "cosine", "ip"):
        ix, out = str(tmp / f"m_{metric}.index"), str(tmp / f"m_{metric}.json")
        assert main(["index", "build", str(tmp / "db"), "--metric", metric, "--out", ix]) == 0
        assert main(["index", "search", ix, str(tmp / "q"), "-k", "5", "--out", out]) == 0
        res = json.loads(open(out).read())
        assert res.pop("index") == ix
        got[metric] = ({n: open(p, "rb").read() for n, p in index_files(ix).items()}, res)
    assert got["l2"] == got["euclidean"] and got["ip"] == got["cosine"]
    assert got["euclidean"][1] != got["cosine"][1]
    for metric in ("euclidean", "cosine"):
        assert json.loads(got[metric][0]["index.json"])["metric"] == metric
        assert got[metric][1]["score"] == metric
    with pytest.raises(SystemExit):
        main(["index", "build", str(tmp / "db"), "--metric", "cos", "--out", str(tmp / "x")])
    assert "'cosine'" in capsys.readouterr().err


def test_descriptors_from_another_checkpoint_are_refused(setup):
    tmp, root, ck, ck2, _ = setup
    assert main(["embed", ck2, "--dataset", "synthetic_landmarks", "--root", root, "--split",
                 "query", "--out", str(tmp / "q_other"), "--img-size", "64"]) == 0
    ix = str(tmp / "g2.index")
    assert main(["index", "build", str(tmp / "db"), "--out", ix]) == 0
    with pytest.raises(DescriptorMismatch, match="checkpoint_hash"):
        main(["index", "search", ix, str(tmp / "q_other")])
    with pytest.raises(DescriptorMismatch, match="re-run 'finegrain embed'"):
        main(["index", "add", ix, str(tmp / "q_other")])


def test_retrieval_eval_command(setup, capsys):
    tmp, root, ck, _, _ = setup
    out = tmp / "ev"
    assert main(["retrieval", "eval", ck, "--dataset", "synthetic_landmarks", "--root", root,
                 "--img-size", "64", "--out", str(out), "--picture", "none", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"easy", "medium", "hard"}
    assert json.loads((out / "retrieval.json").read_text())["metrics"] == printed
    # the lead's CLI dispatches to the same commands and reports errors with exit code 2
    cli = pytest.importorskip("finegrain.cli")
    assert cli.main(["retrieval", "eval", "--dataset", "synthetic_landmarks", "--root", root,
                     "--queries", str(out / "query"), "--gallery", str(tmp / "db"),
                     "--out", str(tmp / "ev2"), "--picture", "none"]) == 0
    assert cli.main(["index", "search", str(tmp / "nowhere"), str(tmp / "q")]) == 2


def test_index_search_and_retrieval_eval_rank_alike_with_aqe_and_rerank(setup):
    """'retrieval eval' re-ranks the expanded query as 'index search' does (one
    code path), and takes --aqe-n / --rerank-k."""
    from finegrain.data import build_dataset
    from finegrain.evaluation.revisited import evaluate
    from finegrain.retrieval.pipeline import PostprocessOptions, rank_database
    tmp, root, ck, _, _ = setup
    for split, name in (("query", "q3"), ("gallery", "db3")):
        assert main(["embed", ck, "--dataset", "synthetic_landmarks", "--root", root,
                     "--split", split, "--out", str(tmp / name), "--img-size", "64"]) == 0
    q, db = load_descriptors(tmp / "q3"), load_descriptors(tmp / "db3")
    ix, out = str(tmp / "g3.index"), str(tmp / "res3.json")
    assert main(["index", "build", str(tmp / "db3"), "--out", ix]) == 0
    flags = ["--aqe", "--aqe-n", "3", "--rerank", "--rerank-k", "10"]
    assert main(["index", "search", ix, str(tmp / "q3"), "-k", "10", *flags, "--out", out]) == 0
    searched = [r["names"] for r in json.loads(open(out).read())["queries"]]
    ranks = rank_database(np.asarray(q.vectors), np.asarray(db.vectors),
                          PostprocessOptions(aqe=True, aqe_n=3, rerank=True, rerank_k=10))
    assert searched == [[db.names[j] for j in ranks[:10, i]] for i in range(len(q))]
    plain = rank_database(np.asarray(q.vectors), np.asarray(db.vectors),
                          PostprocessOptions(rerank=True, rerank_k=10))
    assert not np.array_equal(ranks, plain)  # the expansion reaches the re-ranking
    assert main(["retrieval", "eval", "--dataset", "synthetic_landmarks", "--root", root,
                 "--queries", str(tmp / "q3"), "--gallery", str(tmp / "db3"), *flags,
                 "--out", str(tmp / "ev3"), "--picture", "none"]) == 0
    report = json.loads((tmp / "ev3" / "retrieval.json").read_text())
    gnd = build_dataset("synthetic_landmarks", root, "query").gnd
    assert report["metrics"] == evaluate(ranks, gnd)
    assert report["aqe"] == {"n": 3, "alpha": 3.0}
    assert report["rerank"] == {"k": 10, "k1": 20, "k2": 6, "lambda": 0.3}  # as used


def test_older_flag_names_are_hidden_aliases(capsys):
    """``--image-size`` (before 2026-11-30) sets ``--img-size``; only the new name is shown."""
    parser = argparse.ArgumentParser(prog="finegrain")
    register(parser.add_subparsers(dest="command", required=True))
    for cmd in (["embed", "ck", "--dataset", "x", "--out", "o"],
                ["retrieval", "eval", "ck", "--dataset", "x"]):
        assert parser.parse_args(cmd + ["--image-size", "96"]).img_size == 96
        assert parser.parse_args(cmd + ["--img-size", "96"]).img_size == 96
        assert parser.parse_args(cmd).img_size is None
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", "--help"])
    text = capsys.readouterr().out
    assert "--img-size" in text and "--image-size" not in text
