"""One registry for every model and method (timm style).

A variant is a tiny function decorated with :func:`register_model` that forwards its keyword
arguments to one private ``_create_*`` builder. :func:`create_model` looks the name up, builds
the model and, if ``pretrained`` is given, loads weights through
:func:`finegrain.models.weights.load_pretrained` (which reports every missing / unexpected key).
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import importlib
from typing import Any, Callable

import torch.nn as nn

from ..errors import FinegrainError, InputError, UnknownNameError
from ..meta import ModelMeta, plain

__all__ = ["FinegrainModel", "ALLOWED_PREFIX", "build", "model_config", "model_arg",
           "resolve_class", "registry_name", "config_meta", "with_model_args",
           "register_model", "list_models", "is_model", "model_class", "model_arguments",
           "create_model", "load_model", "model_from_meta"]


class FinegrainModel(nn.Module):
    """Base of the models a recipe names (``model.model.class_path``) and a checkpoint
    rebuilds: :class:`~finegrain.models.classifier.Classifier`,
    :class:`~finegrain.models.dcal.DCAL`, :class:`~finegrain.models.tasn.TASN`,
    :class:`~finegrain.models.dalg.DALG`,
    :class:`~finegrain.models.cross_image.CrossImageDML`. It adds nothing to ``nn.Module``:
    it marks the classes whose typed ``__init__`` arguments are a model's config (and keeps
    ``finegrain train --help`` to them rather than every ``nn.Module``), and says whether
    ``explain`` takes a ``pair`` (:mod:`finegrain.models.explain`)."""

    pairwise_explain: bool = False
    """``explain(images, pair=...)`` draws a pair-wise map (DCAL, cross-image attention)."""

    family: str = "classifier"
    """The method (``dcal``, ``tasn``, ``dalg``, ``cross_image``, ``classifier``): what the
    tiny configurations, the tests and the reports group by. Stated by the class, never read
    from a registered name (a recipe on an unregistered backbone has none)."""

    pretrained_note: str | None = None
    """The weights the method's papers start from, shown when a recipe trains from random
    weights."""

    half_precision_hint: str | None = None
    """One sentence for a half-precision export that fails parity (where the method has a
    discrete step that rounding can move)."""

    def output_keys(self) -> set[str]:
        """The evaluation outputs (the model output contract, DESIGN.md): ``logits`` for a
        classifier, ``embedding`` for anything that retrieves."""
        raise NotImplementedError(f"{type(self).__name__} states no output_keys")

    def loss_names(self) -> set[str]:
        """The keys of ``model(images, targets=y)["losses"]``."""
        raise NotImplementedError(f"{type(self).__name__} states no loss_names")

    def training_only(self) -> tuple[str, ...]:
        """Name prefixes of the trainable parameters the evaluation outputs do not depend on
        (trained, then unused at test time)."""
        return ()

    def drop_training_only(self) -> dict[str, Any]:
        """Remove, in place, what only training uses (nothing by default), and return the
        model arguments that record it, so the weights rebuild exactly this model (export,
        :func:`finegrain.export.inference_model`)."""
        return {}

    @property
    def explainable(self) -> bool:
        """``explain`` has attention to draw (every method; a plain classifier only on a ViT)."""
        return True

    def learned_scalars(self) -> dict[str, float]:
        """Scalars the model learns that a user should see at the end of a run (DCAL's
        uncertainty weights); none by default."""
        return {}


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DRY_RUN = contextvars.ContextVar("finegrain_registry_dry_run", default=False)
ALLOWED_PREFIX = "finegrain.models."
"""Classes a stored model config may name: a checkpoint can never name an arbitrary class."""


def build(cls: type[nn.Module], **init_args) -> nn.Module:
    """``cls(**init_args)``, remembering its config (``model.finegrain_config``: ``class_path``
    and ``init_args``). Every ``_create_*`` builder ends here, so a registered name also
    resolves to the typed config that ``finegrain train`` recipes spell out
    (:func:`model_config`)."""
    config = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
    if _DRY_RUN.get():
        return config  # type: ignore[return-value]  (model_config: no weights built)
    model = cls(**init_args)
    model.finegrain_config = config
    return model


def model_config(name: str, **kwargs) -> dict[str, Any]:
    """The typed config a registered name builds (``{"class_path": ..., "init_args": ...}``)
    without building it: ``model_config("dcal_deit_tiny_patch16_224", glca=False)`` gives
    ``finegrain.models.dcal.DCAL`` with ``backbone: deit_tiny_patch16_224, glca: false``. The
    ``model.model`` of a ``finegrain train`` recipe."""
    _check_name(name)
    token = _DRY_RUN.set(True)
    try:
        config = _MODELS[name](**kwargs)
    finally:
        _DRY_RUN.reset(token)
    if not isinstance(config, dict):
        raise TypeError(f"registered model {name!r} does not build through registry.build")
    return {"class_path": config["class_path"], "init_args": dict(config["init_args"])}


def model_arg(name: str, kwargs: dict | None = None) -> str:
    """``--model.model`` of ``finegrain train`` for a registered name, as JSON:
    ``["--model.model", model_arg("vit_tiny_patch16_224", {"task": "classification"})]``."""
    import json
    return json.dumps(plain(model_config(name, **(kwargs or {}))))


def resolve_class(class_path: str, what: str = "model config") -> type[nn.Module]:
    """The model class ``class_path`` names: a :class:`FinegrainModel` under ``finegrain.models``
    (:class:`~finegrain.errors.InputError` otherwise: a file never picks arbitrary code)."""
    module, _, qualname = str(class_path).rpartition(".")
    if not str(class_path).startswith(ALLOWED_PREFIX) or not module:
        raise InputError(f"{what}: class_path {class_path!r} is not a finegrain model class "
                         f"(only classes under {ALLOWED_PREFIX}* are built from files)")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        raise InputError(f"{what}: class_path {class_path!r} not found") from None
    if not (isinstance(cls, type) and issubclass(cls, FinegrainModel)) or cls is FinegrainModel:
        raise InputError(f"{what}: class_path {class_path!r} is not a finegrain model class "
                         f"(a FinegrainModel subclass)")
    return cls


def registry_name(config: dict) -> tuple[str, dict] | None:
    """``(registered name, its kwargs)`` that builds ``config`` (a registered name is
    ``Class(backbone=<suffix>, ...)``; the shortest such name), or None."""
    init = dict(config.get("init_args") or {})
    backbone = init.pop("backbone", None)
    if backbone is None:
        return None
    for name in sorted((n for n in list_models() if n.endswith(str(backbone))), key=len):
        c = model_config(name)
        if c["class_path"] == config["class_path"] and \
                c["init_args"].get("backbone") == backbone:
            return name, init
    return None


def config_meta(config: dict) -> dict[str, Any]:
    """What a checkpoint stores about its model: ``model_config`` (YAML text of
    ``class_path`` / ``init_args``, weight-file paths left out: a checkpoint rebuilds
    anywhere) and, for older readers (retrieval, ``create_model(pretrained=file)``), the
    registered ``model_name`` and ``model_kwargs`` that build the same model (the class path
    as ``model_name`` when no registered name does)."""
    import yaml
    init = {k: plain(v) for k, v in (config.get("init_args") or {}).items()
            if not k.endswith("pretrained")}
    config = {"class_path": config["class_path"], "init_args": init}
    found = registry_name(config)
    name, kwargs = found if found else (config["class_path"], init)
    return {"model_name": name, "model_kwargs": kwargs,
            "model_config": yaml.safe_dump(config, sort_keys=False)}


def with_model_args(meta: ModelMeta, **kwargs: Any) -> ModelMeta:
    """``meta`` with ``kwargs`` set in both of its model descriptions (``model_config``'s
    ``init_args`` and ``model_kwargs``), so either rebuilds the changed model."""
    import yaml
    changes: dict[str, Any] = {"model_kwargs": {**meta.model_kwargs, **kwargs}}
    if meta.model_config:
        config = yaml.safe_load(meta.model_config)
        config["init_args"] = {**(config.get("init_args") or {}), **plain(kwargs)}
        changes["model_config"] = yaml.safe_dump(config, sort_keys=False)
    return meta.replace(**changes)


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


def model_class(name: str) -> type:
    """The class a registered name builds (read from its config, nothing built)."""
    module, _, cls = model_config(name)["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def model_arguments(name: str) -> list[str]:
    """The arguments of the model class that ``name`` builds (its ``__init__`` parameters,
    :func:`model_class`)."""
    import inspect
    return [p for p in inspect.signature(model_class(name).__init__).parameters if p != "self"]


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
    if not inherit_kwargs or (meta is not None and meta.model_name != name):
        meta = None  # another model's arguments never become this one's
    return _build(name, pretrained, sd, meta, kwargs, pretrained_strict)


def _check_name(name: str) -> None:
    _import_all()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.4)
        hint = ", ".join(close) if close else ", ".join(sorted(_MODELS)[:10]) + ", ..."
        raise UnknownNameError(f"unknown model {name!r}; closest registered names: {hint} "
                               f"(finegrain.list_models() lists all)")


def _build(name: str, pretrained: str | None, sd: dict | None, meta: ModelMeta | None,
           kwargs: dict, strict: bool = True) -> nn.Module:
    """Instantiate ``name`` (a finegrain file's stored arguments are the defaults: it
    describes itself) and load ``pretrained`` (its state dict ``sd`` when already read)."""
    if meta is not None:
        kwargs = {**meta.model_kwargs, **kwargs}
    try:
        model = _MODELS[name](**kwargs)
    except FinegrainError:
        raise
    except (TypeError, ValueError) as e:  # an argument the model does not take, a bad value
        if isinstance(e, TypeError) and "argument" not in str(e):
            raise
        raise InputError(f"{name}: {e}; fix that key of the model's arguments "
                         f"(`finegrain train --model.model.help "
                         f"{model_config(name)['class_path']}` lists them)") from e
    model.finegrain_name = name
    model.finegrain_kwargs = dict(kwargs)
    if pretrained is not None:
        from .weights import load_pretrained
        load_pretrained(model, pretrained, state_dict=sd, strict=strict)
    return model


def _import_all() -> None:
    """Import every file of ``finegrain.models`` so their ``@register_model`` functions run
    (no I/O): a new method file registers its names by being there."""
    import pkgutil

    from .. import models
    for m in pkgutil.iter_modules(models.__path__):
        importlib.import_module(f"{models.__name__}.{m.name}")


def load_model(checkpoint: str, **kwargs) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a trained model from a finegrain ``.ckpt`` (or ``weights.safetensors`` with its
    ``model.json``) alone; returns ``(model in eval mode, meta)``.

    ``meta`` (a :class:`finegrain.meta.ModelMeta`) holds ``model_config`` (YAML:
    ``class_path`` / ``init_args``; checkpoints older than it: ``model_name`` /
    ``model_kwargs`` alone, rebuilt through the registry),
    ``class_names``, ``img_size``, ``mean``, ``std``, ``task`` and ``dataset``: everything
    ``eval`` / ``predict`` / ``embed`` need. ``kwargs`` override stored model arguments
    (inference-time switches such as DCAL's ``sa_only``). The class a ``model_config`` names
    must live under ``finegrain.models``.
    """
    from .weights import load_checkpoint_meta, read_weights
    sd, meta = read_weights(checkpoint)
    if meta is None:
        load_checkpoint_meta(checkpoint)  # raises, naming what is missing
    model = model_from_meta(meta, checkpoint, **kwargs)
    from .weights import load_pretrained
    report = load_pretrained(model, checkpoint, state_dict=sd)
    _require_whole(report, checkpoint)
    return model.eval(), meta


def _require_whole(report, checkpoint: str) -> None:
    """A finegrain record describes its model exactly: every tensor must be there, of its
    shape, and nothing else (a record missing its head would predict with a random one)."""
    parts = [f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
             for what, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                                ("of another shape", report.skipped_shape)) if keys]
    if parts:
        raise InputError(f"{checkpoint}: the weights do not match the model its record "
                         f"describes: tensors {'; '.join(parts)}. The file is damaged or was "
                         f"edited: use the checkpoint it came from (best.ckpt / last.ckpt) or "
                         f"export it again")


def model_from_meta(meta: ModelMeta | dict, source: str = "checkpoint", **kwargs) -> nn.Module:
    """A freshly initialised model as a checkpoint's record (or its stored mapping)
    describes it (no weights): from ``model_config`` when stored, else (older checkpoints)
    from the registry's ``model_name`` / ``model_kwargs``. ``kwargs`` override stored
    arguments."""
    from ..meta import read_meta
    meta = read_meta(meta, source)
    text = meta.model_config
    if not text:
        _check_name(meta.model_name)
        return _build(meta.model_name, None, None, meta, kwargs)
    import yaml
    config = yaml.safe_load(text) if isinstance(text, str) else text
    if not isinstance(config, dict) or "class_path" not in config:
        raise InputError(f"{source}: model_config is not a class_path / init_args mapping")
    cls = resolve_class(config["class_path"], f"{source}: model_config")
    init = {**(config.get("init_args") or {}), **kwargs}
    try:
        model = cls(**init)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise InputError(f"{source}: {config['class_path']}: {e}") from e
    model.finegrain_config = {"class_path": config["class_path"], "init_args": init}
    model.finegrain_name = meta.model_name
    model.finegrain_kwargs = {**meta.model_kwargs, **kwargs}
    return model
