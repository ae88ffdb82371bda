"""One way to open a model: a finegrain checkpoint (``.ckpt``, or ``weights.safetensors`` with
its ``model.json``) or an export folder (``finegrain export``) -> :class:`LoadedModel`, the
model ready to run with its record and the hash that ties descriptors to it.

Every command and API that runs a model opens it here (``predict``, ``explain``, ``embed``,
``search``, ``serve``, ``export``, ``retrieval eval``, ``finegrain.load``), with one
strictness: a finegrain record loads whole or is refused in one paragraph naming what is
missing (:func:`finegrain.models.registry.load_model`); the lenient loader for foreign weight
files serves ``--model.pretrained`` only. A model already in memory is wrapped by
:func:`in_memory`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .meta import ModelMeta, read_meta

__all__ = ["IN_MEMORY", "NO_FILE_HASHES", "LoadedModel", "checkpoint_hash", "in_memory",
           "open_model"]

IN_MEMORY = "in-memory"
"""The checkpoint hash of descriptors made by a model object that no file holds."""
NO_FILE_HASHES = (IN_MEMORY, "untrained")
"""Hashes that name no file (``untrained``: descriptor files of older versions): an index
recording one is searched by any model of its name, as nothing can be compared."""


def checkpoint_hash(path: str | os.PathLike, length: int = 16) -> str:
    """First ``length`` hex digits of the sha256 of a checkpoint file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


@dataclass(frozen=True)
class LoadedModel:
    """An opened model. ``model``: an ``nn.Module`` in eval mode, or an export folder's
    :class:`~finegrain.runtime.ExportedModel` (same call, same output dict); ``meta``: its
    record; ``checkpoint_hash``: of the checkpoint file (an export's: of the checkpoint it was
    exported from, so their descriptors search together), :data:`IN_MEMORY` for a model
    object; ``path``; ``runtime``: ``"torch"`` or ``"onnx"``."""

    model: Any
    meta: ModelMeta
    checkpoint_hash: str | None
    path: str | None
    runtime: str = "torch"

    @property
    def exported(self) -> bool:
        """An export folder (no parameters, no ``explain``)."""
        from .runtime import ExportedModel
        return isinstance(self.model, ExportedModel)


def open_model(path: str | os.PathLike, runtime: str | None = None,
               device: str | torch.device = "cpu", **overrides: Any) -> LoadedModel:
    """Open a checkpoint or an export folder.

    Args:
        path: a finegrain ``.ckpt``, a ``weights.safetensors`` beside its ``model.json``, or an
            export folder.
        runtime: an export folder's ``"onnx"`` (``model.onnx``) or ``"torch"`` (``model.pt2``);
            None: the folder's format. ``"onnx"`` with a checkpoint is refused, naming the
            export command.
        device: where a checkpoint's model is put.
        **overrides: model arguments replacing stored ones (DCAL's ``sa_only``); checkpoints
            only.
    """
    from .runtime import is_export_folder, load_exported
    path = os.fspath(path)
    if is_export_folder(path):
        if overrides:
            raise InputError(f"{path} is an export folder: its model is fixed; "
                             f"{', '.join(overrides)} apply to a checkpoint (export it again)")
        model, meta = load_exported(path, runtime)
        return LoadedModel(model, meta, meta.checkpoint_hash, path, model.runtime)
    if runtime == "onnx":
        raise InputError(f"--runtime onnx runs an export folder, and {path} is not one: run "
                         f"`finegrain export {path} --format onnx --out DIR`, then pass DIR")
    if not os.path.isfile(path):
        from .models.weights import missing_file_error
        raise missing_file_error(path)
    from .models.registry import load_model
    model, meta = load_model(path, **overrides)
    return LoadedModel(model.to(device).eval(), meta, checkpoint_hash(path), path)


def in_memory(model: torch.nn.Module, meta: ModelMeta | dict | None = None,
              path: str | None = None) -> LoadedModel:
    """A model object as a :class:`LoadedModel` (tests, ``retrieval_eval(model)``): the hash is
    its record's, else that of ``path`` when it is a file, else :data:`IN_MEMORY`."""
    meta = read_meta(meta, "meta", require_model=False) if meta is not None else None
    ck_hash = (meta.checkpoint_hash if meta is not None else None) or (
        checkpoint_hash(path) if path and os.path.isfile(path) else IN_MEMORY)
    return LoadedModel(model, meta, ck_hash, path, "torch")
