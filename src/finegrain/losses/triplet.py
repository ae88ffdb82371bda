"""Batch-hard triplet loss (Hermans et al. 2017), in fp32 whatever the autocast dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["batch_hard_triplet"]


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                       normalize: bool = False) -> torch.Tensor:
    """``mean_a relu(max_p d(a, p) - min_n d(a, n) + margin)`` over the batch.

    Args:
        features: (B, D) features (cast to fp32).
        labels: (B,) identity labels; a P x K sampler guarantees positives.
        margin: triplet margin.
        normalize: L2-normalise the features first.

    Anchors without a positive or a negative in the batch are left out; with none left the
    loss is 0 (still connected to the graph).
    """
    x = features.float()
    if normalize:
        x = F.normalize(x, dim=-1)
    d = torch.cdist(x, x).clamp_min(1e-12)  # (B, B) Euclidean
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not valid.any():
        return x.sum() * 0.0
    hardest_pos = d.masked_fill(~pos_mask, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(~neg_mask, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
