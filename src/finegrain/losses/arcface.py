"""ArcFace additive angular margin head and loss, always in fp32.

Reference: Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019, arXiv:1801.07698. DOLG / DALG train their landmark descriptor with it
(DOLG: scale s = 30, margin m = 0.15).

With ``cos_j`` the cosine between the L2-normalised feature and the L2-normalised class weight
``W_j``, the target class ``y`` gets ``cos(theta_y + m)`` and every logit is scaled by ``s``:

    L = CE(s * [cos_1, .., cos(theta_y + m), .., cos_C], y)                      (Eq. 3)

Where ``theta_y + m`` would pass pi the margin function is no longer monotonic; as in the
authors' code (insightface ``ArcMarginProduct``) the target logit then becomes
``cos_y - m * sin(m)`` (the linear extension; ``easy_margin=True`` instead keeps ``cos_y``
whenever ``cos_y <= 0``). At evaluation the logits are ``s * cos`` without margin, so
``softmax(logits)`` is a proper probability over the training classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["cosine_logits", "arcface_margin", "arcface_loss", "ArcFaceHead"]


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosines between L2-normalised rows of ``features`` (B, D) and ``weight`` (C, D) -> (B, C),
    computed in fp32 with autocast off."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.normalize(features.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).t()


def arcface_margin(cosine: torch.Tensor, targets: torch.Tensor, s: float = 30.0,
                   m: float = 0.15, easy_margin: bool = False) -> torch.Tensor:
    """Scaled logits with the additive angular margin on each row's target class.

    Args:
        cosine: (B, C) cosines in [-1, 1].
        targets: (B,) class indices.
        s: scale.
        m: additive angular margin (radians).
        easy_margin: keep ``cos_y`` when ``cos_y <= 0`` (instead of the linear extension
            past ``theta_y + m > pi``).

    Returns:
        (B, C) fp32 logits ``s * cos`` with ``cos(theta_y + m)`` at the targets.
    """
    if cosine.ndim != 2 or targets.shape != cosine.shape[:1]:
        raise ValueError(f"arcface_margin: cosine must be (batch, classes) and targets "
                         f"(batch,), got {tuple(cosine.shape)} and {tuple(targets.shape)}")
    cos = cosine.float()
    cos_y = cos.gather(1, targets[:, None]).squeeze(1)  # (B,)
    sin_y = (1.0 - cos_y * cos_y).clamp_min(1e-7).sqrt()
    phi = cos_y * math.cos(m) - sin_y * math.sin(m)  # cos(theta_y + m)
    if easy_margin:
        phi = torch.where(cos_y > 0, phi, cos_y)
    else:
        # theta_y + m > pi  <=>  cos_y < cos(pi - m): linear extension of the margin function
        phi = torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - math.sin(math.pi - m) * m)
    out = cos.scatter(1, targets[:, None], phi[:, None])
    return s * out


def arcface_loss(cosine: torch.Tensor, targets: torch.Tensor, s: float = 30.0, m: float = 0.15,
                 easy_margin: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean ArcFace cross-entropy (Eq. 3) of (B, C) cosines against (B,) targets, in fp32."""
    with torch.autocast(device_type=cosine.device.type, enabled=False):
        logits = arcface_margin(cosine, targets, s, m, easy_margin)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class ArcFaceHead(nn.Module):
    """Normalised class weights + the ArcFace margin loss.

    Args:
        in_features: descriptor dimension D.
        num_classes: number of training classes C.
        s: logit scale (DOLG: 30).
        m: additive angular margin in radians (DOLG: 0.15).
        easy_margin: see :func:`arcface_margin`.
        label_smoothing: cross-entropy label smoothing (0: none, as DOLG).
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.15,
                 easy_margin: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m={m} must lie in [0, pi/2)")
        self.in_features, self.num_classes = in_features, num_classes
        self.s, self.m, self.easy_margin = s, m, easy_margin
        self.label_smoothing = label_smoothing
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(s * cos)`` logits (B, C) without margin and, with ``targets``, the
        margin loss (a scalar; ``None`` otherwise)."""
        cos = cosine_logits(features, self.weight)  # (B, C)
        loss = None
        if targets is not None:
            loss = arcface_loss(cos, targets, self.s, self.m, self.easy_margin,
                                self.label_smoothing)
        return self.s * cos, loss

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"s={self.s}, m={self.m}")
