"""Loading weights without unpickling anything: local files in the published formats.

Formats: ``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` read with
``torch.load(weights_only=True)`` (a file that needs arbitrary unpickling is refused);
timm / big_vision ``.npz`` (ViT) through timm's own reader; a Hub tag (``hf-hub:org/name`` or
``timm/name``) downloads ``model.safetensors`` on a machine with internet.

A third-party file in a known format of other key names (efficientnet_pytorch:
:mod:`finegrain.models.foreign`) is renamed onto timm's names first. A backbone file (timm,
DeiT, torchvision) goes through the backbone's timm
``checkpoint_filter_fn`` (prefix stripping, position-embedding resampling to the model's input
size, patch-embed reshaping), then into ``model.backbone``; a finegrain file (``.ckpt``,
``weights.safetensors``) loads into the whole model. Every missing and unexpected key is
reported by name, and shape-mismatched classifier heads are skipped and reported.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError, MissingFileError
from ..meta import ModelMeta, read_meta
from .foreign import convert_foreign

__all__ = ["LoadReport", "missing_file_error", "read_model_json", "read_weights",
           "load_state_dict_file", "load_checkpoint_meta", "is_hub_tag", "load_into",
           "MIN_BACKBONE_SHARE", "backbone_share", "load_pretrained", "InputConfig",
           "pretrained_input_config"]

log = logging.getLogger("finegrain")

_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys by name, not counts."""

    path: str
    target: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)

    SHOWN = 8
    """Keys named per list in the printed report (the lists themselves are complete)."""

    def __str__(self) -> str:
        parts = [f"loaded {self.path} into {self.target}"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("skipped (shape mismatch)", self.skipped_shape)):
            if keys:
                more = f", ... ({len(keys) - self.SHOWN} more)" if len(keys) > self.SHOWN else ""
                parts.append(f"{name} ({len(keys)}): {', '.join(keys[:self.SHOWN])}{more}")
        return "; ".join(parts)


def _torch_load(path: str) -> dict:
    if not os.path.isfile(path):
        raise missing_file_error(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # it holds Python objects beyond tensors and numbers
        raise InputError(f"{path} cannot be loaded safely: besides tensors it holds pickled "
                         f"Python objects, which finegrain never unpickles (unpickling can run "
                         f"code). If you made the file or trust its source, save its state "
                         f"dict as .safetensors (safetensors.torch.save_file) with the code "
                         f"that wrote it, and pass that file") from None
    except Exception as e:  # PytorchStreamReader: truncated / not a torch file
        reason = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
        raise InputError(f"{path} is truncated or not a PyTorch weights file ({reason}); it was "
                         f"not completely written or copied: copy it again from its source"
                         ) from None


def _flat(obj: dict) -> dict[str, torch.Tensor]:
    """Unwrap nested containers (``state_dict``, ``model``, ``module``, ``model_state``) and
    strip the ``module.`` / ``model.`` prefixes of DDP / Lightning."""
    for key in ("state_dict", "model", "module", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def missing_file_error(path: str) -> MissingFileError:
    """A missing weights file; a run's ``best.ckpt`` points to the ``last.ckpt`` beside it."""
    hint = ""
    last = os.path.join(os.path.dirname(path), "last.ckpt")
    if os.path.basename(path) == "best.ckpt" and os.path.isfile(last):
        hint = (f"; this run has no best.ckpt (no evaluation has chosen one yet) but has {last}: "
                f"pass that")
    return MissingFileError(f"weights file not found: {path}{hint}")


def read_model_json(path: str) -> ModelMeta:
    """The record in a ``model.json`` (a run's or an export's), read by :func:`read_meta`."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); write it again (it is written "
                         f"with weights.safetensors at the end of a run or by an export)"
                         ) from None
    return read_meta(record, path)


def _read(path: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(flat state dict, where its record is or None)`` of a local weights file: the path of
    the ``model.json`` beside a ``.safetensors``, or a ``.ckpt``'s ``finegrain_meta`` mapping
    as stored (unread, so weights-only callers never fail on a record)."""
    path = str(path)
    if not os.path.isfile(path):
        raise missing_file_error(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        meta_path = os.path.join(os.path.dirname(path), "model.json")
        return _flat(load_file(path)), meta_path if os.path.isfile(meta_path) else None
    raw = _torch_load(path)
    return _flat(raw), raw.get("finegrain_meta") if isinstance(raw, dict) else None


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], ModelMeta | None]:
    """Read a local weights file once: ``(flat state dict, its ModelMeta or None)``.

    ``.safetensors`` (the record in ``model.json`` beside it, when there is one), ``.pth`` /
    ``.bin`` / ``.ckpt`` through ``torch.load(weights_only=True)`` (the record in a finegrain
    ``.ckpt``'s ``finegrain_meta``; foreign files, Lightning ones included, have none). The
    record is read and validated by :func:`finegrain.meta.read_meta`.
    """
    sd, stored = _read(path)
    if stored is None:
        return sd, None
    if isinstance(stored, str):  # model.json beside the .safetensors
        return sd, read_model_json(stored)
    return sd, read_meta(stored, str(path))


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from ``.safetensors`` / ``.pth`` / ``.bin`` / ``.ckpt`` (its
    record, if any, is not read)."""
    return _read(path)[0]


def load_checkpoint_meta(path: str) -> ModelMeta:
    """The self-description stored in a finegrain checkpoint (model name, kwargs, classes,
    input size, normalisation); reads ``model.json`` beside ``weights.safetensors``."""
    if str(path).endswith(".safetensors"):
        meta_path = os.path.join(os.path.dirname(path), "model.json")
        if not os.path.isfile(meta_path):
            raise MissingFileError(f"{meta_path} not found: a finegrain weights.safetensors "
                                   f"needs its model.json beside it")
    meta = read_weights(path)[1]
    if meta is None:
        raise InputError(f"{path} is not a finegrain checkpoint (no finegrain_meta); "
                         f"pass it as pretrained= to load weights only")
    return meta


def is_hub_tag(path: str) -> bool:
    """A Hub tag (``hf-hub:org/name`` / ``timm/name``) rather than a local file."""
    path = str(path)
    return not os.path.exists(path) and (path.startswith("hf-hub:") or path.startswith("timm/"))


def _hub_file(tag: str, timeout: float = 3.0) -> str:
    """The local path of a Hub tag's ``model.safetensors``: from the Hub cache, else
    downloaded; without a connection to the Hub it fails within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download
    repo = tag.split(":", 1)[1] if tag.startswith("hf-hub:") else tag
    try:
        return hf_hub_download(repo, "model.safetensors", local_files_only=True)
    except Exception:  # not in the cache
        pass
    fix = (f"download model.safetensors of {repo} on a machine with internet and pass the "
           f"local file instead of the tag (to train from random weights on purpose: "
           f"--model.pretrained null)")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"{tag}: the Hub ({url.hostname}) cannot be reached ({e}); {fix}"
                         ) from None
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:  # unknown repository, no model.safetensors, network errors
        reason = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
        raise InputError(f"{tag}: cannot download model.safetensors ({reason}); check the "
                         f"tag, or {fix}") from None


def _backbone_filter(backbone: nn.Module, sd: dict) -> dict:
    """Apply the timm family's ``checkpoint_filter_fn`` (pos-embed resampling, DeiT / JAX key
    names) when the family has one."""
    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    return fn(sd, backbone) if fn is not None else sd


def _resample_backbone_keys(backbone: nn.Module, sd: dict) -> dict:
    """A whole-model (finegrain) file trained at another input size: run its ``backbone.*``
    keys whose shapes differ (position embeddings) through the family's filter, which
    resamples them (a 64x64 pretraining run loads into a 64x32 Re-ID model)."""
    own = backbone.state_dict()
    sub = {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}
    if all(k not in own or own[k].shape == v.shape for k, v in sub.items()):
        return sd
    fixed = _backbone_filter(backbone, dict(sub))
    out = dict(sd)
    for k, v in sub.items():
        if k in own and own[k].shape != v.shape and k in fixed:
            out["backbone." + k] = fixed[k]
    return out


def _split_classifier(backbone: nn.Module, sd: dict) -> dict:
    """Pop the backbone file's classifier (``head.*`` / ``fc.*``, timm's
    ``pretrained_cfg["classifier"]``) out of ``sd``: the backbone is built without one."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = [name] if isinstance(name, str) else list(name)
    return {k: sd.pop(k) for k in list(sd) if any(k.startswith(n + ".") for n in names)}


def _load_head(model: nn.Module, head_sd: dict, report: LoadReport) -> None:
    """Load a backbone file's classifier into ``model.head`` when the shapes match (same label
    space); otherwise name each key under ``skipped_shape``."""
    target = getattr(model, "head", None)
    own = target.state_dict() if isinstance(target, nn.Module) else {}
    mapped = {k.split(".", 1)[1]: v for k, v in head_sd.items()}
    if own and all(k in own and own[k].shape == v.shape for k, v in mapped.items()) and \
            set(mapped) == set(own):
        target.load_state_dict(mapped)
        return
    for k, v in head_sd.items():
        o = own.get(k.split(".", 1)[1])
        report.skipped_shape.append(f"{k} {tuple(v.shape)}->"
                                    f"{tuple(o.shape) if o is not None else 'none'}")


def load_into(module: nn.Module, sd: dict, path: str, target: str) -> LoadReport:
    """Load ``sd`` non-strictly, skipping shape mismatches; report keys by name."""
    own = module.state_dict()
    report = LoadReport(path=path, target=target)
    keep = {}
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            report.skipped_shape.append(f"{k} {tuple(v.shape)}->{tuple(own[k].shape)}")
        else:
            keep[k] = v
    res = module.load_state_dict(keep, strict=False)
    report.missing = list(res.missing_keys)
    report.unexpected = list(res.unexpected_keys)
    return report


MIN_BACKBONE_SHARE = 0.5  # strict loads stop below this share of backbone tensors loaded


def backbone_share(model: nn.Module, report: LoadReport) -> float:
    """Share of the model's backbone tensors (the whole model's when it has no ``backbone``)
    that a load filled: neither missing nor skipped for their shape."""
    backbone = getattr(model, "backbone", None)
    names = list((model if backbone is None else backbone).state_dict())
    prefix = "" if backbone is None or report.target == "backbone" else "backbone."
    not_loaded = set(report.missing) | {k.split(" ", 1)[0] for k in report.skipped_shape}
    return 1 - sum(prefix + n in not_loaded for n in names) / max(1, len(names))


def load_pretrained(model: nn.Module, pretrained: str,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    strict: bool = True) -> LoadReport:
    """Load weights into ``model`` (see the module docstring); returns and logs the report.

    After loading, ``model.on_pretrained_loaded()`` runs when the model defines it (DCAL copies
    its last SA block into the GLCA block there). ``state_dict``: the file's contents when the
    caller has already read them (:func:`read_weights`), so a checkpoint is read once.
    ``strict``: raise :class:`~finegrain.errors.InputError` when fewer than half of the
    model's backbone tensors load (the file is another architecture's).
    """
    path = str(pretrained)
    if is_hub_tag(path):
        path = _hub_file(path)
    backbone = getattr(model, "backbone", None)
    if path.endswith(".npz"):
        if backbone is None:
            raise InputError(f"{path}: .npz weights are for timm ViT backbones")
        from timm.models.vision_transformer import _load_weights
        _load_weights(backbone, path)
        report = LoadReport(path=path, target="backbone (npz)")
    else:
        sd = state_dict if state_dict is not None else load_state_dict_file(path)
        own = model.state_dict()
        whole = sum(k in own for k in sd) >= 0.5 * len(sd)
        if whole or backbone is None:
            if backbone is not None:  # another input size: resample position embeddings
                sd = _resample_backbone_keys(backbone, sd)
            report = load_into(model, sd, path, type(model).__name__)
        else:
            sd = _backbone_filter(backbone, convert_foreign(backbone, sd, path))
            head = _split_classifier(backbone, sd)
            report = load_into(backbone, sd, path, "backbone")
            _load_head(model, head, report)
        share = backbone_share(model, report)
        if strict and share < MIN_BACKBONE_SHARE:
            log.warning(str(report))
            raise InputError(
                f"{path}: only {share:.0%} of the backbone tensors of "
                f"{type(model).__name__} load from it ({len(report.missing)} missing, "
                f"{len(report.unexpected)} unexpected, {len(report.skipped_shape)} of another "
                f"shape; first missing: {', '.join(report.missing[:3]) or '-'}; first "
                f"unexpected: {', '.join(report.unexpected[:3]) or '-'}): the file holds "
                f"another architecture's weights. Pass weights of this model's backbone, or "
                f"--model.pretrained_strict false to go on anyway")
    hook = getattr(model, "on_pretrained_loaded", None)
    if callable(hook):
        hook()
    log.warning(str(report)) if (report.missing or report.unexpected or report.skipped_shape) \
        else log.info(str(report))
    return report


@dataclass(frozen=True)
class InputConfig:
    """How the images of some weights were prepared: normalisation, resize interpolation and
    eval crop share. ``known``: read from the weights' own record (a Hub tag's timm
    pretrained cfg, a finegrain file's model record); False when assumed from the
    architecture's default weights (a foreign local file says nothing of its inputs)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float | None
    source: str
    known: bool


def _timm_input_config(name: str, source: str, known: bool) -> InputConfig | None:
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown architecture or tag: nothing to follow
        return None
    if cfg is None:
        return None
    interp = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
    return InputConfig(tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std),
                       interp, float(cfg.crop_pct) if cfg.crop_pct else None, source, known)


def pretrained_input_config(pretrained: str | None, backbone: str | None = None
                            ) -> InputConfig | None:
    """The input preparation that the weights ``pretrained`` expect (:class:`InputConfig`),
    or None without weights (the data module's defaults, ImageNet's, apply).

    - a Hub tag ``timm/<arch>.<tag>``: timm's pretrained cfg of that tag (no download);
    - a finegrain checkpoint / ``weights.safetensors`` + ``model.json``: its model record;
    - another local file (timm / DeiT / torchvision weights): the default pretrained cfg of
      ``backbone`` in timm, marked as assumed.
    """
    if not pretrained:
        return None
    path = str(pretrained)
    if is_hub_tag(path):
        name = path.split(":", 1)[1] if path.startswith("hf-hub:") else path
        name = name.split("/", 1)[1] if "/" in name else name
        return _timm_input_config(name, f"timm's pretrained cfg of {name}", True)
    meta = None
    record = path.endswith(".ckpt") or (path.endswith(".safetensors") and os.path.isfile(
        os.path.join(os.path.dirname(path), "model.json")))
    if os.path.isfile(path) and record:
        try:
            meta = load_checkpoint_meta(path)
        except InputError:  # foreign weights: no record
            meta = None
    if meta is not None:
        return InputConfig(meta.mean, meta.std, meta.interpolation, meta.crop_pct,
                           f"the model record of {path}", True)
    if backbone:
        return _timm_input_config(backbone, f"timm's default pretrained cfg of {backbone} "
                                            f"(assumed for the local file {path})", False)
    return None
