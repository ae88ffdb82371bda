"""Small shared helpers for the readers: list-file rows with line numbers, integer fields
whose errors name the file, the line and the fix, locating files among the layouts a dataset
is distributed in, relabelling to contiguous indices, the restricted unpickler.

Every reader still has its own explicit parser per file format; these only keep the error
messages uniform.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

from ...evaluation.revisited import RestrictedUnpickler
from .base import DatasetError, check_file

__all__ = ["IMAGE_EXTENSIONS", "read_rows", "read_lines_numbered", "to_int", "to_float",
           "find_first", "relabel", "list_images", "safe_load_pickle"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def read_rows(path: str, what: str, min_cols: int, maxsplit: int = -1,
              sep: str | None = None, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Rows of a whitespace (or ``sep``) separated list file as ``(line_number, fields)``.

    Args:
        path: the list file (checked to exist first).
        what: what the file should be, for the "missing" message.
        min_cols: fewest fields a row must have.
        maxsplit: as ``str.split`` (``-1``: split every separator); lets the last field hold
            spaces (class names).
        sep: separator (``None``: any whitespace).
        skip: header lines to skip (line numbers stay those of the file, 1-based).

    Raises:
        DatasetError: the file is missing, or a row has fewer than ``min_cols`` fields.
    """
    rows = []
    with open(check_file(path, what), encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if n <= skip:
                continue
            line = line.strip()
            if not line:
                continue
            fields = [x.strip() for x in line.split(sep, maxsplit)]
            if len(fields) < min_cols:
                raise DatasetError(
                    f"{path} line {n}: expected {min_cols} fields ({what}), got "
                    f"{len(fields)}: {line!r}; the file is truncated or not the published one, "
                    f"re-extract it")
            rows.append((n, fields))
    return rows


def read_lines_numbered(path: str, what: str, skip: int = 0) -> list[tuple[int, str]]:
    """Non-empty stripped lines of a list file as ``(line_number, line)`` (1-based numbers,
    the first ``skip`` lines left out; checked to exist first)."""
    with open(check_file(path, what), encoding="utf-8") as f:
        return [(n, ln.strip()) for n, ln in enumerate(f, start=1) if n > skip and ln.strip()]


def to_int(value: str, path: str, line: int, field: str) -> int:
    """``int(value)`` or a :class:`DatasetError` naming the file, line and field."""
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path} line {line}: {field} {value!r} is not an integer; the "
                           f"file is corrupt or not the published one, re-extract it") from None


def to_float(value: str, path: str, line: int, field: str) -> float:
    """``float(value)`` or a :class:`DatasetError` naming the file, line and field."""
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{path} line {line}: {field} {value!r} is not a number; the "
                           f"file is corrupt or not the published one, re-extract it") from None


def find_first(root: str, candidates: Iterable[str], what: str) -> str:
    """The first of ``candidates`` (relative to ``root``) that exists.

    Raises:
        DatasetError: none exists; the message lists every place looked at.
    """
    candidates = list(candidates)
    for c in candidates:
        p = os.path.join(root, c)
        if os.path.exists(p):
            return p
    tried = ", ".join(os.path.join(root, c) for c in candidates)
    raise DatasetError(f"missing {what}: looked for {tried}; is the root the folder of the "
                       f"published layout?")


def relabel(values: Iterable) -> dict:
    """``{value: index}`` over the sorted distinct values (contiguous 0..C-1)."""
    return {v: i for i, v in enumerate(sorted(set(values)))}


def list_images(folder: str) -> list[str]:
    """Sorted image file names (not paths) directly in ``folder``."""
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


# ---------------------------------------------------------------------------------------------
# Restricted unpickling (Revisited Oxford / Paris ground truth)

def safe_load_pickle(path: str, what: str):
    """Load a pickle that may only hold builtins and numpy arrays.

    Raises:
        DatasetError: the file is missing, corrupt, or references any other global (the
            message names the file and the global).
    """
    with open(check_file(path, what), "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), path).load()
    except Exception as e:
        raise DatasetError(f"{path}: cannot load {what} safely ({e}); only plain lists / dicts "
                           f"and numpy arrays are accepted: download the original file "
                           f"again") from None
