"""Exact mid-epoch resume, in one place: the :class:`ExactResume` callback.

Lightning checkpoints the weights, the optimizer, the scheduler, the AMP scaler and its loop
counters, but not where the training sampler stands inside an epoch nor the process's RNG
stream. :class:`ExactResume` owns both, through the callback state Lightning saves in every
checkpoint (``checkpoint["callbacks"]["ExactResume"]``, plain ints and tensors, so the file
loads with ``torch.load(weights_only=True)``):

- ``epoch``, ``batches``: the epoch and how many of its batches had started their training
  step when the checkpoint was written (counted at ``on_train_batch_start``, before any
  checkpoint callback of that batch runs). DataLoader workers fetch indices ahead of training,
  so the sampler's own count would be too high; this one is exact.
- ``rng``: the torch (and CUDA) RNG state at the checkpoint; a resumed run restores it just
  before its first training step, so drop path, dropout and random selections draw the
  numbers the uninterrupted run drew.

On load, the position goes to the data module's resumable batch sampler
(:attr:`FinegrainDataModule.train_batch_sampler <finegrain.engine.datamodule.
FinegrainDataModule.train_batch_sampler>`, ``load_state_dict``), which skips exactly those
batches by index, without decoding an image. The sampler exists before any DataLoader
(Lightning restores callbacks after ``setup`` and before it builds the training loader), so
the loader's workers start at the right batch.

The DataLoader itself is a plain one: Lightning warns that such a loader "is not resumable"
when a run resumes mid-epoch; :data:`NOT_RESUMABLE_WARNING` is that message, which
``finegrain train`` silences because this callback makes it untrue (``tests/engine/
test_exact_resume.py`` pins the message and the hook order this relies on).
Checkpoints written before this callback existed (``finegrain_rng`` and the loader state in
the fit loop) still resume exactly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["NOT_RESUMABLE_WARNING", "ExactResume"]

NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
"""The start of Lightning's warning about a mid-epoch resume with a plain DataLoader."""


class ExactResume(Callback):
    """Checkpoints the training sampler's position in the epoch and the RNG state, and
    restores both on resume (see the module docstring). Needs a data module with a
    ``train_batch_sampler`` that has ``load_state_dict({"epoch", "consumed"})``."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0  # batches of ``epoch`` whose training step has started
        self._sampler = None
        self._position: dict | None = None  # loaded, not yet given to the sampler
        self._rng: torch.Tensor | None = None  # loaded, restored before the next step

    # ---- Lightning hooks --------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._sampler = trainer.datamodule.train_batch_sampler
            self._give_position()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch:
            self.epoch, self.batches = trainer.current_epoch, 0
        self.batches += 1
        if self._rng is not None:  # resumed: continue the interrupted RNG stream
            torch.set_rng_state(self._rng)
            self._rng = None

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "batches": self.batches, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore(state["epoch"], state["batches"], state.get("rng"))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.state_key in checkpoint.get("callbacks", {}):
            return  # load_state_dict follows
        # a checkpoint of the previous format: RNG beside the weights, position in the loop
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        # taken out: Lightning would look for a stateful DataLoader to give it to
        loader = (loops.pop("combined_loader", None) or [None])[0]
        if loader is not None:
            self._restore(loader["epoch"], loader["consumed"], checkpoint.get("finegrain_rng"))

    # ---- internals --------------------------------------------------------------------
    def _restore(self, epoch: int, batches: int, rng: dict | None) -> None:
        self.epoch, self.batches = int(epoch), int(batches)
        self._position = {"epoch": self.epoch, "consumed": self.batches}
        self._give_position()
        if rng is not None:
            self._rng = rng["torch"]
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def _give_position(self) -> None:
        if self._sampler is not None and self._position is not None:
            self._sampler.load_state_dict(self._position)
            self._position = None
