"""ExactResume, the one component of exact mid-epoch resume: what it stores, the checkpoints
of the previous format, and the Lightning behaviour it relies on (pinned: an upgrade that
changes it fails here, by name, before the bitwise tests of test_resume.py fail obscurely)."""

import inspect
import os
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finegrain.engine import train
from finegrain.engine.resume import NOT_RESUMABLE_WARNING, ExactResume
from finegrain.engine.run import FinegrainCLI
from .test_resume import Crash, _argv


class Order(Callback):
    """Records the hooks a resume goes through, and whether the training loader existed."""

    def __init__(self):
        self.seen = []

    def setup(self, trainer, pl_module, stage):
        self.seen.append("setup")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.seen.append(f"load (loader built: {trainer.train_dataloader is not None})")

    def on_train_start(self, trainer, pl_module):
        self.seen.append("train_start")


def _ckpt(run_dir):
    return torch.load(os.path.join(run_dir, "last.ckpt"), map_location="cpu", weights_only=True)


def _to_previous_format(path):
    """Rewrite a checkpoint as the previous code wrote it: the RNG beside the weights
    (``finegrain_rng``) and the position as the training loader's state in the fit loop."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    state = ck["callbacks"].pop("ExactResume")
    ck["finegrain_rng"] = state["rng"]
    ck["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [
        {"epoch": state["epoch"], "consumed": state["batches"]}]
    torch.save(ck, path)


def test_lightning_still_says_what_exact_resume_silences():
    # finegrain train ignores this warning (ExactResume makes it untrue): if Lightning rewords
    # it, the filter must follow
    from lightning.pytorch.loops import training_epoch_loop
    assert NOT_RESUMABLE_WARNING in inspect.getsource(training_epoch_loop)


def test_no_private_lightning_cli_override():
    private = [n for n, v in vars(FinegrainCLI).items()
               if n.startswith("_") and not n.startswith("__") and callable(v)]
    assert not private, f"FinegrainCLI overrides private LightningCLI methods: {private}"


@pytest.mark.parametrize("previous_format", [False, True], ids=["exact_resume", "previous"])
def test_killed_run_resumes_bitwise_from_either_checkpoint_format(tmp_path, previous_format):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_argv(tmp_path, full))  # 2 epochs x 3 batches
    with pytest.raises(RuntimeError, match="killed"):
        train(_argv(tmp_path, cut), callbacks=[Crash(4)])  # epoch 1, after its batch 0
    mid = _ckpt(cut)
    assert "finegrain_rng" not in mid and "combined_loader" not in \
        mid["loops"]["fit_loop"]["state_dict"]
    state = mid["callbacks"]["ExactResume"]
    assert (state["epoch"], state["batches"]) == (1, 1)
    if previous_format:
        _to_previous_format(cut / "last.ckpt")
    order = Order()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(["--resume", str(cut)], callbacks=[order])
    assert not [w for w in caught if NOT_RESUMABLE_WARNING in str(w.message)]
    # Lightning restores callbacks after `setup` and before it builds the training loader:
    # ExactResume gives the sampler its position there
    assert order.seen == ["setup", "load (loader built: False)", "train_start"]
    a, b = _ckpt(full)["state_dict"], _ckpt(cut)["state_dict"]
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert not all(torch.equal(a[k], mid["state_dict"][k]) for k in a)


def test_state_is_plain_values():
    cb = ExactResume()
    state = cb.state_dict()
    assert set(state) == {"epoch", "batches", "rng"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)
