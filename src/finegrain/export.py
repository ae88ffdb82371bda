"""``finegrain export``: a checkpoint as a deployable model folder, checked against PyTorch.

Formats (``--format``):

- ``onnx``: ``model.onnx`` from ``torch.onnx.export(dynamo=True)`` (ONNX Runtime, TensorRT...);
- ``exported``: ``model.pt2``, a ``torch.export`` program (``torch.export.load``; AOTInductor);
- ``timm``: ``backbone.safetensors``, the fine-tuned backbone in timm's own key names, loaded by
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs)``
  with the ``name`` and ``kwargs`` of ``timm.json`` beside it.

Every method is exported in eval mode with its whole inference path (DCAL's rollout, top-R
selection and GLCA, or the SA branch alone with ``sa_only``; TASN's attention maps and
sampler; DALG's window attention and fusion). Cross-image models lose their conditional
branch, which only training uses: neither the exported model nor the ``weights.safetensors``
written beside it hold a ``cross.*`` parameter. The batch dimension is dynamic; the image size
is the checkpoint's (``preprocess.json`` says how to resize, crop and normalise to it).

Precision (``--dtype``): ``float32`` (default, the checkpoint's weights), or ``float16`` /
``bfloat16`` for ``onnx`` and ``exported``: weights and compute in that dtype, with casts at the
boundaries inside the exported module (float32 images in, float32 outputs out), so the runtime,
``predict``, ``embed`` and ``serve`` run it unchanged. What a method keeps in fp32 on purpose
stays fp32 inside (softmax and rollout, TASN's attention sampler, normalised embeddings).
``weights.safetensors`` stays the float32 checkpoint. Refused, with one line saying what works:
``--format onnx --dtype bfloat16`` (ONNX Runtime has no bfloat16 ``Conv`` kernel, so it could
not be checked) and ``--format timm`` with a half dtype.

A folder holds ``model.onnx`` | ``model.pt2`` | ``backbone.safetensors`` + ``timm.json``,
``weights.safetensors`` + ``model.json`` (the inference model as a finegrain checkpoint),
``preprocess.json``, ``export.json`` (format, input and output names) and ``parity.json``.

Parity: after every export the written files are loaded back (:mod:`finegrain.runtime`) and
run on real images (a generated dataset's test split, or the user's), in a batch of one and a
batch of the rest; per output, max and mean ``|exported - PyTorch|``, the error relative to
the output's scale (``max |PyTorch|``), top-1 agreement (logits) and nearest-neighbour
agreement (embeddings). The export fails when a relative error is above :data:`TOLERANCES`
(by dtype; the reference is the float32 PyTorch model).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from unittest import mock

import torch
import torch.nn as nn

from .atomic import save_safetensors, write_json
from .errors import FinegrainError, InputError, MissingFileError, require
from .meta import ModelMeta

__all__ = ["FORMATS", "MODEL_FILES", "TOLERANCES", "INPUT_NAME", "ParityError", "DTYPES",
           "inference_model", "input_size", "preprocessing", "search_steps", "write_onnx",
           "write_exported", "backbone_timm_args", "write_timm", "load_timm_backbone",
           "parity_images", "compare_outputs", "check_parity", "search_inputs",
           "check_dtype", "export", "format_parity"]

FORMATS = ("onnx", "exported", "timm")
MODEL_FILES = {"onnx": "model.onnx", "exported": "model.pt2", "timm": "backbone.safetensors"}
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
"""Largest ``max |exported - PyTorch| / max |PyTorch|`` per output, by the exported dtype; the
reference is always the checkpoint's float32 PyTorch model.

- float32 (the checkpoint's weights): kernels differ in summation order only, so outputs agree
  to about 1e-6 of their scale; 1e-4 leaves room for the ops (attention, resampling) whose ONNX
  kernels accumulate differently.
- float16 (10-bit mantissa, eps 9.8e-4): the registered tiny models land at 1.5e-4 to 3.5e-3
  and the trained demo checkpoints at 2.4e-4 to 6.8e-3 (TASN's embedding through ONNX: its
  attention maps steer the sampler, which amplifies the rounding); 2e-2 is 3x the largest.
- bfloat16 (7-bit mantissa, eps 7.8e-3): tiny models 3.2e-3 to 1.8e-2, trained demo
  checkpoints 2.9e-3 to 4.8e-2 (TASN's embedding again); 1e-1 is 2x the largest.

Not widened for a discrete choice that flips: DCAL's top-R selection on near-tied rollout
scores (random-weight tiny DCAL: 9.3e-2 in float16, up to 2.3e-1 in bfloat16, from the images
whose selection changed) fails the check, as it should; the trained demo DCAL passes in both
(docs/deploy.md, "Half-precision exports")."""
INPUT_NAME = "images"


class ParityError(FinegrainError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _HalfBoundary(nn.Module):
    """``model`` with weights and compute in ``dtype`` behind float32 boundaries: the float32
    images are cast to ``dtype`` on the way in, every floating output to float32 on the way
    out, so the exported model takes and returns what the float32 one does. What a method
    computes in fp32 on purpose (softmax, rollout, TASN's sampler, normalised embeddings)
    stays fp32 inside."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = copy.deepcopy(model).to(dtype).eval(), dtype

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images.to(self.dtype))
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


class _OutputTuple(nn.Module):
    """``model(images)``'s dict as a tuple in ``keys`` order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(out[k] for k in self.keys)


# ---- the inference model ----------------------------------------------------------------
def inference_model(model: nn.Module, meta: ModelMeta) -> tuple[nn.Module, ModelMeta]:
    """An eval-mode copy of ``model`` without its training-only branch, and its record.

    The model says what only training uses (:meth:`FinegrainModel.drop_training_only`: the
    cross-image models' conditional branch ``cross``) and the arguments that record it, so
    ``weights.safetensors`` + ``model.json`` rebuild exactly this model.
    """
    from .models.registry import FinegrainModel, with_model_args
    model = copy.deepcopy(model).eval()
    dropped = model.drop_training_only() if isinstance(model, FinegrainModel) else {}
    if dropped:
        meta = with_model_args(meta, **dropped)
    return model, meta


def input_size(meta: ModelMeta) -> tuple[int, int]:
    """(H, W) the model is exported for: the checkpoint's ``img_size``."""
    s = meta.img_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def preprocessing(meta: ModelMeta, search: str | None = None) -> dict:
    """The evaluation transform of ``meta`` (``finegrain predict``'s) as plain data: the ops in
    order (resize, crop, scaling to [0, 1], normalisation), then the input layout. With
    ``search`` (a model with an ``embedding``: ``"any_size"`` when the export takes any image
    size, ``"fixed"`` when the model takes its input size only, ``"unreproducible"`` when the
    model takes any size but the format does not) also ``search``: the steps that
    ``finegrain embed`` / ``search`` / ``serve`` apply before the model, which a client must
    apply to reproduce their descriptors (the index's ``preprocessing`` record at its
    default size: longest side to ``img_size``, never enlarged; or, fixed, a plain resize)."""
    from torchvision.transforms import v2

    from .inference import eval_transform
    steps = []
    for t in eval_transform(meta).transforms:
        if isinstance(t, v2.Resize):
            size = list(t.size) if isinstance(t.size, (list, tuple)) else t.size
            rule = "shorter_side" if isinstance(size, int) or len(size) == 1 else "exact"
            steps.append({"op": "resize", "size": size, "rule": rule,
                          "interpolation": str(getattr(t.interpolation, "value", t.interpolation)),
                          "antialias": bool(t.antialias)})
        elif isinstance(t, v2.CenterCrop):
            steps.append({"op": "center_crop", "size": list(t.size)})
        elif isinstance(t, v2.ToDtype):
            steps.append({"op": "to_float", "scale": "uint8 / 255"})
        elif isinstance(t, v2.Normalize):
            steps.append({"op": "normalize", "mean": list(t.mean), "std": list(t.std)})
        else:
            raise InputError(f"preprocessing: no JSON form for {type(t).__name__}; describe it "
                             f"in finegrain/export.py:preprocessing")
    H, W = input_size(meta)
    out = {"task": meta.task, "steps": steps,
           "input": {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB",
                     "dtype": "float32", "height": H, "width": W, "batch": "dynamic"}}
    if search is not None:
        out["search"] = search_steps(meta, search)
        if search == "any_size":
            out["input"].update(height="dynamic", width="dynamic")
    return out


def search_steps(meta: ModelMeta, search: str) -> dict:
    """``preprocess.json``'s ``search`` section (see :func:`preprocessing`): what a plain
    client does to an RGB uint8 photo to get ``finegrain search``'s descriptor."""
    H, W = input_size(meta)
    if search == "unreproducible":
        return {"what": f"not reproducible with this export: finegrain embeds this model's "
                        f"photos whole at any aspect ratio, this format takes {H}x{W} only; "
                        f"export with --format onnx (any size) for search"}
    pil = "Pillow: Image.resize((new_w, new_h), Image.BILINEAR) on the RGB uint8 image"
    if search == "any_size":
        resize = {"op": "resize", "rule": "longest_side", "size": max(H, W), "upscale": False,
                  "interpolation": "bilinear", "antialias": True, "library": pil,
                  "note": "scale = min(1, size / max(h, w)); new side = round(side * scale) "
                          "(Python's round), at least 1; no resize when the sides are "
                          "unchanged"}
    else:
        resize = {"op": "resize", "rule": "fixed", "size": [H, W], "interpolation": "bilinear",
                  "antialias": True, "library": pil,
                  "note": "the whole photo to new_h x new_w = size, aspect ratio not kept "
                          "(the model takes this size only); no resize when it is that size"}
    return {"what": "the descriptors of finegrain embed / search / serve (the index's "
                    "preprocessing record, index.json 'preprocessing', at its default size, "
                    "scales [1.0])",
            "steps": [resize, {"op": "to_float", "scale": "uint8 / 255"},
                      {"op": "normalize", "mean": list(meta.mean), "std": list(meta.std)}],
            "output": "embedding, L2-normalised (B, D)"}


# ---- writing ----------------------------------------------------------------------------
def _searchsorted(sorted_sequence, self, out_int32: bool = False, right: bool = False,
                  side: str | None = None, sorter=None):
    """``aten::searchsorted.Tensor`` in ONNX (no such op): the insertion index is the count of
    sorted values below ``self`` (``<=`` for ``right``), exact for a sorted sequence. TASN's
    inverse CDF is (B, n) x (B, m): the (B, m, n) comparison is small."""
    from onnxscript import opset18 as op
    if sorter is not None:
        raise InputError("ONNX export: searchsorted with a sorter is not supported")
    right = right or side == "right"
    seq = op.Unsqueeze(sorted_sequence, op.Constant(value_ints=[-2]))  # (..., 1, n)
    val = op.Unsqueeze(self, op.Constant(value_ints=[-1]))  # (..., m, 1)
    below = op.LessOrEqual(seq, val) if right else op.Less(seq, val)  # (..., m, n)
    count = op.ReduceSum(op.Cast(below, to=7), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Cast(count, to=6) if out_int32 else count  # INT64 = 7, INT32 = 6


def _dynamic_batch() -> tuple[dict]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _dynamic_size() -> tuple[dict]:
    auto = torch.export.Dim.AUTO  # height and width as the traced graph allows
    return ({0: torch.export.Dim("batch", min=1, max=4096), 2: auto, 3: auto},)


def write_onnx(module: nn.Module, example: torch.Tensor, keys: list[str], path: str,
               dynamic_size: bool = False) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` (returns the tuple of ``keys``) with a
    dynamic batch (and height and width with ``dynamic_size``); the exporter's progress
    lines are kept off stdout."""
    for dep in ("onnx", "onnxscript", "onnxruntime"):
        require(dep, "export")
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module, (example,), dynamo=True,
            dynamic_shapes=_dynamic_size() if dynamic_size else _dynamic_batch(),
            input_names=[INPUT_NAME], output_names=list(keys), verbose=False,
            custom_translation_table={torch.ops.aten.searchsorted.Tensor: _searchsorted})
        program.save(path)


def write_exported(module: nn.Module, example: torch.Tensor, path: str) -> None:
    """``torch.export`` program of ``module`` with a dynamic batch, saved as ``.pt2``."""
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, path)


def backbone_timm_args(meta: ModelMeta) -> tuple[nn.Module, str, dict]:
    """``(backbone, timm name, timm.create_model kwargs)`` of ``meta``'s model: the model is
    rebuilt once with ``timm.create_model`` recorded, and the call that made ``.backbone``
    gives the exact arguments (tiny test configurations, ``dynamic_img_size`` ...)."""
    import timm

    from .models.registry import create_model
    calls = []
    real = timm.create_model

    def record(name, *args, **kwargs):
        m = real(name, *args, **kwargs)
        calls.append((m, name, kwargs))
        return m

    with mock.patch.object(timm, "create_model", record):
        model = create_model(meta.model_name, **meta.model_kwargs)
    backbone = getattr(model, "backbone", None)
    for m, name, kwargs in calls:
        if m is backbone:
            kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
            return backbone, name, kwargs
    raise InputError(f"{meta.model_name} has no timm backbone (.backbone) to export; "
                     f"use --format onnx or exported")


def write_timm(model: nn.Module, meta: ModelMeta, out: str) -> dict:
    """``backbone.safetensors`` (timm key names, no ``backbone.`` prefix) and ``timm.json``
    (``model_name``, ``kwargs`` of ``timm.create_model``); returns the ``timm.json`` dict."""
    _, name, kwargs = backbone_timm_args(meta)
    sd = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
    save_safetensors(sd, os.path.join(out, MODEL_FILES["timm"]))
    info = {"model_name": name, "kwargs": kwargs, "file": MODEL_FILES["timm"],
            "usage": f"timm.create_model({name!r}, pretrained=True, "
                     f"pretrained_cfg_overlay=dict(file='{MODEL_FILES['timm']}'), **kwargs)"}
    write_json(os.path.join(out, "timm.json"), info)
    return info


def load_timm_backbone(folder: str) -> nn.Module:
    """The exported backbone rebuilt by timm alone from ``folder`` (eval mode)."""
    import timm
    with open(os.path.join(folder, "timm.json")) as f:
        info = json.load(f)
    path = os.path.join(folder, info["file"])
    return timm.create_model(info["model_name"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=path), **info["kwargs"]).eval()


def _write_json(path: str, obj: dict) -> None:
    write_json(path, obj)


# ---- parity -----------------------------------------------------------------------------
def _image_paths(images: list[str]) -> list[str]:
    """The image files of ``--images`` (files or folders: every image under them, sorted)."""
    from .data.datasets.images import resolve_images
    paths = []
    for p in images:
        if os.path.isdir(p):
            paths += [f for f, _ in resolve_images(p)[1]]  # as `embed --images DIR`
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise MissingFileError(f"--images: {p} not found; pass image files or folders")
    if not paths:
        raise InputError(f"--images {' '.join(images)}: no image files (.jpg, .png ...)")
    return paths


def parity_images(meta: ModelMeta, images: list[str] | None = None, num_images: int = 16
                  ) -> tuple[torch.Tensor, str]:
    """``(normalised batch (N, 3, H, W), where it came from)``. ``images``: files or folders
    (every image under them, sorted); None: the test split of a generated CUB-layout dataset
    (``synthetic_fgvc``, written to a temporary folder and read back as JPEG files)."""
    from .inference import load_images
    if images:
        paths = _image_paths(images)[:num_images]
        return load_images(paths, meta), f"{len(paths)} images from {', '.join(images)}"
    from .data import build_dataset
    from .data.synthetic import FGVCConfig, generate_cub
    per_class = max(1, -(-num_images // 4))
    cfg = FGVCConfig(num_classes=4, train_per_class=1, test_per_class=per_class,
                     size=max(96, *input_size(meta)), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_dataset("cub200", generate_cub(tmp, cfg), "test")
        paths = [s.path for s in ds.samples][:num_images]
        x = load_images(paths, meta)
    return x, f"synthetic_fgvc test split ({len(paths)} generated images, seed 0)"


def _nearest(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity."""
    e = torch.nn.functional.normalize(e.double().reshape(len(e), -1), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def compare_outputs(ref: dict, got: dict, tolerance: float) -> dict:
    """Per output key: ``max_abs``, ``mean_abs``, ``scale`` (max |ref|), ``rel_max``
    (max_abs / scale), ``top1_agreement`` (logits) or ``nn_agreement`` (embeddings and
    features, with >= 2 images), ``passed`` (rel_max <= tolerance)."""
    res = {}
    for k, r in ref.items():
        if k not in got:
            raise ParityError(f"parity: the exported model has no output {k!r}")
        r, g = r.detach().double().cpu(), got[k].detach().double().cpu()
        if r.shape != g.shape:
            raise ParityError(f"parity: output {k!r} has shape {tuple(g.shape)}, PyTorch's "
                              f"is {tuple(r.shape)}")
        d = (r - g).abs()
        scale = max(float(r.abs().max()), 1e-12)
        row = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "scale": scale,
               "rel_max": float(d.max()) / scale}
        if k == "logits":
            row["top1_agreement"] = float((r.argmax(1) == g.argmax(1)).double().mean())
        elif len(r) >= 2:
            row["nn_agreement"] = float((_nearest(r) == _nearest(g)).double().mean())
        row["passed"] = bool(row["rel_max"] <= tolerance and torch.isfinite(g).all())
        res[k] = row
    return res


def _run_split(fn, x: torch.Tensor) -> dict:
    """``fn`` on a batch of one, then on the rest (both batch sizes of the dynamic axis)."""
    parts = [fn(x[:1])] + ([fn(x[1:])] if len(x) > 1 else [])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def check_parity(folder: str, model: nn.Module, x: torch.Tensor, fmt: str,
                 tolerance: float | None = None, dtype: str = "float32",
                 search: tuple[list[torch.Tensor], str] | None = None) -> dict:
    """Run ``folder``'s exported model (loaded from disk) and ``model`` (the float32 PyTorch
    model) on ``x``; returns the parity report (see :func:`compare_outputs`), judged at
    ``tolerance`` (default: ``TOLERANCES[dtype]``, ``dtype`` the exported one). ``search``:
    :func:`search_inputs` of a dynamic-size export, whose ``embedding`` is compared one image
    at a time (sizes differ) under ``"search"``, with the sizes seen."""
    tol = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    with torch.no_grad():
        if fmt == "timm":
            timm_model = load_timm_backbone(folder)
            ref = {"features": model.backbone.forward_features(x)}
            got = _run_split(lambda b: {"features": timm_model.forward_features(b)}, x)
        else:
            from .runtime import load_exported
            exported, _ = load_exported(folder, "onnx" if fmt == "onnx" else "torch",
                                        complete=False)  # parity.json is written after this
            ref = model(x)
            got = _run_split(exported, x)
    outputs = compare_outputs(ref, got, tol)
    report = {"format": fmt, "dtype": dtype, "tolerance": tol,
              "tolerances": dict(TOLERANCES),
              "rule": "max |exported - pytorch| / max |pytorch| <= tolerance, per output",
              "images": len(x), "batches": [1, len(x) - 1] if len(x) > 1 else [1],
              "outputs": outputs, "passed": all(r["passed"] for r in outputs.values())}
    if search is not None:
        xs, what = search
        with torch.no_grad():
            ref = {"embedding": torch.cat([model(s[None])["embedding"] for s in xs])}
            got = {"embedding": torch.cat([exported(s[None])["embedding"] for s in xs])}
        sizes = [list(hw) for hw in sorted({tuple(s.shape[-2:]) for s in xs})]
        report["search"] = {"images": what, "sizes": sizes,
                            **compare_outputs(ref, got, tol)["embedding"]}
        report["passed"] = report["passed"] and report["search"]["passed"]
    return report


def search_inputs(meta: ModelMeta, images: list[str] | None, x: torch.Tensor,
                  num_images: int = 16) -> tuple[list[torch.Tensor], str]:
    """The parity inputs at the sizes search gives photos: the user's ``images`` through the
    search transform (whole, longest side ``img_size``: their own sizes), or else each parity
    image of ``x`` cropped to 3:4 and to 4:3 at longest side ``img_size``."""
    if images:
        from .data.datasets.base import read_image
        from .retrieval.extract import search_transform
        tf = search_transform({"resize": "longest_side", "img_size": max(input_size(meta)),
                               "upscale": False, "mean": list(meta.mean),
                               "std": list(meta.std)})
        paths = _image_paths(images)[:num_images]
        return [tf(read_image(p)) for p in paths], f"{len(paths)} images, whole (search)"
    H, W = x.shape[-2:]
    out = []
    for h, w in ((H, max(16, W * 3 // 4)), (max(16, H * 3 // 4), W)):
        out += list(x[:, :, (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w])
    return out, f"{len(x)} parity images cropped to 3:4 and 4:3"


# ---- the command ------------------------------------------------------------------------
def check_dtype(fmt: str, dtype: str) -> None:
    """Refuse a (format, dtype) pair that cannot be written and checked here."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "float32" and fmt == "timm":
        raise InputError(f"--format timm --dtype {dtype}: the timm backbone is written as the "
                         f"checkpoint's float32 weights (cast it after timm loads it); "
                         f"--dtype {dtype} works with --format exported or onnx")
    if dtype == "bfloat16" and fmt == "onnx":
        raise InputError("--format onnx --dtype bfloat16: ONNX Runtime has no bfloat16 Conv "
                         "kernel (every model's stem / patch embedding is one), so the export "
                         "could not be run or checked; use --format exported --dtype bfloat16, "
                         "or --format onnx --dtype float16")


def export(checkpoint: str, out: str, fmt: str = "onnx", images: list[str] | None = None,
           num_images: int = 16, model_overrides: dict | None = None,
           tolerance: float | None = None, dtype: str = "float32") -> dict:
    """Export ``checkpoint`` to the folder ``out`` as ``fmt`` and check parity on images.

    Args:
        checkpoint: a finegrain ``.ckpt`` (or ``weights.safetensors`` with its ``model.json``).
        out: the export folder (created; an earlier export's files are replaced).
        fmt: ``"onnx"``, ``"exported"`` (``torch.export``) or ``"timm"`` (the backbone).
        images: parity images (files or folders); None: a generated dataset's test split.
        num_images: at most this many parity images.
        model_overrides: inference-time model arguments (DCAL ``{"sa_only": True}``).
        tolerance: the largest relative error allowed (default ``TOLERANCES[dtype]``).
        dtype: ``"float32"`` (the checkpoint's weights), ``"float16"`` or ``"bfloat16"``: the
            exported weights and compute (``onnx`` / ``exported``; inputs and outputs stay
            float32). Parity is against the float32 PyTorch model.

    Returns:
        the parity report, also written to ``out/parity.json``.

    Raises:
        ParityError: an output differs by more than the tolerance (after writing
            ``parity.json``, which holds the numbers).
    """
    from .loading import open_model
    from .models.registry import with_model_args
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_dtype(fmt, dtype)
    loaded = open_model(checkpoint, **(model_overrides or {}))
    if loaded.exported:
        raise InputError(f"{checkpoint} is an export folder; export the checkpoint it came "
                         f"from ({loaded.meta.model_name}, export.json 'checkpoint')")
    model, ck_hash = loaded.model, loaded.checkpoint_hash
    meta = with_model_args(loaded.meta, **(model_overrides or {})).replace(
        checkpoint_hash=ck_hash)
    model, meta = inference_model(model, meta)
    H, W = input_size(meta)
    os.makedirs(out, exist_ok=True)
    # parity.json, written last, marks a complete folder: an export killed from here on
    # leaves a folder that load_exported refuses as interrupted, never a mix of two exports
    if os.path.isfile(os.path.join(out, "parity.json")):
        os.remove(os.path.join(out, "parity.json"))
    for other in set(MODEL_FILES.values()) - {MODEL_FILES[fmt]}:  # an earlier export's
        if os.path.isfile(os.path.join(out, other)):
            os.remove(os.path.join(out, other))
    example = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        keys = sorted(model(example))
    inner = model if dtype == "float32" else _HalfBoundary(model, DTYPES[dtype])
    module = _OutputTuple(inner, keys).eval()
    # how finegrain embeds this model's photos: whole at any aspect ratio (a model that takes
    # any size; its ONNX export then does too) or squeezed to H x W (the model takes no other)
    search = None
    if "embedding" in keys and fmt != "timm":
        from .retrieval.extract import fixed_input_size
        search = "fixed" if fixed_input_size(model) is not None else \
            "any_size" if fmt == "onnx" else "unreproducible"
    any_size = search == "any_size"
    if fmt == "onnx" and any_size:
        # traced at a non-square size (token grid 3:2): a square example lets the exporter
        # take height == width for a rule of the graph (DALG failed at any other grid)
        tall = torch.randn(2, 3, H + H // 2, W, generator=torch.Generator().manual_seed(0))
        write_onnx(module, tall, keys, os.path.join(out, MODEL_FILES["onnx"]), True)
    elif fmt == "onnx":
        write_onnx(module, example, keys, os.path.join(out, MODEL_FILES["onnx"]))
    elif fmt == "exported":
        write_exported(module, example, os.path.join(out, MODEL_FILES["exported"]))
    else:
        write_timm(model, meta, out)
        keys = ["features"]
    save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                     os.path.join(out, "weights.safetensors"))
    _write_json(os.path.join(out, "model.json"), meta.to_dict())
    _write_json(os.path.join(out, "preprocess.json"),
                {**preprocessing(meta, search), "model_dtype": dtype})
    _write_json(os.path.join(out, "export.json"), {
        "format": fmt, "file": MODEL_FILES[fmt], "input": INPUT_NAME, "outputs": keys,
        "input_size": [H, W], "dynamic": {"batch": True, "height": any_size,
                                          "width": any_size},
        "dtype": dtype, "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_hash": ck_hash, "model_name": meta.model_name, "torch": torch.__version__,
        "model_overrides": dict(model_overrides or {})})
    x, source = parity_images(meta, images, num_images)
    # a dynamic-size export also at the sizes search gives photos (theirs, or 3:4 / 4:3 crops)
    search_at = search_inputs(meta, images, x, num_images) if any_size else None
    report = {**check_parity(out, model, x, fmt, tolerance, dtype, search_at),
              "image_source": source, "model_name": meta.model_name}
    _write_json(os.path.join(out, "parity.json"), report)
    if not report["passed"]:
        bad = [f"{k} ({r['rel_max']:.2e})" for k, r in report["outputs"].items()
               if not r["passed"]]
        if not report.get("search", {}).get("passed", True):
            bad.append(f"embedding at the sizes search gives photos "
                       f"({report['search']['rel_max']:.2e})")
        if dtype != "float32":
            note = getattr(model, "half_precision_hint", None)
            hint = f" ({note})" if note and not meta.model_kwargs.get("sa_only", False) else ""
            raise ParityError(f"{os.path.join(out, 'parity.json')}: the {fmt} {dtype} export "
                              f"of {checkpoint} differs from the float32 PyTorch model above "
                              f"the {dtype} tolerance {report['tolerance']:.0e} in "
                              f"{', '.join(bad)}{hint}; try a wider dtype, or --tolerance if "
                              f"the numbers (top-1 / nearest-neighbour agreement) are "
                              f"acceptable")
        raise ParityError(f"{os.path.join(out, 'parity.json')}: the {fmt} export of "
                          f"{checkpoint} differs from PyTorch above the tolerance "
                          f"{report['tolerance']:.0e} in {', '.join(bad)}; try --format "
                          f"{'exported' if fmt == 'onnx' else 'onnx'}, or report it with that "
                          f"file (--tolerance raises the limit if the numbers are acceptable)")
    return report


def format_parity(report: dict) -> str:
    """The parity report as a console table."""
    lines = [f"{report['model_name']} -> {report['format']} {report.get('dtype', 'float32')}: "
             f"parity on {report['image_source']}"
             f" (batches {report['batches']}, tolerance {report['tolerance']:.0e} of the "
             f"output scale)",
             f"{'output':>10s}  {'max |d|':>9s}  {'mean |d|':>9s}  {'rel max':>9s}  "
             f"{'agree':>6s}  ok"]
    for k, r in report["outputs"].items():
        agree = r.get("top1_agreement", r.get("nn_agreement"))
        lines.append(f"{k:>10s}  {r['max_abs']:9.2e}  {r['mean_abs']:9.2e}  "
                     f"{r['rel_max']:9.2e}  {'-' if agree is None else f'{agree:6.1%}':>6s}  "
                     f"{'yes' if r['passed'] else 'NO'}")
    if "search" in report:  # a dynamic-size export at the sizes search gives photos
        r = report["search"]
        sizes = ", ".join(f"{h}x{w}" for h, w in r["sizes"][:4]) + \
            (f" (+{len(r['sizes']) - 4})" if len(r["sizes"]) > 4 else "")
        agree = r.get("nn_agreement")
        lines.append(f"{'search':>10s}  {r['max_abs']:9.2e}  {r['mean_abs']:9.2e}  "
                     f"{r['rel_max']:9.2e}  {'-' if agree is None else f'{agree:6.1%}':>6s}  "
                     f"{'yes' if r['passed'] else 'NO'}   embedding on {r['images']}: {sizes}")
    return "\n".join(lines)
