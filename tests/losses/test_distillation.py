"""Soft cross-entropy distillation against the written-out formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.losses.distillation import (SoftCrossEntropyDistillation,
                                           soft_cross_entropy_distillation)


def _reference(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """mean_b -sum_c softmax(t / T)_c log softmax(s / T)_c, with explicit loops."""
    total = 0.0
    B, C = student.shape
    for b in range(B):
        zs = [float(v) / T for v in student[b]]
        zt = [float(v) / T for v in teacher[b]]
        log_norm_s = math.log(sum(math.exp(v) for v in zs))
        norm_t = sum(math.exp(v) for v in zt)
        total += -sum(math.exp(zt[c]) / norm_t * (zs[c] - log_norm_s) for c in range(C))
    return total / B


@pytest.mark.parametrize("T", [1.0, 10.0, 0.5])
def test_matches_written_out_formula(T):
    s, t = torch.randn(5, 7) * 4, torch.randn(5, 7) * 4
    got = soft_cross_entropy_distillation(s, t, temperature=T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference(s, t, T), rel=1e-5, abs=1e-6)


def test_t2_scale_multiplies_by_t_squared():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    plain = soft_cross_entropy_distillation(s, t, temperature=10.0)
    scaled = soft_cross_entropy_distillation(s, t, temperature=10.0, t2_scale=True)
    torch.testing.assert_close(scaled, plain * 100.0)


def test_equals_kl_plus_teacher_entropy():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    T = 3.0
    p_t = F.softmax(t / T, -1)
    kl = F.kl_div(F.log_softmax(s / T, -1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy_distillation(s, t, T), kl + entropy)


def test_teacher_gradient_official_and_detached():
    B, C, T = 4, 6, 10.0
    s = torch.randn(B, C, requires_grad=True)
    t = torch.randn(B, C, requires_grad=True)
    soft_cross_entropy_distillation(s, t, T).backward()
    # dL/dt_j = -(1 / (B T)) p_j (log q_j - sum_c p_c log q_c),
    # with p = softmax(t / T), q = softmax(s / T)
    p, log_q = F.softmax(t.detach() / T, -1), F.log_softmax(s.detach() / T, -1)
    expected = -(p * (log_q - (p * log_q).sum(-1, keepdim=True))) / (B * T)
    torch.testing.assert_close(t.grad, expected)
    # student: (q - p) / (B T)
    torch.testing.assert_close(s.grad, (log_q.exp() - p) / (B * T))

    s2 = s.detach().clone().requires_grad_(True)
    t2 = t.detach().clone().requires_grad_(True)
    soft_cross_entropy_distillation(s2, t2, T, detach_teacher=True).backward()
    assert t2.grad is None
    torch.testing.assert_close(s2.grad, s.grad)


def test_low_precision_inputs_give_fp32():
    s, t = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    got = soft_cross_entropy_distillation(s, t, 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference(s.float(), t.float(), 2.0), rel=1e-5)


def test_module_form_matches_function():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    loss = SoftCrossEntropyDistillation(temperature=4.0, t2_scale=True)
    expected = soft_cross_entropy_distillation(s, t, 4.0, t2_scale=True)
    torch.testing.assert_close(loss(s, t), expected)
    assert "temperature=4.0" in repr(loss)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch_size, num_classes"):
        soft_cross_entropy_distillation(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="batch_size, num_classes"):
        soft_cross_entropy_distillation(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy_distillation(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)
