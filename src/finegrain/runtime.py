"""Running an export folder (``finegrain export``) like the PyTorch model it came from.

:func:`load_exported` gives a module whose ``forward(images)`` takes the normalised float batch
``finegrain predict`` / ``embed`` feed the PyTorch model, (B, 3, H, W) at the exported size, and
returns the same dict (``"logits"`` and / or ``"embedding"``), from ONNX Runtime
(``model.onnx``: the CUDA provider when ONNX Runtime has it, else the CPU, with torch's thread
count) or from the ``torch.export`` program (``model.pt2``). Half-precision exports
(``export.json`` ``dtype``: float16 / bfloat16) cast at their own boundaries: they take and
return float32 like the float32 ones.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from .errors import InputError, MissingFileError, require
from .meta import ModelMeta

__all__ = ["RUNTIMES", "is_export_folder", "onnx_providers", "ExportedModel", "load_exported"]

RUNTIMES = ("onnx", "torch")
_FILES = {"onnx": "model.onnx", "torch": "model.pt2"}


def is_export_folder(path: str) -> bool:
    """A folder written by ``finegrain export`` (it holds ``export.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "export.json"))


def onnx_providers() -> list[str]:
    """ONNX Runtime providers to use: CUDA first when this build has it, then the CPU."""
    ort = require("onnxruntime", "export")
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class ExportedModel(nn.Module):
    """An exported model as a module (no parameters): ``model(images)`` -> dict of tensors.

    Args:
        folder: the export folder.
        runtime: ``"onnx"`` (``model.onnx`` on ONNX Runtime) or ``"torch"`` (``model.pt2``).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, folder: str, runtime: str = "onnx", threads: int | None = None):
        super().__init__()
        if runtime not in RUNTIMES:
            raise InputError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        with open(os.path.join(folder, "export.json")) as f:
            self.info = json.load(f)
        path = os.path.join(folder, _FILES[runtime])
        if not os.path.isfile(path):
            fmt = "onnx" if runtime == "onnx" else "exported"
            raise MissingFileError(f"{path} not found: {folder} holds a {self.info['format']} "
                                   f"export; run `finegrain export CHECKPOINT --format {fmt} "
                                   f"--out {folder}` first, or pick the other --runtime")
        self.runtime, self.keys = runtime, list(self.info["outputs"])
        self.input_size = tuple(self.info["input_size"])
        self.export_dtype = self.info.get("dtype", "float32")  # weights and compute inside
        if runtime == "onnx":
            ort = require("onnxruntime", "export")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(path, opts, providers=onnx_providers())
        else:
            # kept out of the module tree: an unlifted program refuses .train() / .eval()
            self.__dict__["program"] = torch.export.load(path).module()

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The one input size (H, W) the export takes; None when ``export.json`` says height
        and width are dynamic."""
        dyn = self.info.get("dynamic", {})
        return None if dyn.get("height") and dyn.get("width") else self.input_size

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) float, normalised, at :attr:`fixed_size` (any size when it
        is None)."""
        if self.fixed_size is not None and tuple(images.shape[2:]) != self.fixed_size:
            H, W = self.fixed_size
            raise InputError(f"the exported model takes {H}x{W} images, got "
                             f"{images.shape[2]}x{images.shape[3]}: resize them as "
                             f"preprocess.json says (only the batch size is dynamic)")
        if self.runtime == "onnx":
            arr = images.detach().float().cpu().contiguous().numpy()
            outs = self.session.run(self.keys, {self.info["input"]: arr})
            return {k: torch.from_numpy(o).to(images.device) for k, o in zip(self.keys, outs)}
        self.program.to(images.device)
        return dict(zip(self.keys, self.program(images.float())))


def load_exported(folder: str, runtime: str | None = None, complete: bool = True
                  ) -> tuple[ExportedModel, ModelMeta]:
    """``(callable model, meta)`` of an export folder. ``runtime``: ``"onnx"`` or ``"torch"``;
    None picks the folder's format. ``meta`` is the checkpoint's record (``model.json``: class
    names, input size, normalisation, task) with the exported checkpoint's
    ``checkpoint_hash`` (descriptors of both match); ``model.info`` is ``export.json``.
    ``complete``: refuse a folder without ``parity.json``, which ``finegrain export`` writes
    last (an export killed or failed before it; False: the parity check itself)."""
    if not is_export_folder(folder):
        raise MissingFileError(f"{folder} is not an export folder (no export.json); write one "
                               f"with `finegrain export CHECKPOINT --format onnx --out {folder}`")
    if complete and not os.path.isfile(os.path.join(folder, "parity.json")):
        raise InputError(f"{folder} holds an interrupted export: parity.json, which "
                         f"'finegrain export' writes last, is missing, so its files may belong "
                         f"to two exports; run 'finegrain export CHECKPOINT --out {folder}' "
                         f"again")
    from .models.weights import read_model_json
    meta = read_model_json(os.path.join(folder, "model.json"))
    model = ExportedModel(folder, runtime or _default_runtime(folder))
    if meta.checkpoint_hash is None:  # folders exported before the record held it
        meta = meta.replace(checkpoint_hash=model.info.get("checkpoint_hash"))
    return model.eval(), meta


def _default_runtime(folder: str) -> str:
    with open(os.path.join(folder, "export.json")) as f:
        fmt = json.load(f)["format"]
    if fmt == "timm":
        raise InputError(f"{folder} holds a timm backbone export (backbone.safetensors): load "
                         f"it with timm (timm.json says how); predict / embed take an onnx or "
                         f"exported folder")
    return "onnx" if fmt == "onnx" else "torch"
