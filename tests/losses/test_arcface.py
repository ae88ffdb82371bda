"""ArcFace head and loss against a per-sample loop reference."""

import math

import pytest
import torch

from finegrain.losses.arcface import ArcFaceHead, arcface_loss, arcface_margin


def _reference_loss(cos: torch.Tensor, y: torch.Tensor, s: float, m: float) -> torch.Tensor:
    total = 0.0
    for i in range(cos.shape[0]):
        row = [s * float(c) for c in cos[i]]
        c = float(cos[i, y[i]])
        theta = math.acos(c)
        row[y[i]] = s * (math.cos(theta + m) if theta + m <= math.pi
                         else c - math.sin(math.pi - m) * m)
        lse = math.log(sum(math.exp(v) for v in row))
        total += lse - row[y[i]]
    return torch.tensor(total / cos.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_loss_matches_loop(dtype):
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 5, generator=g) * 2 - 1).to(dtype)
    cos[0, 2] = -0.999  # theta + m > pi: the linear extension
    y = torch.tensor([2, 0, 1, 4, 3, 2])
    got = arcface_loss(cos, y, s=30.0, m=0.15)
    assert got.dtype == torch.float32
    ref = _reference_loss(cos.double(), y, 30.0, 0.15)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_margin_only_on_target_and_zero_margin_is_plain_softmax():
    cos = torch.rand(4, 3) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    logits = arcface_margin(cos, y, s=10.0, m=0.3)
    mask = torch.zeros_like(cos, dtype=torch.bool).scatter(1, y[:, None], True)
    torch.testing.assert_close(logits[~mask], 10.0 * cos[~mask])
    assert (logits[mask] < 10.0 * cos[mask]).all()  # the margin makes the target harder
    torch.testing.assert_close(arcface_margin(cos, y, s=10.0, m=0.0), 10.0 * cos)


def test_head_logits_without_margin_and_finite_grads():
    head = ArcFaceHead(8, 5, s=30.0, m=0.15)
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    logits, loss = head(x, y)
    F = torch.nn.functional
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(logits, 30.0 * cos)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert head(x)[1] is None


def test_bad_shapes_and_margin_raise():
    with pytest.raises(ValueError, match="batch"):
        arcface_margin(torch.rand(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="margin"):
        ArcFaceHead(4, 3, m=2.0)
