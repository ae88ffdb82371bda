"""bf16 autocast through the engine, and a NaN loss that stops with its step and term named
while last.ckpt keeps the last good state."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finegrain.engine import train
from finegrain.engine.module import NonFiniteLossError
from finegrain.models.registry import model_arg

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


class PoisonImages(Callback):
    """Turns the images of the batch at ``step`` into NaN; checks that the skipped step left
    every parameter and buffer of the model as it was."""

    def __init__(self, step):
        self.step, self.before, self.changed = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            batch["image"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.changed is None:
            now = pl_module.model.state_dict()
            self.changed = [k for k, v in self.before.items() if not torch.equal(v, now[k])]


def test_skip_leaves_parameters_and_batchnorm_buffers_unchanged(tmp_path):
    from finegrain.models.tiny import tiny_kwargs
    run = tmp_path / "run"
    poison = PoisonImages(1)
    cli = train(_argv(tmp_path, run, epochs=1, extra=[
        "--model.model", model_arg("resnet18", tiny_kwargs("resnet18")),
        "--model.nonfinite", "skip"]), callbacks=[poison])
    assert any(k.endswith("running_mean") for k in poison.before), "needs a BatchNorm model"
    assert poison.changed == [], f"a skipped step changed {poison.changed[:5]}"
    assert cli.model.skipped_steps == 1
    ck = torch.load(os.path.join(run, "last.ckpt"), map_location="cpu", weights_only=True)
    bad = [k for k, v in ck["state_dict"].items() if v.is_floating_point() and
           not torch.isfinite(v).all()]
    assert not bad, f"non-finite tensors in last.ckpt: {bad[:5]}"
    assert 0 <= cli.model.last_metrics["top1"] <= 1


def test_planned_steps_for_the_schedule_and_the_progress_file():
    from types import SimpleNamespace

    from finegrain.engine.module import planned_steps

    dm = SimpleNamespace(steps_per_epoch=lambda: 10)

    def trainer(max_epochs, max_steps=-1, accumulate=1):
        return SimpleNamespace(datamodule=dm, max_epochs=max_epochs, max_steps=max_steps,
                               accumulate_grad_batches=accumulate)

    assert planned_steps(trainer(3)) == (10, 30)
    assert planned_steps(trainer(3, max_steps=25)) == (10, 25)
    assert planned_steps(trainer(3, accumulate=2)) == (5, 15)  # optimizer steps
    # max_steps alone: Lightning sets max_epochs = -1; the schedule spans max_steps
    # (it used to span one epoch)
    assert planned_steps(trainer(-1, max_steps=45)) == (10, 45)


class PoisonGradients(Callback):
    """A finite loss whose gradients are not: one parameter's gradient becomes inf at
    ``step`` (an overflow in backward); records the weights before and after that step."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:  # before the forward moves BatchNorm statistics
            self.before = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad.fill_(
                float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.after is None:
            self.after = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_nonfinite_gradients_of_a_finite_loss_are_skipped_or_named(tmp_path):
    from finegrain.models.tiny import tiny_kwargs
    model = ["--model.model", model_arg("resnet18", tiny_kwargs("resnet18"))]
    poison = PoisonGradients(1)
    cli = train(_argv(tmp_path, tmp_path / "skip", epochs=1,
                      extra=[*model, "--model.nonfinite", "skip"]), callbacks=[poison])
    changed = [k for k, v in poison.before.items() if not torch.equal(v, poison.after[k])]
    assert changed == [] and cli.model.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in cli.model.model.state_dict().values()
               if v.is_floating_point())
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at epoch 0 step 1 in 1 "
                                                 r"parameter.*although the loss is finite"):
        train(_argv(tmp_path, tmp_path / "raise", epochs=1, extra=model),
              callbacks=[PoisonGradients(1)])
