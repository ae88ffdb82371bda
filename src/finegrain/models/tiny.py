"""Tiny configurations of every registered model: one table for the tests and the demo.

:func:`tiny_kwargs` gives, for any name of :func:`finegrain.list_models`, the model arguments
that shrink it (few blocks, narrow layers, a small input) while keeping its structure: the same
branches, heads and losses as the paper-size model. :func:`tiny_input_size` gives the image
size to feed it. Two scales:

- ``"test"``: 32 px, 2-block ViTs, 4-token windows, ResNets of width 8: unit tests and the
  registry-wide test (``tests/models/test_all_models.py``), a forward + backward in well under
  a second on one CPU core;
- ``"demo"``: the configurations of ``finegrain demo`` (64 px, a 4-block hybrid ViT-Ti,
  ResNet-18s of width 16; see :mod:`finegrain.demo`): small enough to train every method
  against its baseline in the DESIGN.md budget, large enough to learn the generated parts.

Models are matched by family (the prefix of the registered name: ``dcal_``, ``tasn_``,
``dalg_``, ``cross_image_``, else a plain classifier) and, inside a family, by backbone kind
(plain ViT / DeiT, R+ViT-Ti hybrid ``*_r_s16_p8_*``, R50+ViT-B hybrid ``*_r50_*``, ResNet).
Task arguments (``task="reid"``, ``glca=False``, ``local="none"`` ...) are not part of the
table: callers add them (``{**tiny_kwargs(name), "task": "reid"}``, and an ``img_size`` of
their own for a non-square Re-ID input such as the demo's ``[64, 32]``).

Nothing here imports the model files: the table is plain data.
"""

from __future__ import annotations

import copy
from typing import Literal

Scale = Literal["test", "demo"]

__all__ = ["DEMO_PLAIN_VIT", "DEMO_R50_VIT", "DEMO_RESNET", "DEMO_SIZE", "DEMO_VIT",
           "TEST_HYBRID_VIT", "TEST_R50_VIT", "TEST_RESNET", "TEST_SIZE", "TEST_VIT", "family",
           "tiny_input_size", "tiny_kwargs"]

# ---- test scale (32 px) ---------------------------------------------------------------------
TEST_SIZE = 32
TEST_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
"""Plain ViT / DeiT at 32 px: 4 x 4 patches of 8 px, 2 blocks (DCAL's rollout needs >= 2)."""
TEST_HYBRID_VIT = {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
"""R+ViT-Ti hybrid (ResNet stem, stride 4) at 32 px: 2 x 2 patches of the stem's map, 4 x 4."""
TEST_R50_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
"""R50+ViT-B hybrid: timm fixes its ResNet-50 stages (stride 16: 2 x 2 tokens at 32 px); only
the transformer shrinks."""
TEST_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}
"""timm ResNet (basic or bottleneck blocks) with 8 ... 64 channels per stage."""

# ---- demo scale (64 px): the configurations finegrain demo trains ---------------------------
DEMO_SIZE = 64
DEMO_VIT = {"patch_size": 2, "embed_dim": 96, "depth": 4, "num_heads": 3}
"""The demo's hybrid ViT-Ti (ResNet stem, stride 4, then 2 x 2 patches: 8 x 8 tokens at 64 px):
from scratch it learns the parts within the demo budget, a plain patch-8 ViT does not."""
DEMO_PLAIN_VIT = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
"""Plain ViT / DeiT at 64 px: 8 x 8 patches of 8 px (ViT-Ti width, 4 blocks)."""
DEMO_R50_VIT = {"embed_dim": 96, "depth": 4, "num_heads": 3}
DEMO_RESNET = {"channels": [16, 32, 64, 128], "stem_width": 16}
"""The demo's ResNet-18s (TASN, cross-image DML, the CNN baseline): 16 ... 128 channels."""

_SIZE = {"test": TEST_SIZE, "demo": DEMO_SIZE}
_VITS = {"test": {"plain": TEST_VIT, "hybrid": TEST_HYBRID_VIT, "r50": TEST_R50_VIT},
         "demo": {"plain": DEMO_PLAIN_VIT, "hybrid": DEMO_VIT, "r50": DEMO_R50_VIT}}
_RESNETS = {"test": TEST_RESNET, "demo": DEMO_RESNET}


def family(name: str) -> str:
    """The method of a registered name, as its class states it
    (:attr:`~finegrain.models.registry.FinegrainModel.family`: ``"dcal"``, ``"tasn"``,
    ``"dalg"``, ``"cross_image"`` or ``"classifier"``)."""
    from .registry import is_model, model_class
    return getattr(model_class(name), "family", "classifier") if is_model(name) else "classifier"


def _backbone_kind(name: str) -> str:
    """``"hybrid"`` (R+ViT-Ti), ``"r50"`` (R50+ViT-B), ``"plain"`` (ViT / DeiT) or
    ``"resnet"``; raises for a backbone the table does not know."""
    if "_r_s16_" in name:
        return "hybrid"
    if "_r50_" in name:
        return "r50"
    if "vit_" in name or "deit_" in name:
        return "plain"
    if "resnet" in name:
        return "resnet"
    if "efficientnet" in name:
        return "efficientnet"
    raise KeyError(f"no tiny configuration for {name!r}: add its backbone kind to "
                   f"finegrain/models/tiny.py")


def _check_scale(scale: str) -> None:
    if scale not in _SIZE:
        raise ValueError(f"scale={scale!r}: choose 'test' or 'demo'")


def tiny_input_size(name: str, scale: Scale = "test") -> tuple[int, int]:
    """(H, W) of the images to feed ``tiny_kwargs(name, scale)``'s model (square)."""
    _check_scale(scale)
    s = _SIZE[scale]
    return s, s


def tiny_kwargs(name: str, scale: Scale = "test") -> dict:
    """Keyword arguments of ``create_model(name, ...)`` that make it tiny (a fresh copy).

    ``num_classes`` is not included (the data gives it). Every model keeps its structure:
    DCAL keeps SA + GLCA + PWCA, TASN its attention net, sampler and distiller, DALG its local
    branch and cross-attention fusion, cross-image DML its conditional branch.

    Args:
        name: a registered model name (``finegrain.list_models()``).
        scale: ``"test"`` (32 px, unit tests) or ``"demo"`` (64 px, ``finegrain demo``).

    Raises:
        KeyError: a backbone kind the table does not know (the message says where to add it).
    """
    _check_scale(scale)
    fam, kind, size = family(name), _backbone_kind(name), _SIZE[scale]
    vit = _VITS[scale].get(kind)
    resnet = _RESNETS[scale]
    if fam == "dcal":
        if vit is None:
            raise KeyError(f"{name}: DCAL needs a ViT backbone")
        kw = {"img_size": size, "drop_path_rate": 0.0, "backbone_kwargs": vit}
    elif fam == "tasn":
        kw = {"sample_size": size, "attention_size": size, "backbone_kwargs": resnet,
              "attention_backbone_kwargs": resnet}
    elif fam == "dalg":
        if vit is None:
            raise KeyError(f"{name}: DALG needs a ViT backbone")
        if scale == "test":
            kw = {"img_size": size, "global_dim": 32, "local_dim": 32, "embedding_dim": 16,
                  "window_size": 4, "fusion_heads": 2, "drop_path_rate": 0.0,
                  "backbone_kwargs": vit}
        else:
            kw = {"img_size": size, "global_dim": 96, "local_dim": 96, "embedding_dim": 64,
                  "window_size": 4, "fusion_heads": 3, "drop_path_rate": 0.0,
                  "backbone_kwargs": vit}
    elif fam == "cross_image":
        emb = 32 if scale == "test" else 128
        if kind == "resnet":
            kw = {"embedding_dim": emb, "backbone_kwargs": resnet}
        else:
            kw = {"embedding_dim": emb, "img_size": size, "backbone_kwargs": vit}
        if scale == "test":
            kw["num_heads"] = 4
    else:  # plain classifier
        if kind == "resnet":
            kw = {"backbone_kwargs": resnet}
        elif kind == "efficientnet":  # timm fixes its widths and depths: the real size (4.7 M)
            kw = {"drop_path_rate": 0.0}
        else:
            kw = {"img_size": size, "drop_path_rate": 0.0, "backbone_kwargs": vit}
    return copy.deepcopy(kw)
