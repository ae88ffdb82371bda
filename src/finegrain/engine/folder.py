"""Claiming a run folder: one training writes it at a time, and a folder that holds a run is
never reused by accident.

``finegrain train --run-dir DIR`` onto a folder that already holds files is refused unless the
run is continued (``--resume DIR``) or replaced (``--overwrite``: only a run folder's own files
are removed). While a training runs it holds an exclusive lock on ``DIR/.lock``
(``fcntl.flock``: the system releases it when the process ends, also when it is killed), so a
second training into the same folder is refused instead of interleaving its rows and
checkpoints with the first's. Only the global-zero process claims: the other DDP ranks of the
same run write into the folder it claimed.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from ..errors import InputError

__all__ = ["LOCK", "RUN_FILES", "RUN_FOLDERS", "is_global_zero_process", "RunClaim"]

LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.csv", "metrics.json", "progress.json", "last.ckpt",
             "last.ckpt.tmp", "best.ckpt", "weights.safetensors", "model.json", "curves.png",
             "hparams.yaml")
RUN_FOLDERS = ("tensorboard", "pictures", "checkpoints")
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_global_zero_process() -> bool:
    """Whether this process is rank 0 of its job, from the launchers' variables (torchrun,
    Lightning's DDP launcher, SLURM), before any process group exists."""
    return all(os.environ.get(k, "0") in ("", "0") for k in _RANK_VARIABLES)


def _contents(path: str) -> list[str]:
    return sorted(e for e in os.listdir(path) if e != LOCK) if os.path.isdir(path) else []


def _is_run_folder(entries: list[str]) -> bool:
    return bool(set(entries) & {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt"})


class RunClaim:
    """The claim on one run folder: the lock held while the training runs, and whether the
    folder was made by this claim (so a run that fails before it trained leaves nothing)."""

    def __init__(self, path: str, resuming: bool = False, overwrite: bool = False):
        self.path = path
        self.created = not os.path.exists(path)
        entries = _contents(path)
        if entries and not resuming:
            listed = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            if not _is_run_folder(entries):
                raise InputError(f"--run-dir {path} is not empty ({listed}) and holds no run: "
                                 f"choose a new or empty folder")
            if not overwrite:
                raise InputError(f"--run-dir {path} already holds a run ({listed}): continue "
                                 f"it with --resume {path}, replace it with --overwrite, or "
                                 f"choose another folder")
        os.makedirs(path, exist_ok=True)
        self._fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise InputError(f"--run-dir {path}: another finegrain train (pid {holder}) is "
                             f"writing this folder now; wait for it, or choose another "
                             f"folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        for name in os.listdir(path):  # temporaries of writes a kill interrupted
            if name.startswith(".") and ".tmp-" in name:
                os.remove(os.path.join(path, name))
        if entries and overwrite and not resuming:
            self._clear()

    def _clear(self) -> None:
        """Remove the previous run's own files and folders (nothing else)."""
        for name in RUN_FILES:
            p = os.path.join(self.path, name)
            if os.path.isfile(p):
                os.remove(p)
        for name in RUN_FOLDERS:
            p = os.path.join(self.path, name)
            if os.path.isdir(p):
                shutil.rmtree(p)

    def release(self, failed: bool = False) -> None:
        """Drop the lock; ``failed``: a run that never wrote a checkpoint into a folder this
        claim made leaves no folder behind."""
        if self._fd is None:
            return
        os.close(self._fd)  # the lock file stays: removing it would race a new claimant
        self._fd = None
        if failed and self.created and not os.path.isfile(os.path.join(self.path, "last.ckpt")):
            shutil.rmtree(self.path, ignore_errors=True)
