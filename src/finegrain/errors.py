"""The errors finegrain raises for problems a user can fix: a file, a key, a setting.

Every command of ``finegrain`` prints one of these as one paragraph on stderr (the file, key
or step, and the fix) and exits with code :data:`EXIT_USER_ERROR`; ``--debug`` (or
``FINEGRAIN_DEBUG=1``) adds the traceback. Any other exception is a bug and keeps its
traceback. Each class also derives from the built-in error it refines, so code that catches
``ValueError`` / ``FileNotFoundError`` / ``KeyError`` keeps working.
"""

from __future__ import annotations

__all__ = ["EXIT_USER_ERROR", "EXIT_INTERRUPTED", "FinegrainError", "InputError",
           "MissingFileError", "UnknownNameError", "NonFiniteError", "Interrupted",
           "MissingDependencyError", "require", "one_paragraph", "nonfinite_outputs"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
"""A training stopped by Ctrl-C (SIGINT), with its last checkpoint intact (128 + SIGINT)."""


class FinegrainError(Exception):
    """A problem the user can fix; the message names the file / key / step and the fix."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(FinegrainError, ValueError):
    """A setting, an argument or a file's contents is wrong."""


class MissingFileError(FinegrainError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class UnknownNameError(FinegrainError, KeyError):
    """An unknown model, dataset or image name; the message lists the closest names."""


class NonFiniteError(FinegrainError, FloatingPointError):
    """A loss or an output became NaN / inf; the message names the step or the checkpoint."""


class Interrupted(FinegrainError):
    """Ctrl-C stopped a training; the message says which step ``last.ckpt`` holds and the
    command that continues it (exit :data:`EXIT_INTERRUPTED`)."""


class MissingDependencyError(FinegrainError, ImportError):
    """An optional dependency (an extra of the package) is not installed."""


def require(module: str, extra: str):
    """Import ``module``, or raise :class:`MissingDependencyError` naming the extra that
    installs it (``pip install 'finegrain[extra]'``)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'finegrain[{extra}]' (or `make test`, "
            f"which installs every extra)") from None


def one_paragraph(err: BaseException) -> str:
    """``err``'s message as one paragraph. An error re-raised by a DataLoader worker
    ("Caught DatasetError in DataLoader worker process 0 ... Original Traceback ...") becomes
    the worker's own message."""
    msg = str(err)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        tail = msg.rstrip().rsplit(f"{type(err).__name__}: ", 1)
        msg = tail[-1] if len(tail) == 2 else msg.splitlines()[-1]
    return " ".join(msg.split())


def nonfinite_outputs(checkpoint: str, bad: int, total: int,
                      what: str = "outputs") -> NonFiniteError:
    """The error of a command whose model gives NaN / inf for ``bad`` of ``total`` images."""
    return NonFiniteError(f"{checkpoint} gives NaN / inf {what} for {bad} of {total} images, so "
                          f"nothing was written: its weights diverged in training (learning rate "
                          f"too high?). Use an earlier checkpoint of the run (best.ckpt), or "
                          f"retrain with a lower --model.optimizer.lr or with "
                          f"--model.max_grad_norm 1.0")
