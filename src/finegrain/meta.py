"""The one record a trained model carries about itself: :class:`ModelMeta`.

A finegrain checkpoint (``.ckpt``: ``finegrain_meta``), the ``model.json`` beside a run's or an
export's ``weights.safetensors`` and an export folder all hold this record as plain JSON-able
data (``ModelMeta.to_dict``); everything that reads one goes through :func:`read_meta`, which
validates it and names the file and the fix when it cannot be used.

Schema versions (the ``schema`` key):

- 1: the untyped dicts written before 2026-11-30 (no ``schema`` key). They also held
  ``num_query``, which is dropped on reading: the evaluation now flags each query sample
  (``engine.datamodule.QueryGallery``) instead of assuming the queries come first.
- 2: the fields of :class:`ModelMeta` but ``interpolation``, ``crop_pct`` and
  ``selected_on`` (read as bilinear, no crop share, not recorded: what those records were
  made with; their checkpoints were chosen on the test split by default).
- 3 (current): the fields of :class:`ModelMeta`, ``schema`` included. An unknown key is an
  error (a misspelt hand edit is not silently ignored); a newer schema asks for a newer
  finegrain.

Descriptor files (``NAME.json``) keep their own versioned format (``retrieval.descriptors``:
``format`` / ``version``, a contract of DESIGN.md); the model fields they record
(``model_name``, ``checkpoint_hash``) are this record's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError

__all__ = ["SCHEMA_VERSION", "TASKS", "INTERPOLATIONS", "ModelMeta", "plain", "read_meta"]

SCHEMA_VERSION = 3
TASKS = ("classification", "reid", "dml", "retrieval")
INTERPOLATIONS = ("bilinear", "bicubic")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DROPPED_V1 = ("num_query",)  # keys of schema 1 that no longer mean anything


@dataclass(frozen=True)
class ModelMeta:
    """What a trained model says about itself: how to rebuild it, what it was trained on and
    how its inputs are prepared.

    Args:
        model_name: registered name (``create_model``), or the class path when no registered
            name builds the model.
        model_kwargs: the registered name's arguments that build the same model.
        model_config: YAML text ``class_path`` / ``init_args`` (None in checkpoints older than
            the typed configs: they rebuild from ``model_name`` / ``model_kwargs``).
        task: ``classification``, ``reid``, ``dml`` or ``retrieval``.
        dataset: registry name of the training dataset.
        dataset_kwargs: its reader arguments.
        class_names: class / identity names, index = label.
        img_size: model input, int or [H, W].
        resize_size: resize before the centre crop (None: straight to ``img_size``).
        resize_mode: ``square`` or ``shorter``.
        mean: normalisation mean (RGB).
        std: normalisation std (RGB).
        interpolation: resize interpolation, ``bilinear`` or ``bicubic`` (the weights').
        crop_pct: eval crop share when ``resize_size`` is None (None: 224/256).
        selected_on: what chose the run's ``best.ckpt`` (``held-out 10% of the training
            images (seed 0)``, ``the test split ...``), None when not recorded.
        checkpoint_hash: the hash of the checkpoint an export was made from (export folders'
            ``model.json``; descriptors of the checkpoint and of the export then match).
        schema: version of this record (:data:`SCHEMA_VERSION`).
    """

    model_name: str = ""
    model_kwargs: dict = field(default_factory=dict)
    model_config: str | None = None
    task: str = "classification"
    dataset: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    class_names: tuple = ()
    img_size: int | tuple = 224
    resize_size: int | tuple | None = None
    resize_mode: str = "square"
    mean: tuple = _IMAGENET_MEAN
    std: tuple = _IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    selected_on: str | None = None
    checkpoint_hash: str | None = None
    schema: int = SCHEMA_VERSION

    def replace(self, **changes: Any) -> "ModelMeta":
        """A copy with ``changes``, validated like a read record."""
        return read_meta({**self.to_dict(), **changes}, "ModelMeta.replace", require_model=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / YAML / ``torch.load(weights_only=True)``-safe data (lists, no tuples)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(v: Any) -> Any:
    """JSON / YAML-safe values: tuples (nested too) as lists."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def _size(v: Any, key: str, source: str, optional: bool = False) -> int | tuple | None:
    if v is None and optional:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        return tuple(v)
    raise InputError(f"{source}: {key} {v!r} is not a positive int or [H, W]; the checkpoint's "
                     f"record is damaged: write it again (train, or export the checkpoint)")


def _triple(v: Any, key: str, source: str) -> tuple:
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return tuple(float(x) for x in v)
    raise InputError(f"{source}: {key} {v!r} is not three numbers (RGB)")


def read_meta(record: ModelMeta | Mapping[str, Any], source: str = "checkpoint",
              require_model: bool = True) -> ModelMeta:
    """The one reader of a model's record: a :class:`ModelMeta` from a checkpoint's
    ``finegrain_meta``, a ``model.json`` or a ``ModelMeta``; schema 1 is upgraded.

    Args:
        record: the stored mapping (or a record, returned as is after validation).
        source: the file it came from, named in errors.
        require_model: the record must name its model (``model_name`` or ``model_config``);
            False while a training run is still assembling it.

    Raises:
        InputError: not a mapping, a newer schema, an unknown key, or a field of the wrong
            type; the message names ``source``.
    """
    if isinstance(record, ModelMeta):
        record = record.to_dict()
    if not isinstance(record, Mapping):
        raise InputError(f"{source}: the model record is a {type(record).__name__}, not a "
                         f"mapping; it was not written by finegrain")
    d = dict(record)
    version = d.pop("schema", 1)
    if not isinstance(version, int) or version < 1:
        raise InputError(f"{source}: schema {version!r} is not a version number")
    if version > SCHEMA_VERSION:
        raise InputError(f"{source}: written by a newer finegrain (model record schema "
                         f"{version}, this one reads up to {SCHEMA_VERSION}); upgrade finegrain")
    if version == 1:
        for k in _DROPPED_V1:
            d.pop(k, None)
    known = {f.name for f in dataclasses.fields(ModelMeta)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)} in the model record "
                         f"(schema {version}; known: {', '.join(sorted(known - {'schema'}))})")
    if require_model and not d.get("model_name") and not d.get("model_config"):
        raise InputError(f"{source}: the model record names no model (neither model_name nor "
                         f"model_config)")
    task = d.get("task", "classification")
    if task not in TASKS:
        raise InputError(f"{source}: task {task!r} is not one of {', '.join(TASKS)}")
    names = d.get("class_names") or ()
    if not isinstance(names, (list, tuple)):
        raise InputError(f"{source}: class_names is a {type(names).__name__}, not a list")
    for key in ("model_kwargs", "dataset_kwargs"):
        if not isinstance(d.get(key) or {}, dict):
            raise InputError(f"{source}: {key} is not a mapping")
    default = ModelMeta()
    interpolation = d.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"{source}: interpolation {interpolation!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}")
    crop_pct = d.get("crop_pct")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise InputError(f"{source}: crop_pct {crop_pct!r} is not a share in (0, 1]")
    return ModelMeta(
        model_name=str(d.get("model_name") or ""),
        model_kwargs=dict(d.get("model_kwargs") or {}),
        model_config=d.get("model_config"),
        task=task,
        dataset=d.get("dataset"),
        dataset_kwargs=dict(d.get("dataset_kwargs") or {}),
        class_names=tuple(str(n) for n in names),
        img_size=_size(d.get("img_size", default.img_size), "img_size", source),
        resize_size=_size(d.get("resize_size"), "resize_size", source, optional=True),
        resize_mode=str(d.get("resize_mode") or "square"),
        mean=_triple(d.get("mean", default.mean), "mean", source),
        std=_triple(d.get("std", default.std), "std", source),
        interpolation=interpolation,
        crop_pct=None if crop_pct is None else float(crop_pct),
        selected_on=None if d.get("selected_on") is None else str(d["selected_on"]),
        checkpoint_hash=d.get("checkpoint_hash"),
    )
