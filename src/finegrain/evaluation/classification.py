"""Classification metrics: top-k accuracy (FGVC protocol, ``spec/protocols.md``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["accuracy"]


def accuracy(
    logits: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of class scores.

    A sample is correct at k when its target class is among the k highest scores. Equal scores
    are ordered by class index (a stable descending sort), so a tie never counts in favour of a
    later class. ``k`` larger than the number of classes is clipped to it (top-k = 1.0).

    Args:
        logits: (N, C) class scores (logits or probabilities; any monotone transform gives
            the same result), numpy or torch.
        targets: (N,) integer class indices in [0, C).
        topk: the k values to report.

    Returns:
        ``{"top1": float, "top5": float, ...}``: one key ``f"top{k}"`` per requested k, as
        fractions in [0, 1].

    Raises:
        ValueError: on shape mismatches, out-of-range targets, NaN scores or k < 1.
    """
    scores = torch.as_tensor(logits).detach().cpu()
    target = torch.as_tensor(targets).detach().cpu()
    if scores.ndim != 2:
        raise ValueError(
            f"logits must be 2-D (num_samples, num_classes), got shape {tuple(scores.shape)}"
        )
    num, num_classes = scores.shape
    target = target.reshape(-1)
    if target.shape[0] != num:
        raise ValueError(f"logits has {num} rows but targets has {target.shape[0]} entries")
    if num == 0:
        raise ValueError("accuracy of an empty batch is undefined: logits has 0 rows")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    if (target < 0).any() or (target >= num_classes).any():
        raise ValueError(
            f"targets must lie in [0, {num_classes}); "
            f"got min {int(target.min())}, max {int(target.max())}"
        )
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("logits contain NaN")
    ks = [int(k) for k in topk]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k in topk must be >= 1, got {ks}")

    # 0-based rank of the target: classes scoring higher, plus equal-scoring classes before it.
    tscore = scores.gather(1, target[:, None])  # (N, 1)
    cls = torch.arange(num_classes)[None, :]
    ahead = (scores > tscore) | ((scores == tscore) & (cls < target[:, None]))
    rank = ahead.sum(dim=1)  # (N,)
    return {f"top{k}": float((rank < min(k, num_classes)).double().mean()) for k in ks}
