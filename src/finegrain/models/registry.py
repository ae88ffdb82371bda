"""One registry for every model and method (timm style).

A variant is a tiny function decorated with :func:`register_model` that forwards its keyword
arguments to one private ``_create_*`` builder. :func:`create_model` looks the name up, builds
the model and, if ``pretrained`` is given, loads weights through
:func:`finegrain.models.weights.load_pretrained` (which reports every missing / unexpected key).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import torch.nn as nn

from ..errors import FinegrainError, InputError, UnknownNameError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; the function builds the model from kwargs."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell pattern (``"dcal*"``)."""
    _import_all()
    names = sorted(_MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    _import_all()
    return name in _MODELS


def model_arguments(name: str) -> list[str]:
    """The arguments of the model class that ``name`` builds (its ``__init__`` parameters,
    read from the registered function's return annotation); empty when it does not say."""
    import inspect
    import typing
    _check_name(name)
    try:
        cls = typing.get_type_hints(_MODELS[name]).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve
        return []
    if not isinstance(cls, type):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def create_model(name: str, pretrained: str | None = None, inherit_kwargs: bool = True,
                 pretrained_strict: bool = True, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (see :func:`list_models`).
        pretrained: weights to load: a local file (``.safetensors``, ``.pth``, ``.bin``, timm
            ``.npz``, a finegrain ``.ckpt``) or a Hub tag (``hf-hub:...``/``timm/...``, needs
            internet). Missing / unexpected keys are reported by name.
        inherit_kwargs: a finegrain file of the *same* model name describes itself: its stored
            arguments are the defaults under ``kwargs``. False: ``kwargs`` alone (a training
            recipe that starts from such a file with ``--init-weights``: the recipe decides,
            so a DCAL fine-tuned from its baseline twin's weights keeps ``glca=True``).
        pretrained_strict: raise when fewer than half of the backbone tensors load from
            ``pretrained`` (another architecture's file); False only reports the keys.
        **kwargs: model arguments (``num_classes``, ``img_size``, ...).

    Raises:
        UnknownNameError: unknown ``name`` (a ``KeyError``); the message lists the closest
            registered names.
        InputError: ``pretrained`` does not fit (``pretrained_strict``) or arguments the
            model does not take.
    """
    _check_name(name)
    from .weights import is_hub_tag, read_weights
    sd = meta = None
    if pretrained is not None and not str(pretrained).endswith(".npz") and \
            not is_hub_tag(pretrained):
        sd, meta = read_weights(pretrained)  # read once: meta and weights
    if not inherit_kwargs or (meta is not None and meta.get("model_name") != name):
        meta = None  # another model's arguments never become this one's
    return _build(name, pretrained, sd, meta, kwargs, pretrained_strict)


def _check_name(name: str) -> None:
    _import_all()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.4)
        hint = ", ".join(close) if close else ", ".join(sorted(_MODELS)[:10]) + ", ..."
        raise UnknownNameError(f"unknown model {name!r}; closest registered names: {hint} "
                               f"(finegrain.list_models() lists all)")


def _build(name: str, pretrained: str | None, sd: dict | None, meta: dict | None,
           kwargs: dict, strict: bool = True) -> nn.Module:
    """Instantiate ``name`` (a finegrain file's stored arguments are the defaults: it
    describes itself) and load ``pretrained`` (its state dict ``sd`` when already read)."""
    if meta is not None:
        kwargs = {**meta.get("model_kwargs", {}), **kwargs}
    try:
        model = _MODELS[name](**kwargs)
    except FinegrainError:
        raise
    except (TypeError, ValueError) as e:  # an argument the model does not take, a bad value
        if isinstance(e, TypeError) and "argument" not in str(e):
            raise
        raise InputError(f"{name}: {e}; fix that key of the model's arguments "
                         f"(model.model_kwargs; the recipes under recipes/ show valid ones)"
                         ) from e
    model.finegrain_name = name
    model.finegrain_kwargs = dict(kwargs)
    if pretrained is not None:
        from .weights import load_pretrained
        load_pretrained(model, pretrained, state_dict=sd, strict=strict)
    return model


def _import_all() -> None:
    """Import the model files so their ``@register_model`` functions run (no I/O)."""
    for mod in ("classifier", "dcal", "tasn", "dalg", "cross_image"):
        try:
            __import__(f"finegrain.models.{mod}")
        except ModuleNotFoundError as e:  # a method file not written yet
            if e.name != f"finegrain.models.{mod}":
                raise


def load_model(checkpoint: str, **kwargs) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from a finegrain ``.ckpt`` (or ``weights.safetensors`` with its
    ``model.json``) alone; returns ``(model in eval mode, meta)``.

    ``meta`` holds ``model_name``, ``model_kwargs``, ``class_names``, ``img_size``, ``mean``,
    ``std``, ``task`` and ``dataset``: everything ``eval`` / ``predict`` / ``embed`` need.
    """
    from .weights import load_checkpoint_meta, read_weights
    sd, meta = read_weights(checkpoint)
    if meta is None:
        load_checkpoint_meta(checkpoint)  # raises, naming what is missing
    _check_name(meta["model_name"])
    return _build(meta["model_name"], checkpoint, sd, meta, kwargs).eval(), meta
