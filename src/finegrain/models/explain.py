"""The one explain contract every model keeps.

``model.explain(images, pair=None) -> list[AttentionMap]``: ``images`` (B, 3, H, W) and, for
models with a pair-wise map (``model.pairwise_explain`` true), ``pair`` (B, 3, H', W'), image
``b`` paired with ``pair[b]``. Each :class:`AttentionMap` names itself and the image it lies
over. Models return raw maps; :func:`finegrain.visualize.save_explain` scales each one to
[0, 1] for drawing (the only min-max scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InputError

__all__ = ["AttentionMap", "check_pair"]


@dataclass(frozen=True)
class AttentionMap:
    """One named map of ``model.explain``.

    Args:
        name: what the map shows (``rollout``, ``cross_attention_reverse`` ...).
        map: (B, h, w) raw attention on the token / feature grid of ``image`` (not scaled), or
            (B, 3, h, w) a picture in the model's input normalisation (TASN's sampled images),
            drawn as is.
        image: the image it belongs to: ``"query"`` (``images``) or ``"pair"`` (``pair``).
    """

    name: str
    map: torch.Tensor
    image: Literal["query", "pair"] = "query"

    def __post_init__(self):
        if self.image not in ("query", "pair"):
            raise ValueError(f"AttentionMap.image is 'query' or 'pair', got {self.image!r}")

    @property
    def is_picture(self) -> bool:
        """(B, 3, h, w): an image to draw as is, not a heat map."""
        return self.map.dim() == 4


def check_pair(model: torch.nn.Module, pair: torch.Tensor | None) -> None:
    """Raise :class:`~finegrain.errors.InputError` when ``pair`` is given to a model without a
    pair-wise map (``model.pairwise_explain`` false)."""
    if pair is not None and not getattr(model, "pairwise_explain", False):
        raise InputError(f"{type(model).__name__} has no pair-wise attention map: explain its "
                         f"images without --pair (DCAL and cross-image models with the "
                         f"cross-attention branch draw pairs)")
