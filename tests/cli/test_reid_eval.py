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
DATA = {"num_train_ids": 6, "num_test_ids": 5, "num_cameras": 3, "images_per_camera": 2,
        "height": 32, "width": 16, "seed": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reid")
    kw = {**tiny_kwargs(NAME), "task": "reid", "img_size": [32, 16]}
    assert main(["train", "--run-dir", str(tmp / "run"), "--trainer.max_epochs", "1",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                 "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary",
                 "false", "--model.model", model_arg(NAME, kw),
                 "--data.val_split", "test",  # eval must equal training's last evaluation
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


def test_reid_eval_equals_query_and_gallery_embedded_apart(run, capsys):
    """The metrics of `finegrain eval` are those of the query split against the gallery
    split, each embedded on its own (before 2026-11-30 the evaluation sorted the outputs by
    the per-split index, mixing gallery rows into the "first num_query" queries)."""
    import torch

    from finegrain.data.registry import build_dataset
    from finegrain.evaluation.reid import evaluate_features
    from finegrain.inference import eval_transform
    from finegrain.models.registry import load_model
    model, meta = load_model(str(run / "run" / "best.ckpt"))
    emb = {}
    for split in ("query", "gallery"):
        ds = build_dataset("synthetic_reid", str(run / "cache"), split,
                           transform=eval_transform(meta), config=DATA)
        with torch.no_grad():
            e = torch.cat([model(torch.stack([ds[i]["image"]]))["embedding"]
                           for i in range(len(ds))])
        emb[split] = (e.numpy(), np.array([x.label for x in ds.samples]),
                      np.array([x.camid for x in ds.samples]))
    (qe, qy, qc), (ge, gy, gc) = emb["query"], emb["gallery"]
    ref = evaluate_features(qe, ge, qy, gy, qc, gc, metric="cosine")
    got = _eval(run, capsys)["metrics"]
    assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert got["R1"] == pytest.approx(ref["cmc"][0], abs=1e-6)


def test_reid_postprocessing_equals_the_evaluation_functions():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    is_query = np.zeros(30, bool)
    is_query[[0, 4, 9, 17, 22, 29]] = True  # queries anywhere: the flag decides, not the order
    out = {"embedding": e, "label": rng.integers(0, 5, 30), "camid": rng.integers(0, 2, 30),
           "query": is_query}
    q, g = e[is_query], e[~is_query]
    yq, yg = out["label"][is_query], out["label"][~is_query]
    cq, cg = out["camid"][is_query], out["camid"][~is_query]
    d0 = compute_distance(q, g, "cosine").numpy()
    np.testing.assert_allclose(reid_distances(out), d0)
    rr = re_rank(d0, compute_distance(q, q, "cosine").numpy(),
                 compute_distance(g, g, "cosine").numpy())
    np.testing.assert_allclose(reid_distances(out, rerank=True), rr)
    ref = evaluate(rr, yq, yg, cq, cg)
    got = reid_metrics(rr, out)
    assert got["mAP"] == pytest.approx(ref["mAP"]) and got["R1"] == pytest.approx(ref["cmc"][0])
    # alpha-QE with n = 1: q' = normalize(q + max(s, 0)^3 g_top1)
    top = np.argsort(d0, axis=1, kind="stable")[:, 0]
    s = np.maximum((q * g[top]).sum(1, keepdims=True), 0) ** 3
    qe = q + s * g[top]
    qe /= np.linalg.norm(qe, axis=1, keepdims=True)
    np.testing.assert_allclose(reid_distances(out, aqe=1),
                               compute_distance(qe, g, "cosine").numpy(), atol=1e-6)
