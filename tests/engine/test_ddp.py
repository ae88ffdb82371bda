"""Evaluation under DDP (2 CPU processes, gloo) gives exactly the single-process metrics: every
sample evaluated once, no padded duplicates, even with shards of unequal size."""

import lightning.pytorch as pl
import pytest
import torch

from finegrain.engine import FinegrainDataModule, FinegrainModule
from finegrain.models import create_model
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

TINY = tiny_kwargs("vit_tiny_patch16_224")


def _validate(task_ds, cfg, devices, tmp_path, model_kwargs):
    torch.manual_seed(0)
    dm = FinegrainDataModule(task_ds, root=str(tmp_path / "cache"), img_size=[32, 32],
                             batch_size=4, num_workers=0, dataset_kwargs={"config": cfg})
    module = FinegrainModule(create_model("vit_tiny_patch16_224", num_classes=dm.num_classes,
                                          **model_kwargs))
    dm.val_set  # noqa: B018
    module.set_data_meta(dm.meta())
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         strategy="ddp_spawn" if devices > 1 else "auto")
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


def test_ddp_classification_eval_equals_single_process(tmp_path):
    # 5 classes x 3 test images = 15 samples: shards of 8 and 7
    cfg = dict(num_classes=5, train_per_class=2, test_per_class=3, size=32, seed=1)
    one = _validate("synthetic_fgvc", cfg, 1, tmp_path, TINY)
    two = _validate("synthetic_fgvc", cfg, 2, tmp_path, TINY)
    assert one.keys() == two.keys() and "val/top1" in one
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-7), k


def test_ddp_reid_eval_equals_single_process(tmp_path):
    cfg = dict(num_train_ids=4, num_test_ids=5, num_cameras=2, images_per_camera=2,
               height=32, width=32, seed=1)
    one = _validate("synthetic_reid", cfg, 1, tmp_path, {**TINY, "task": "reid"})
    two = _validate("synthetic_reid", cfg, 2, tmp_path, {**TINY, "task": "reid"})
    assert "val/mAP" in one
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-6), k


@pytest.mark.slow
def test_ddp_training_two_processes_writes_run_folder(tmp_path):
    """`finegrain train` under DDP (2 CPU processes, gloo): trains, checkpoints, evaluates."""
    import json

    from finegrain.engine import train
    cfg = dict(num_classes=4, train_per_class=8, test_per_class=3, size=32, seed=0)
    run = tmp_path / "run"
    train(["--run-dir", str(run), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
           "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
           "--model.model", model_arg("vit_tiny_patch16_224", TINY),
           "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp_path / "cache"),
           "--data.dataset_kwargs", json.dumps({"config": cfg}),
           "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"])
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2 * (32 // (4 * 2))  # each rank takes every other batch
    hist = json.load(open(run / "metrics.json"))["history"]
    assert len(hist) == 2 and 0 <= hist[-1]["top1"] <= 1


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc), recursively."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    for k in kids:
        out += [k, *_children(k)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_ends_the_whole_ddp_training_without_orphans(tmp_path, victim):
    """SIGKILL one of two training processes mid-run: the launcher and the other rank end
    within seconds (no rank left waiting in a collective), no process is left behind, and
    last.ckpt (if written) is a whole file."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    cfg = dict(num_classes=4, train_per_class=8, test_per_class=3, size=32, seed=0)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "finegrain", "train", "--run-dir", str(run),
            "--trainer.max_epochs", "500", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
            "--model.model", model_arg("vit_tiny_patch16_224", TINY),
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp_path / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": cfg}), "--data.val_split", "test",
            "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"]
    log = open(tmp_path / "log.txt", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (run / "last.ckpt").exists():  # training is under way on both ranks
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
        time.sleep(0.5)
    ranks = _children(proc.pid)  # ddp_spawn: the launcher waits, both ranks are children
    workers = [k for k in ranks if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
    assert len(workers) == 2, ranks
    target, everyone = workers[victim], [proc.pid, *ranks]
    os.kill(target, signal.SIGKILL)
    t0 = time.time()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.time() - t0
    time.sleep(1)
    alive = [p for p in everyone if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    print(f"rank {victim} killed: every process ended in {took:.1f} s")
    assert took < 30 and not alive, (took, alive)
    assert proc.returncode != 0
    torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)  # whole
