"""A run folder is never reused by accident, two trainings never write one folder, a failed
start leaves nothing, and a resume whose config no longer builds the checkpoint's model is
refused in one paragraph."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from finegrain.cli import main
from finegrain.engine.folder import RunClaim
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

NAME = "vit_tiny_patch16_224"
CFG = dict(num_classes=4, train_per_class=4, test_per_class=1, size=32, seed=0)


def _train(tmp, run, *extra):
    return ["train", "--run-dir", str(run), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(NAME, tiny_kwargs(NAME)),
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": CFG}), "--data.val_split", "test",
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claim")
    assert main(_train(tmp, tmp / "run")) == 0
    return tmp


def test_a_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(done, capsys):
    run = done / "run"
    before = {p: os.stat(run / p).st_mtime_ns for p in ("best.ckpt", "last.ckpt", "metrics.csv")}
    capsys.readouterr()
    assert main(_train(done, run, "--data.img_size", "48")) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {run} already holds a run" in err and "--resume" in err
    assert "--overwrite" in err
    assert before == {p: os.stat(run / p).st_mtime_ns for p in before}  # untouched


def test_overwrite_replaces_the_run_whole(done, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    (run / "pictures").mkdir()
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(_train(done, run, "--overwrite", "true", "--data.img_size", "48")) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["img_size"] == 48
    meta = json.load(open(run / "model.json"))
    assert meta["img_size"] == 48  # best.ckpt and weights come from the new run
    assert not (run / "pictures").exists() and (run / "notes.txt").read_text() == "mine"


def test_a_non_run_folder_is_never_used(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    assert main(_train(tmp_path, tmp_path / "data", "--overwrite", "true")) == 2
    assert "holds no run: choose a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "data" / "keep.txt").read_text() == "x"


def test_a_second_training_into_a_folder_being_written_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    claim = RunClaim(str(run))  # a training that is writing the folder now
    try:
        assert main(_train(tmp_path, run)) == 2
        err = capsys.readouterr().err
        assert f"another finegrain train (pid {os.getpid()}) is writing this folder" in err
    finally:
        claim.release()
    assert main(_train(tmp_path, run, "--overwrite", "true")) == 0  # free again


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "new"
    assert main(_train(tmp_path, run, "--data.root", str(tmp_path / "missing"),
                       "--data.dataset", "cub200", "--data.dataset_kwargs", "{}")) == 2
    assert "dataset root" in capsys.readouterr().err
    assert not run.exists()


def test_resume_after_the_config_was_edited_names_what_differs(done, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["model"]["init_args"]["backbone_kwargs"]["embed_dim"] = 64
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = os.stat(run / "last.ckpt").st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--trainer.max_epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "its config.yaml builds a model that does not match" in err
    assert "of another shape (first: " in err
    assert "model arguments that changed: backbone_kwargs.embed_dim" in err
    assert "Traceback" not in err and os.stat(run / "last.ckpt").st_mtime_ns == before


def test_ctrl_c_exits_130_naming_the_step_and_the_resume_command(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    argv = _train(tmp_path, run, "--trainer.max_epochs", "200", "--checkpoint-every", "1")
    # A shell's background job (make test &) starts its children with SIGINT ignored, and
    # Python then keeps it ignored: restore the default, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):  # until a few steps are checkpointed
            if (run / "progress.json").is_file() and \
                    json.loads((run / "progress.json").read_text() or "{}").get("step", 0) >= 3:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted: {run}: stopped by Ctrl-C; {run / 'last.ckpt'} holds step " in err
    assert f"finegrain train --resume {run}" in err and "Traceback" not in err
    step = int(err.split("holds step ")[1].split()[0])
    import torch
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == step
