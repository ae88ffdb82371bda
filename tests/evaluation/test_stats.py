"""Paired-seed statistics against hand computations (ddof 1, Student t)."""

import math

import pytest

from finegrain.evaluation.stats import binomial_se, paired_difference

T975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # t_{0.975, df}, from tables


def test_paired_interval_by_hand():
    # d = [1, 2, 4]: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
    r = paired_difference([11, 12, 14], [10, 10, 10])
    half = T975[2] * math.sqrt(7 / 3) / math.sqrt(3)
    assert r["n"] == 3 and r["wins"] == 3 and r["ties"] == 0
    assert r["diff_mean"] == pytest.approx(7 / 3)
    assert r["diff_std"] == pytest.approx(math.sqrt(7 / 3))  # ddof 1, not sqrt(14/9)
    assert r["ci_low"] == pytest.approx(7 / 3 - half)
    assert r["ci_high"] == pytest.approx(7 / 3 + half)
    assert r["ci_low"] < 0 < r["ci_high"] and r["verdict"] == "none"  # 3 wins, no evidence
    assert (r["baseline_mean"], r["method_mean"]) == (10, pytest.approx(37 / 3))


def test_paired_verdicts_need_the_interval_to_exclude_zero():
    # d = [0.9, 1.1, 1.0, 0.95, 1.05]: mean 1, sd sqrt(0.00625)
    r = paired_difference([1.9, 2.1, 2.0, 1.95, 2.05], [1, 1, 1, 1, 1])
    half = T975[4] * math.sqrt(0.00625) / math.sqrt(5)
    assert r["ci_low"] == pytest.approx(1 - half) and r["ci_high"] == pytest.approx(1 + half)
    assert r["verdict"] == "method"
    flipped = paired_difference([1, 1, 1, 1, 1], [1.9, 2.1, 2.0, 1.95, 2.05])
    assert flipped["verdict"] == "baseline" and flipped["wins"] == 0
    # pairing matters: the same values unpaired-shuffled give a wider interval
    a, b = [0.50, 0.62, 0.71, 0.55], [0.48, 0.60, 0.69, 0.53]
    assert paired_difference(a, b)["verdict"] == "method"  # +0.02 on every seed


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    r = paired_difference([0.7], [0.6])
    assert r["diff_mean"] == pytest.approx(0.1) and r["ci_low"] is None
    assert r["verdict"] == "none" and r["wins"] == 1
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([float("nan")], [1])


def test_binomial_se():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.9, 400) == pytest.approx(0.015)
    assert binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        binomial_se(0.5, 0)
