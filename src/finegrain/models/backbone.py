"""One builder for the timm backbones of every method (in the spirit of timm's
``build_model_with_cfg``): :func:`create_backbone`.

Every model file (plain classifiers, DCAL, TASN, DALG, cross-image DML) gets its backbone here,
headless (``num_classes=0``) and, by default, without weights (``finegrain.models.weights``
loads files afterwards). What an argument means for an architecture is read from timm, never
from the spelling of its name:

- ``img_size`` is passed only to architectures whose pretrained config has
  ``fixed_input_size`` (ViT, DeiT, the R+ViT hybrids: position embeddings sized for the
  input), the rule timm's own builder uses; a CNN takes any input size and ignores it;
- ``if_supported`` arguments (``drop_path_rate``, ``zero_init_last`` ...) are passed only where
  the model class's ``__init__`` takes them (the class is found once per name by building the
  model on the ``meta`` device, which allocates nothing and leaves the random state alone).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn

from ..errors import UnknownNameError

__all__ = ["BackboneInfo", "create_backbone", "model_init_arguments", "takes_img_size"]


@dataclass(frozen=True)
class BackboneInfo:
    """What a method needs to know about its timm backbone.

    Args:
        num_features: C, width of the pooled features and of the tokens / feature map.
        is_vit: a token model with a ``patch_embed`` (ViT, DeiT, hybrids).
        num_prefix_tokens: class / register tokens before the patch tokens (0 for CNNs).
        fixed_input_size: the position embeddings are sized for ``img_size``.
    """

    num_features: int
    is_vit: bool
    num_prefix_tokens: int
    fixed_input_size: bool


def check_architecture(name: str) -> None:
    """Refuse a name timm does not know, with the closest names it does (not timm's
    ``RuntimeError: Unknown model``)."""
    if timm.is_model(name):
        return
    import difflib
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "no close name"
    raise UnknownNameError(f"backbone {name!r} is not a timm architecture ({hint}); "
                           f"timm.list_models('{name.split('_')[0]}*') lists the names timm has")


def takes_img_size(name: str) -> bool:
    """Whether timm architecture ``name`` is built for a fixed input size (``img_size``
    argument): its pretrained config's ``fixed_input_size``."""
    cfg = timm.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


@functools.lru_cache(maxsize=None)
def model_init_arguments(name: str) -> frozenset[str]:
    """Names of the ``__init__`` arguments of timm architecture ``name``'s model class."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return frozenset(inspect.signature(type(model).__init__).parameters)


def create_backbone(name: str, img_size: int | tuple[int, int] | list[int] | None = None,
                    pretrained: bool = False, if_supported: dict[str, Any] | None = None,
                    **kwargs: Any) -> tuple[nn.Module, BackboneInfo]:
    """A headless timm backbone (``num_classes=0``) and its :class:`BackboneInfo`.

    Args:
        name: timm architecture name (``vit_small_patch16_224``, ``resnet50`` ...).
        img_size: input size (int or (H, W)) for architectures with a fixed input size
            (position embeddings sized for it; it overrides an ``img_size`` in ``kwargs``);
            ignored by the others.
        pretrained: load timm's pretrained weights (the Hub or
            ``pretrained_cfg_overlay=dict(file=...)``); methods load files afterwards instead.
        if_supported: arguments passed only where the model class takes them
            (``drop_path_rate``, ``zero_init_last`` ...); ``kwargs`` override them.
        **kwargs: further ``timm.create_model`` arguments, always passed (``depth``,
            ``embed_dim``, ``channels`` ... of tiny models).

    Returns:
        ``(backbone, info)``.
    """
    check_architecture(name)
    kw: dict[str, Any] = {}
    if if_supported:
        accepted = model_init_arguments(name)
        kw.update({k: v for k, v in if_supported.items() if k in accepted})
    kw.update(kwargs)
    fixed = takes_img_size(name)
    if img_size is not None and fixed:
        kw["img_size"] = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kw)
    info = BackboneInfo(num_features=int(model.num_features),
                        is_vit=hasattr(model, "patch_embed"),
                        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
                        fixed_input_size=fixed)
    return model, info
