"""Nothing torn, ever: every file a later command reads is whole or absent after a kill at any
instant, and a full disk is one paragraph that keeps the last good checkpoint, from which
``--resume`` continues once space is freed."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from finegrain import atomic
from finegrain.atomic import DiskFullError, save_torch, write_json
from finegrain.cli import main
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

NAME = "vit_tiny_patch16_224"
CFG = dict(num_classes=4, train_per_class=4, test_per_class=1, size=32, seed=0)


def _train(tmp, run, *extra):
    return ["train", "--run-dir", str(run), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(NAME, tiny_kwargs(NAME)), "--checkpoint-every", "1",
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": CFG}), "--data.val_split", "test",
            "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
            *extra]


def _whole(run) -> list[str]:
    """Every file of the run folder that a later command reads, checked to load."""
    seen = []
    for name in ("last.ckpt", "best.ckpt"):
        if (run / name).exists():
            torch.load(run / name, map_location="cpu", weights_only=True)
            seen.append(name)
    for name in ("metrics.json", "model.json", "progress.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
            seen.append(name)
    if (run / "weights.safetensors").exists():
        from safetensors.torch import load_file
        load_file(str(run / "weights.safetensors"))
        seen.append("weights.safetensors")
    return seen


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    save_torch({"v": torch.ones(3)}, str(path))

    def full(tmp, data):
        with open(tmp, "wb") as fh:
            fh.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "_write_file", full)
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .* while writing "
                                            r"x.ckpt .*the previous x.ckpt, if any, is intact"):
        save_torch({"v": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["x.ckpt"]  # no temporary left behind
    write_json(str(tmp_path / "m.json"), {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


def test_kills_at_random_instants_leave_only_whole_files(tmp_path):
    rng = random.Random(0)
    run = tmp_path / "run"
    argv = _train(tmp_path, run, "--trainer.max_epochs", "40")
    seen = set()
    for attempt in range(4):
        cmd = [sys.executable, "-m", "finegrain", *argv]
        if attempt:  # continue the killed run
            cmd = [sys.executable, "-m", "finegrain", "train", "--resume", str(run)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        while not (run / "last.ckpt").exists() and time.time() - start < 120:
            time.sleep(0.02)  # the first checkpoint: from here on every write is a target
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        seen |= set(_whole(run))  # raises on a torn file
    assert {"last.ckpt", "progress.json"} <= seen
    # the run continues after the last kill, and a new claim clears the killed temporaries
    assert main(["train", "--resume", str(run), "--trainer.max_epochs", "41"]) == 0
    assert {"best.ckpt", "weights.safetensors", "model.json"} <= set(_whole(run))
    assert not [f for f in os.listdir(run) if ".tmp-" in f]


def _mount_tmpfs(where, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    os.makedirs(where, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def test_a_full_disk_during_training_keeps_last_ckpt_and_resume_continues(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("a small tmpfs needs root and mount (CI runs as root)")
    try:
        run = disk / "run"
        assert main(_train(tmp_path, run)) == 0
        step = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:  # leave less than a checkpoint
            f.write(b"\0" * (free - 64 * 1024))
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--trainer.max_epochs", "3"]) == 2
        err = capsys.readouterr().err
        assert "no space left on the disk of" in err and "is intact" in err
        assert "Traceback" not in err
        assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] >= step
        _whole(run)
        os.remove(disk / "filler")
        assert main(["train", "--resume", str(run), "--trainer.max_epochs", "3"]) == 0
        assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 3 * step
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
