"""Resume after a kill mid-epoch gives bitwise the weights of an uninterrupted run; the
checkpoint is loadable with weights_only=True and describes itself."""

import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finegrain.engine import train
from finegrain.meta import SCHEMA_VERSION
from finegrain.models import create_model, load_model
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs


def _argv(tmp_path, run_dir, epochs=3, extra=()):
    cfg = dict(num_classes=4, train_per_class=6, test_per_class=2, size=32, seed=0)
    return ["--run-dir", str(run_dir), "--checkpoint-every", "1",
            "--seed_everything", "0",
            "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false",
            # drop path on: a resumed run must replay its random draws too
            "--model.model", model_arg("vit_tiny_patch16_224",
                                       {**tiny_kwargs("vit_tiny_patch16_224"),
                                        "drop_path_rate": 0.1}),
            "--model.optimizer.lr", "0.003", "--model.warmup_epochs", "1",
            "--data.val_split", "test",  # the full training split: these test the run
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp_path / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": cfg}),
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            *extra]


class Crash(Callback):
    """Simulates a kill: raises after ``step`` optimizer steps (last.ckpt already written)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def _weights(run_dir):
    sd = torch.load(os.path.join(run_dir, "last.ckpt"), map_location="cpu", weights_only=True)
    return sd["state_dict"]


def test_resume_mid_epoch_is_bitwise_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_argv(tmp_path, full))  # 3 epochs x 3 batches, uninterrupted
    with pytest.raises(RuntimeError, match="killed"):
        train(_argv(tmp_path, cut), callbacks=[Crash(4)])  # dies at epoch 1, batch 1
    mid = _weights(cut)
    train(["--resume", str(cut), *_argv(tmp_path, cut)[2:]])
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], mid[k])]
    assert changed, "training after the kill must change the weights"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    ck = torch.load(os.path.join(full, "last.ckpt"), map_location="cpu", weights_only=True)
    assert ck["global_step"] == 9
    meta = ck["finegrain_meta"]
    assert meta["model_name"] == "vit_tiny_patch16_224" and len(meta["class_names"]) == 4
    assert meta["img_size"] == 32 and len(meta["mean"]) == 3 and meta["schema"] == SCHEMA_VERSION
    for name in ("config.yaml", "metrics.csv", "metrics.json", "best.ckpt", "weights.safetensors",
                 "model.json"):
        assert (full / name).is_file(), name
    # the checkpoint alone rebuilds the model, equal to the trained weights
    model, meta2 = load_model(str(full / "last.ckpt"))
    own = {k[len("model."):]: v for k, v in a.items() if k.startswith("model.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    m2 = create_model("vit_tiny_patch16_224", pretrained=str(full / "weights.safetensors"))
    assert m2.head.out_features == 4


def test_resume_with_changed_config_warns_naming_keys(tmp_path):
    run = tmp_path / "run"
    train(_argv(tmp_path, run, epochs=1))
    with pytest.warns(UserWarning, match=r"model\.optimizer\.init_args\.lr"):
        train(["--resume", str(run),
               *_argv(tmp_path, run, epochs=2, extra=["--model.optimizer.lr", "0.001"])[2:]])


def test_resume_missing_run_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        train(["--resume", str(tmp_path / "nope")])


def test_load_model_reads_the_checkpoint_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_argv(tmp_path, run, epochs=1))
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    model, meta = load_model(str(run / "last.ckpt"))
    assert len(calls) == 1, calls
    assert meta.model_name == "vit_tiny_patch16_224" and not model.training


class KillBefore(Callback):
    """Simulates a kill between two batches: raises before the batch of ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def _rows(run_dir):
    import csv
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_every_metrics_row_without_duplicates(tmp_path):
    # checkpoints every 2 steps, killed at step 5: last.ckpt is at step 4, so the rows of
    # steps 0-3 must survive the resume and step 4's row (replayed) must not appear twice
    every = ["--trainer.log_every_n_steps", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_argv(tmp_path, full, extra=every))
    argv = _argv(tmp_path, cut, extra=every)
    argv[3] = "2"  # --checkpoint-every 2
    with pytest.raises(RuntimeError, match="killed"):
        train(argv, callbacks=[KillBefore(5)])
    before = _rows(cut)
    assert [r["step"] for r in before if r["train/loss"]] == ["0", "1", "2", "3", "4"]
    train(["--resume", str(cut), *argv[2:]])
    after, want = _rows(cut), _rows(full)
    assert [(r["epoch"], r["step"]) for r in after] == [(r["epoch"], r["step"]) for r in want]
    assert after == want  # bitwise-exact resume: the same values too
    hist = json.load(open(cut / "metrics.json"))["history"]
    assert hist == json.load(open(full / "metrics.json"))["history"]
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(cut / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(9))
