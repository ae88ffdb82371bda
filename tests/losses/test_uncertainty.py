"""Uncertainty weighting (Kendall et al. 2018; DCAL Eq. 6) against the explicit formula."""

import math

import pytest
import torch

from finegrain.losses.uncertainty import UncertaintyWeighting


def test_terms_match_formula_per_branch():
    uw = UncertaintyWeighting(["sa", "glca", "pwca"])
    with torch.no_grad():
        uw.w.copy_(torch.tensor([0.3, -0.7, 1.1]))
    raw = {"sa": torch.tensor(2.0), "glca": torch.tensor(0.5), "pwca": torch.tensor(3.0)}
    out = uw(raw)
    ws = {"sa": 0.3, "glca": -0.7, "pwca": 1.1}
    total = 0.0
    for name, loss in raw.items():
        expected = 0.5 * (math.exp(-ws[name]) * loss.item() + ws[name])
        assert out[name].item() == pytest.approx(expected, rel=1e-6)
        total += expected
    assert sum(out.values()).item() == pytest.approx(total, rel=1e-6)


def test_gradient_of_w_is_analytic():
    uw = UncertaintyWeighting(["a", "b"], init=0.2)
    la = torch.tensor(1.7, requires_grad=True)
    lb = torch.tensor(0.4, requires_grad=True)
    sum(uw({"a": la, "b": lb}).values()).backward()
    # d/dw 0.5 (exp(-w) L + w) = 0.5 (1 - exp(-w) L); d/dL = 0.5 exp(-w)
    for i, loss in enumerate([1.7, 0.4]):
        assert uw.w.grad[i].item() == pytest.approx(0.5 * (1 - math.exp(-0.2) * loss), rel=1e-5)
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-0.2), rel=1e-6)


def test_optimum_is_log_loss():
    """Minimising over w gives exp(-w) = 1 / L, i.e. w = log L."""
    uw = UncertaintyWeighting(["a"])
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        uw({"a": torch.tensor(4.0)})["a"].backward()
        opt.step()
    assert uw.w.item() == pytest.approx(math.log(4.0), abs=1e-3)


def test_subset_and_errors():
    uw = UncertaintyWeighting(["sa", "pwca"])
    out = uw({"sa": torch.tensor(1.0)})
    assert list(out) == ["sa"]
    with pytest.raises(KeyError, match="glca"):
        uw({"glca": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar"):
        uw({"sa": torch.ones(3)})
    with pytest.raises(ValueError):
        UncertaintyWeighting(["a", "a"])


def test_fp32_under_half_inputs():
    uw = UncertaintyWeighting(["a"])
    out = uw({"a": torch.tensor(2.0, dtype=torch.bfloat16)})
    assert out["a"].dtype == torch.float32
