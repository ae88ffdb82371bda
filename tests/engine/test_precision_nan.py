"""bf16 autocast through the engine, and a NaN loss that stops with its step and term named
while last.ckpt keeps the last good state."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finegrain.engine import train
from finegrain.engine.module import NonFiniteLossError

from .test_resume import _argv


def test_bf16_mixed_training_runs_and_evaluates(tmp_path):
    cli = train(_argv(tmp_path, tmp_path / "run", epochs=1,
                      extra=["--trainer.precision", "bf16-mixed"]))
    assert cli.trainer.precision == "bf16-mixed"
    m = cli.model.last_metrics
    assert 0 <= m["top1"] <= 1
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


class Poison(Callback):
    """Makes the head produce NaN from step ``step`` on."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("nan"))


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_ckpt(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 4: ce.*--resume"):
        train(_argv(tmp_path, run, epochs=3), callbacks=[Poison(4)])
    ck = torch.load(os.path.join(run, "last.ckpt"), map_location="cpu", weights_only=True)
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
