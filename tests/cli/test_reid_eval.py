"""`finegrain eval` on a Re-ID checkpoint: --aqe / --rerank change the distances the metrics
come from (equal to the evaluation functions applied by hand), --visrank draws the ranked
gallery."""

import json

import numpy as np
import pytest

from finegrain.cli import main
from finegrain.evaluation.reid import compute_distance, evaluate, re_rank
from finegrain.inference import reid_distances, reid_metrics
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

NAME = "dcal_deit_tiny_patch16_224"
DATA = {"num_train_ids": 6, "num_test_ids": 3, "num_cameras": 2, "images_per_camera": 2,
        "height": 32, "width": 16, "seed": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reid")
    kw = {**tiny_kwargs(NAME), "task": "reid", "img_size": [32, 16]}
    assert main(["train", "--run-dir", str(tmp / "run"), "--trainer.max_epochs", "1",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                 "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary",
                 "false", "--model.model", model_arg(NAME, kw),
                 "--data.dataset", "synthetic_reid", "--data.root", str(tmp / "cache"),
                 "--data.dataset_kwargs", json.dumps({"config": DATA}),
                 "--data.img_size", "[32, 16]", "--data.batch_size", "8",
                 "--data.sampler", "pk", "--data.num_instances", "2",
                 "--data.num_workers", "0"]) == 0
    return tmp


def _eval(run, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run / "run" / "best.ckpt"), "--json", "--data.num_workers", "0",
                 "--data.root", str(run / "cache"), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_reid_eval_rerank_aqe_and_visrank(run, capsys, tmp_path):
    plain = _eval(run, capsys)
    assert plain["split"] == "query+gallery" and plain["task"] == "reid"
    saved = json.load(open(run / "run" / "metrics.json"))["best"]
    assert plain["metrics"]["mAP"] == pytest.approx(saved["mAP"])
    both = _eval(run, capsys, "--rerank", "--aqe", "2", "--visrank", "3",
                 "--out", str(tmp_path / "m.json"))
    assert both["rerank"] is True and both["aqe"] == 2
    assert 0 <= both["metrics"]["mAP"] <= 1 and set(both["metrics"]) >= {"mAP", "R1"}
    assert both["visrank"] == str(tmp_path / "visrank.png")
    assert open(both["visrank"], "rb").read(4) == b"\x89PNG"
    assert json.load(open(tmp_path / "m.json"))["metrics"] == both["metrics"]


def test_reid_postprocessing_equals_the_evaluation_functions():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    out = {"embedding": e, "label": rng.integers(0, 5, 30), "camid": rng.integers(0, 2, 30)}
    nq = 6
    q, g = e[:nq], e[nq:]
    d0 = compute_distance(q, g, "cosine").numpy()
    np.testing.assert_allclose(reid_distances(out, nq), d0)
    rr = re_rank(d0, compute_distance(q, q, "cosine").numpy(),
                 compute_distance(g, g, "cosine").numpy())
    np.testing.assert_allclose(reid_distances(out, nq, rerank=True), rr)
    ref = evaluate(rr, out["label"][:nq], out["label"][nq:], out["camid"][:nq],
                   out["camid"][nq:])
    got = reid_metrics(rr, out, nq)
    assert got["mAP"] == pytest.approx(ref["mAP"]) and got["R1"] == pytest.approx(ref["cmc"][0])
    # alpha-QE with n = 1: q' = normalize(q + max(s, 0)^3 g_top1)
    top = np.argsort(d0, axis=1, kind="stable")[:, 0]
    s = np.maximum((q * g[top]).sum(1, keepdims=True), 0) ** 3
    qe = q + s * g[top]
    qe /= np.linalg.norm(qe, axis=1, keepdims=True)
    np.testing.assert_allclose(reid_distances(out, nq, aqe=1),
                               compute_distance(qe, g, "cosine").numpy(), atol=1e-6)
