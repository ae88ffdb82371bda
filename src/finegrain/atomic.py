"""Files that are whole or absent: every file a later command reads is written here.

A write goes to a temporary name in the *same* folder (so the final rename never crosses a
filesystem), is flushed and ``fsync``-ed, then renamed over the final name (``os.replace``,
atomic on POSIX) and the folder is ``fsync``-ed. A process killed at any instant leaves under
the final name either the previous complete file or the new complete one, never a torn one;
the temporary file of a failed write is removed. A full disk (``ENOSPC`` / ``EDQUOT``) is a
:class:`DiskFullError` naming the file, the folder, the space it needed and what is free, and
saying that the previous file is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import Any, Callable, Iterator

from .errors import FinegrainError

__all__ = ["DiskFullError", "disk_full", "atomic_path", "write_with", "write_bytes",
           "write_text", "write_json", "save_torch", "save_safetensors"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(FinegrainError, OSError):
    """No space left while writing a file; the previous version of the file is intact."""


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full(path: str, needed: int | None = None) -> DiskFullError:
    """The one paragraph of a write to ``path`` that found its disk full."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"{_mb(needed)} needed, " if needed else ""
    have = f"{_mb(free)} free" if free is not None else "free space unknown"
    return DiskFullError(f"no space left on the disk of {folder} while writing "
                         f"{os.path.basename(path)} ({need}{have}); the previous "
                         f"{os.path.basename(path)}, if any, is intact. Free space there (or "
                         f"write elsewhere) and run the command again; a training continues "
                         f"from its last checkpoint with --resume")


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # some filesystems refuse to open folders: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, size_hint: int | None = None) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; on leaving the block without an error
    it is synced and renamed over ``path``, else removed. ``size_hint``: bytes the file
    needs, named in a disk-full error."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as e:
        _remove(tmp)
        if e.errno in _FULL:
            raise disk_full(path, size_hint) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_with(path: str, write: Callable[[str], Any], size_hint: int | None = None) -> None:
    """``write(tmp_path)`` then the atomic rename (:func:`atomic_path`)."""
    with atomic_path(path, size_hint) as tmp:
        write(tmp)


def _write_file(tmp: str, data: bytes | memoryview) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def write_bytes(path: str, data: bytes | memoryview) -> None:
    """``data`` as the whole file ``path``, atomically."""
    write_with(path, lambda tmp: _write_file(tmp, data), len(data))


def write_text(path: str, text: str) -> None:
    """``text`` (UTF-8) as the whole file ``path``, atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON in ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=indent))


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj)`` into ``path``, atomically. Serialised in memory first (as
    Lightning does): torch's own file writer reports a full disk as a bare RuntimeError."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save`` into ``path``, atomically."""
    from safetensors.torch import save
    write_bytes(path, save(tensors, metadata=metadata))
