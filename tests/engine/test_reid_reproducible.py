"""Two identical short Re-ID trainings (DCAL, P x K sampler, generated Market-1501 tree) give
identical metrics, the second in a fresh process with another hash seed (set / dict order of
strings) on a freshly generated tree: the demo's Re-ID seed reproduces from run to run."""

import json
import os
import subprocess
import sys


from finegrain.cli import main
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

NAME = "dcal_deit_tiny_patch16_224"
DATA = {"num_train_ids": 6, "num_test_ids": 3, "num_cameras": 2, "images_per_camera": 2,
        "height": 32, "width": 16, "seed": 0}
# 6 training identities x 4 images, P = 2 x K = 4: one chunk per identity, 3 batches per epoch


def _args(run_dir, cache) -> list[str]:
    kw = {**tiny_kwargs(NAME), "task": "reid", "img_size": [32, 16]}
    return ["train", "--run-dir", str(run_dir), "--trainer.max_epochs", "2",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
                "--model.model", model_arg(NAME, kw),
               "--data.dataset", "synthetic_reid", "--data.root", str(cache),
               "--data.dataset_kwargs", json.dumps({"config": DATA}),
               "--data.img_size", "[32, 16]", "--data.batch_size", "8",
               "--data.sampler", "pk", "--data.num_instances", "4",
               "--data.num_workers", "0"]


def _history(run_dir) -> list[dict]:
    return json.load(open(run_dir / "metrics.json"))["history"]


def test_two_identical_reid_trainings_give_identical_metrics(tmp_path):
    assert main(_args(tmp_path / "a", tmp_path / "cache")) == 0
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "finegrain", *_args(tmp_path / "b", tmp_path / "c2")],
                   check=True, env=env, capture_output=True)
    first, second = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert len(first) == len(second) == 2
    for r1, r2 in zip(first, second):
        assert r1["mAP"] == r2["mAP"] and r1["R1"] == r2["R1"], (r1, r2)
