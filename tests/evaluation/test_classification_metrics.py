"""finegrain.evaluation.classification.accuracy against a per-sample loop."""

import numpy as np
import pytest
import torch

from finegrain.evaluation.classification import accuracy


def _slow_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Stable descending sort per sample; correct when the target is in the first k."""
    correct = 0
    for row, t in zip(logits, targets):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        correct += t in order[: min(k, len(row))]
    return correct / len(targets)


@pytest.mark.parametrize("as_torch", [False, True])
def test_matches_loop_with_ties(as_torch):
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties
    targets = rng.integers(0, 7, size=200)
    ks = (1, 2, 5)
    inp = (torch.from_numpy(logits), torch.from_numpy(targets)) if as_torch else (logits, targets)
    out = accuracy(*inp, topk=ks)
    assert set(out) == {"top1", "top2", "top5"}
    for k in ks:
        assert out[f"top{k}"] == pytest.approx(_slow_accuracy(logits, targets, k), abs=1e-12)


def test_continuous_matches_torch_topk():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 50, generator=g)
    targets = torch.randint(0, 50, (300,), generator=g)
    out = accuracy(logits, targets)
    top5 = logits.topk(5, dim=1).indices
    assert out["top1"] == pytest.approx((top5[:, 0] == targets).float().mean().item())
    assert out["top5"] == pytest.approx((top5 == targets[:, None]).any(1).float().mean().item())


def test_k_clipped_to_num_classes():
    logits = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    out = accuracy(logits, np.array([2, 0]), topk=(1, 5))
    assert out == {"top1": 0.5, "top5": 1.0}


@pytest.mark.parametrize(
    "logits, targets, match",
    [
        (np.zeros((3, 4)), np.zeros(2, int), "targets has 2"),
        (np.zeros((3, 4)), np.array([0, 1, 4]), r"\[0, 4\)"),
        (np.zeros(4), np.zeros(4, int), "2-D"),
        (np.full((2, 3), np.nan), np.zeros(2, int), "NaN"),
        (np.zeros((2, 3)), np.zeros(2), "integer"),
    ],
)
def test_errors(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        accuracy(logits, targets)
