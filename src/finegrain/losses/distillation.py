"""Soft-target distillation (Hinton et al. 2015, arXiv:1503.02531) in the form TASN uses.

TASN (Zheng et al. CVPR 2019, Sec. 3.3) distils the part-net's soft predictions into the
master-net with a soft cross-entropy at temperature T:

    L = mean_b  -sum_c softmax(z_teacher / T)_c * log_softmax(z_student / T)_c     [* T^2]

Readings, as in the official MXNet code (``SoftmaxCrossEntropyLoss(fc_master / 10,
softmax(fc_part / 10))``):

- no T^2 factor by default (``t2_scale=True`` adds Hinton's T^2, which keeps the gradient
  magnitude independent of T);
- the teacher is **not** detached by default: the gradient also flows into the teacher's
  logits (``-log_softmax(z_student / T) / T``), pulling the part-net towards the master-net.
  ``detach_teacher=True`` gives the usual one-way distillation.

Soft cross-entropy differs from ``KL(p_teacher || p_student)`` by the teacher's entropy, which
matters only when the teacher receives gradients (the default here). Computed in fp32 whatever
the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["soft_cross_entropy_distillation", "SoftCrossEntropyDistillation"]


def soft_cross_entropy_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                    temperature: float = 10.0, detach_teacher: bool = False,
                                    t2_scale: bool = False) -> torch.Tensor:
    """Soft cross-entropy between temperature-softened teacher and student predictions.

    ``mean_b -sum_c softmax(teacher / T) * log_softmax(student / T)``, times ``T**2`` when
    ``t2_scale``.

    Args:
        student_logits: (batch_size, num_classes) logits of the student (master-net).
        teacher_logits: (batch_size, num_classes) logits of the teacher (part-net).
        temperature: softening temperature T (TASN: 10).
        detach_teacher: stop the gradient into the teacher (official TASN: False).
        t2_scale: multiply by T^2 as in Hinton et al. (official TASN: False).

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: shapes differ, are not 2-d, or ``temperature <= 0``.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be (batch_size, num_classes); "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    p_teacher = F.softmax(teacher.float() / temperature, dim=-1)  # (B, C)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    loss = -(p_teacher * log_p_student).sum(-1).mean()
    return loss * temperature ** 2 if t2_scale else loss


class SoftCrossEntropyDistillation(nn.Module):
    """Module form of :func:`soft_cross_entropy_distillation` (hyper-parameters fixed at init).

    Args:
        temperature: softening temperature T.
        detach_teacher: stop the gradient into the teacher.
        t2_scale: multiply the loss by T^2.
    """

    def __init__(self, temperature: float = 10.0, detach_teacher: bool = False,
                 t2_scale: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.detach_teacher = detach_teacher
        self.t2_scale = t2_scale

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy_distillation(student_logits, teacher_logits, self.temperature,
                                               self.detach_teacher, self.t2_scale)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, detach_teacher={self.detach_teacher}, "
                f"t2_scale={self.t2_scale}")
