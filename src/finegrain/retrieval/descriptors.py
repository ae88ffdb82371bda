"""Descriptor files on disk: ``NAME.npy`` + ``NAME.json`` (the DESIGN.md contract).

- ``NAME.npy``: float32 array (N, D), one L2-normalised descriptor per row, read back
  memory-mapped (``np.load(mmap_mode="r")``) so a 1M x 512 gallery (2 GB) costs no RAM until
  rows are touched.
- ``NAME.json``::

      {"format": "finegrain-descriptors", "version": 1,
       "count": N, "dim": D, "dtype": "float32",
       "names": [...], "labels": [...],            # one per row; labels -1 when unknown
       "model_name": "dalg_vit_base_patch16_224",
       "checkpoint": "runs/.../best.ckpt",         # informative only
       "checkpoint_hash": "3f2a...",               # sha256 of the checkpoint file, 16 hex
       "preprocessing": {"resize": "longest_side", "img_size": 512, "upscale": false,
                         "scales": [1.0],
                         "mean": [...], "std": [...], "crop_query_bbx": true,
                         "crop_scale": "full_image"},   # queries: cirtorch / DELG scale
       "dataset": "roxford5k", "split": "gallery"}

  ``img_size`` is the LONGEST side S of the resized image (aspect ratio kept), not the
  (H, W) input size of training. Files written before 2026-11-30 say ``"image_size"``
  there; :func:`read_json` reads them with today's name (:func:`upgrade_meta`, the one place
  older field names are translated).

**Sharded sets** (``finegrain embed --no-merge``, :mod:`finegrain.retrieval.sharded`):
``NAME.manifest.json`` has the fields of ``NAME.json`` plus ``"shards": [{"path", "count"}]``
(paths relative to the manifest, in global name order); :func:`load_descriptors` reads ``NAME``
(or ``NAME.manifest.json``) as one set whose ``vectors`` is a :class:`ConcatRows` over the
memory-mapped shards (rows are read on demand; nothing is concatenated into RAM).

Two descriptor sets can be searched against each other only when they come from the same model
(``model_name`` and ``checkpoint_hash``) and the same preprocessing (:data:`COMPARED_PREPROCESSING`
keys); :func:`check_compatible` raises a :class:`DescriptorMismatch` naming the differing field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..atomic import write_json, write_with
from ..errors import InputError, MissingFileError

__all__ = ["Descriptors", "DescriptorMismatch", "save_descriptors", "load_descriptors",
           "check_compatible", "descriptor_paths", "signature",
           "COMPARED_PREPROCESSING", "ConcatRows", "descriptor_meta", "manifest_path",
           "MANIFEST_FORMAT", "read_json", "upgrade_meta"]

FORMAT = "finegrain-descriptors"
VERSION = 1
MANIFEST_FORMAT = "finegrain-descriptor-manifest"
#: Preprocessing fields that must agree between queries and database (``crop_query_bbx`` and
#: the dataset / split differ legitimately between a query and a gallery file).
COMPARED_PREPROCESSING = ("resize", "img_size", "upscale", "scales", "mean", "std")
#: Older names of ``preprocessing`` fields -> today's (files written before 2026-11-30).
PREPROCESSING_ALIASES = {"image_size": "img_size"}
#: ``preprocessing.upscale`` of a longest-side record without it: files written before that
#: field existed were extracted with images smaller than ``img_size`` enlarged to it.
UPSCALE_BEFORE_THE_FIELD = True


class DescriptorMismatch(InputError):
    """Two descriptor sets (or an index and a descriptor set) come from different models or
    preprocessing; searching one against the other would be meaningless."""


def descriptor_paths(name: str | os.PathLike) -> tuple[str, str]:
    """``(NAME.npy, NAME.json)`` for ``NAME``, ``NAME.npy`` or ``NAME.json``."""
    base = os.fspath(name)
    if base.endswith(".npy") or base.endswith(".json"):
        base = os.path.splitext(base)[0]
    return base + ".npy", base + ".json"


def manifest_path(name: str | os.PathLike) -> str:
    """``NAME.manifest.json`` for ``NAME`` (or ``NAME.npy`` / ``NAME.json`` /
    ``NAME.manifest.json``)."""
    base = os.fspath(name)
    if base.endswith(".manifest.json"):
        return base
    return os.path.splitext(descriptor_paths(base)[0])[0] + ".manifest.json"


class ConcatRows:
    """Several (n_i, D) arrays (memory-mapped shards) read as one (N, D) array without copying
    them: ``shape``, ``dtype``, ``ndim``, ``len`` and row indexing (an int, a slice, an integer
    or boolean array, optionally with column indices after it) read only the rows asked for;
    ``np.asarray`` concatenates everything (small sets only)."""

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise InputError("ConcatRows needs at least one array")
        dims = {int(p.shape[1]) for p in parts}
        if len(dims) != 1 or any(p.ndim != 2 for p in parts):
            raise InputError(f"shards disagree: shapes {[p.shape for p in parts]}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), dims.pop())
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts, axis=0)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        part = np.searchsorted(self.offsets, flat, side="right") - 1
        for j in np.unique(part):
            sel = np.flatnonzero(part == j)
            out[sel] = self.parts[j][flat[sel] - self.offsets[j]]
        return out.reshape(idx.shape + (self.shape[1],))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            one_row = isinstance(key[0], (int, np.integer))
            return rows[key[1:]] if one_row else rows[(slice(None),) + key[1:]]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            k = int(key) + n if int(key) < 0 else int(key)
            if not 0 <= k < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            j = int(np.searchsorted(self.offsets, k, side="right") - 1)
            return self.parts[j][k - self.offsets[j]]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self._rows(np.arange(start, stop, step))
            stop = max(start, stop)
            pieces = []
            for j, p in enumerate(self.parts):
                a, b = max(start, self.offsets[j]), min(stop, self.offsets[j + 1])
                if a < b:
                    pieces.append(p[a - self.offsets[j]:b - self.offsets[j]])
            if len(pieces) == 1:
                return pieces[0]  # a view of one memory-mapped shard
            if not pieces:
                return np.empty((0, self.shape[1]), dtype=self.dtype)
            return np.concatenate(pieces, axis=0)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            idx = np.flatnonzero(idx)
        return self._rows(idx)


@dataclass
class Descriptors:
    """A descriptor set: ``vectors`` (N, D) float32 (memory-mapped when loaded) and ``meta``
    (the JSON side-car)."""

    vectors: np.ndarray
    meta: dict[str, Any]
    path: str = ""

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    @property
    def labels(self) -> list[int]:
        return list(self.meta["labels"])


def save_descriptors(name: str | os.PathLike, vectors: np.ndarray, names: Sequence[str],
                     model_name: str, checkpoint_hash: str,
                     preprocessing: dict[str, Any], labels: Sequence[int] | None = None,
                     **extra: Any) -> tuple[str, str]:
    """Write ``NAME.npy`` (float32) and ``NAME.json``; returns both paths.

    Args:
        name: output path without extension (``.npy`` / ``.json`` suffixes are stripped).
        vectors: (N, D) descriptors.
        names: N image names (unique within the file).
        model_name: registered model name.
        checkpoint_hash: :func:`finegrain.loading.checkpoint_hash` of the checkpoint (or
            :data:`finegrain.loading.IN_MEMORY`).
        preprocessing: the extraction's preprocessing (see :data:`COMPARED_PREPROCESSING`).
        labels: N integer labels (``-1`` when unknown; default all ``-1``).
        **extra: further JSON fields (``dataset``, ``split``, ``checkpoint`` ...).

    Raises:
        ValueError: wrong shapes, non-finite values or duplicate names.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise InputError(f"descriptors must be (N, D), got shape {vectors.shape}")
    names = [str(n) for n in names]
    labels = [-1] * len(names) if labels is None else [int(v) for v in labels]
    if len(names) != len(vectors) or len(labels) != len(vectors):
        raise InputError(f"{len(vectors)} descriptors but {len(names)} names and "
                         f"{len(labels)} labels")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise InputError(f"image name {dup!r} appears twice; descriptor names must be unique")
    if not np.isfinite(vectors).all():
        raise InputError("descriptors contain NaN / inf; check the model and the images")
    npy, js = descriptor_paths(name)
    meta = descriptor_meta(len(vectors), int(vectors.shape[1]), names, labels, model_name,
                           checkpoint_hash, preprocessing, **extra)
    # each file whole or absent (a kill between the two leaves a pair that load refuses)
    write_with(npy, lambda tmp: _save_npy(tmp, vectors), vectors.nbytes + 128)
    write_json(js, meta)
    return npy, js


def _save_npy(path: str, vectors: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, vectors)


def descriptor_meta(count: int, dim: int, names: Sequence[str], labels: Sequence[int],
                    model_name: str, checkpoint_hash: str, preprocessing: dict[str, Any],
                    **extra: Any) -> dict[str, Any]:
    """The ``NAME.json`` dict (fields in the order :func:`save_descriptors` writes them)."""
    return {"format": FORMAT, "version": VERSION, "count": int(count), "dim": int(dim),
            "dtype": "float32", "names": list(names), "labels": list(labels),
            "model_name": model_name, "checkpoint_hash": checkpoint_hash,
            "preprocessing": preprocessing, **extra}


def upgrade_meta(meta: Any) -> Any:
    """A descriptor / manifest / shard JSON or index manifest (or the JSON of an index folder)
    with the field names of today: older names are translated here and nowhere else
    (:data:`PREPROCESSING_ALIASES`: ``preprocessing.image_size`` -> ``img_size``; a
    longest-side record without ``upscale`` gets the enlarging it was made with,
    :data:`UPSCALE_BEFORE_THE_FIELD`), so signature checks, resumed extractions and searches
    treat old and new files alike. Returns ``meta``, changed in place (anything but a dict
    is returned as is)."""
    if not isinstance(meta, dict):
        return meta
    pre = meta.get("preprocessing")
    if isinstance(pre, dict) and any(k in pre for k in PREPROCESSING_ALIASES):
        pre = meta["preprocessing"] = {
            PREPROCESSING_ALIASES.get(k, k): v for k, v in pre.items()
            if not (k in PREPROCESSING_ALIASES and PREPROCESSING_ALIASES[k] in pre)}
    if isinstance(pre, dict) and pre.get("resize") == "longest_side" and "upscale" not in pre:
        pre["upscale"] = UPSCALE_BEFORE_THE_FIELD
    return meta


def read_json(path: str, fix: str) -> Any:
    """The JSON of a descriptor / manifest / shard file or of an index folder in ``path``,
    with today's field names (:func:`upgrade_meta`); :class:`~finegrain.errors.InputError`
    naming the file and ``fix`` when it is truncated or not JSON."""
    try:
        with open(path) as f:
            return upgrade_meta(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); {fix}") from None


def load_descriptors(name: str | os.PathLike, mmap: bool = True) -> Descriptors:
    """Read ``NAME.npy`` (memory-mapped by default) and ``NAME.json``; or, when only
    ``NAME.manifest.json`` is there (or it is named), the sharded set it lists, in its order,
    as one :class:`Descriptors` whose vectors are a :class:`ConcatRows` of the mapped shards.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: the two files disagree (count, dim) or the JSON is not a descriptor file.
    """
    manifest = manifest_path(name)
    npy, js = descriptor_paths(name)
    if os.fspath(name).endswith(".manifest.json") or (
            os.path.isfile(manifest) and not (os.path.isfile(npy) and os.path.isfile(js))):
        return _load_manifest(manifest, mmap)
    for p in (npy, js):
        if not os.path.isfile(p):
            raise MissingFileError(f"{p} not found: descriptors are NAME.npy + NAME.json (or "
                                   f"NAME.manifest.json with its shards) as written by "
                                   f"'finegrain embed ... --out NAME'")
    meta = read_json(js, "write the descriptors again with 'finegrain embed'")
    if meta.get("format") != FORMAT:
        raise InputError(f"{js} is not a finegrain descriptor file (format "
                         f"{meta.get('format')!r}); write it with 'finegrain embed'")
    vectors = load_array(npy, mmap, "extract again with 'finegrain embed'")
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise InputError(f"{npy}: expected a float32 (N, D) array, got {vectors.dtype} "
                         f"{vectors.shape}")
    if vectors.shape != (meta["count"], meta["dim"]) or len(meta["names"]) != meta["count"]:
        raise InputError(f"{npy} has shape {vectors.shape} but {js} describes "
                         f"({meta['count']}, {meta['dim']}) with {len(meta['names'])} names; "
                         f"the pair is out of sync: extract again")
    return Descriptors(vectors, meta, os.path.splitext(npy)[0])


def load_array(path: str, mmap: bool, fix: str) -> np.ndarray:
    """``np.load`` of a descriptor ``.npy`` (memory-mapped when ``mmap``); a truncated or
    damaged file (numpy: "mmap length is greater than file size", a bad header) is an
    :class:`~finegrain.errors.InputError` naming it, its size and ``fix``."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise InputError(f"{path} ({size} bytes) is truncated or damaged ({e}); {fix}") from None


def _load_manifest(path: str, mmap: bool) -> Descriptors:
    """A sharded descriptor set (``NAME.manifest.json``) as one :class:`Descriptors`."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} not found: write it with 'finegrain embed ... --out NAME "
                               f"--no-merge'")
    fix = "extract again with 'finegrain embed' (finished shards are kept)"
    meta = read_json(path, fix)
    if meta.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a finegrain descriptor manifest (format "
                         f"{meta.get('format')!r}); {fix}")
    folder = os.path.dirname(os.path.abspath(path))
    parts = []
    for sh in meta["shards"]:
        p = os.path.join(folder, sh["path"])
        if not os.path.isfile(p):
            raise MissingFileError(f"{p} (a shard listed in {path}) not found; {fix}")
        v = load_array(p, mmap, f"it is a shard listed in {path}: {fix}")
        if v.ndim != 2 or v.dtype != np.float32 or v.shape != (sh["count"], meta["dim"]):
            raise InputError(f"{p}: expected float32 ({sh['count']}, {meta['dim']}) as {path} "
                             f"says, got {v.dtype} {v.shape}; {fix}")
        parts.append(v)
    if not parts:
        vectors = np.zeros((0, meta["dim"]), dtype=np.float32)
    elif len(parts) == 1:
        vectors = parts[0]
    else:
        vectors = ConcatRows(parts) if mmap else np.concatenate(parts, axis=0)
    if vectors.shape != (meta["count"], meta["dim"]) or len(meta["names"]) != meta["count"]:
        raise InputError(f"{path} describes ({meta['count']}, {meta['dim']}) with "
                         f"{len(meta['names'])} names but its shards hold {vectors.shape}; {fix}")
    return Descriptors(vectors, meta, path[:-len(".manifest.json")])


def signature(meta: dict[str, Any]) -> dict[str, Any]:
    """The fields that must agree for two descriptor sets to be comparable."""
    pre = meta.get("preprocessing", {})
    return {"model_name": meta.get("model_name"), "checkpoint_hash": meta.get("checkpoint_hash"),
            "dim": meta.get("dim"),
            **{f"preprocessing.{k}": pre.get(k) for k in COMPARED_PREPROCESSING}}


def check_compatible(a: dict[str, Any], b: dict[str, Any], what_a: str = "the index",
                     what_b: str = "the descriptors") -> None:
    """Raise :class:`DescriptorMismatch` unless ``a`` and ``b`` (descriptor JSONs or index
    manifests) come from the same model, checkpoint and preprocessing."""
    sa, sb = signature(a), signature(b)
    diff = [k for k in sa if _norm(sa[k]) != _norm(sb[k])]
    if diff:
        details = "; ".join(f"{k}: {sa[k]!r} in {what_a} vs {sb[k]!r} in {what_b}" for k in diff)
        raise DescriptorMismatch(
            f"{what_b} do not match {what_a} ({details}); descriptors are only comparable when "
            f"extracted by the same model checkpoint with the same preprocessing: re-run "
            f"'finegrain embed' with the same checkpoint, --img-size and --scales"
            + (" (and --upscale where the other side enlarged small images)"
               if "preprocessing.upscale" in diff else ""))


def _norm(v: Any) -> Any:
    """Lists / tuples of floats compare rounded (JSON round trips)."""
    if isinstance(v, (list, tuple)):
        return tuple(round(float(x), 6) if isinstance(x, float) else x for x in v)
    return v
