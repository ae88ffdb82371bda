"""finegrain.evaluation.dml against pytorch-metric-learning's AccuracyCalculator, scikit-learn's
NMI and slow per-query loops."""

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import normalized_mutual_info_score

from finegrain.evaluation import dml


def _clustered(rng, n, num_classes, dim, spread=1.5):
    labels = rng.integers(0, num_classes, size=n)
    centres = rng.standard_normal((num_classes, dim))
    x = centres[labels] * spread + rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def _normalise(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)


def _pml(query, query_labels, reference=None, reference_labels=None):
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        avg_of_avgs=False,
        k=None,
        device=torch.device("cpu"),
    )
    if reference is None:
        return calc.get_accuracy(query, query_labels)
    return calc.get_accuracy(
        query, query_labels, reference, reference_labels, ref_includes_query=False
    )


def _slow(q, q_labels, db, db_labels, ks, all_vs_all):
    """Per query: stable sort of the similarities (ties by index), then Recall@K and MAP@R."""
    sims = (q @ db.T).numpy()
    recalls, maps = np.zeros(len(ks)), []
    for i in range(len(q)):
        order = sorted(
            (j for j in range(len(db)) if not (all_vs_all and j == i)),
            key=lambda j: (-sims[i, j], j),
        )
        rel = [int(db_labels[j] == q_labels[i]) for j in order]
        r = sum(rel)
        if r == 0:
            continue  # lone query: excluded
        for t, k in enumerate(ks):
            recalls[t] += any(rel[:k])
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        maps.append(ap / r)
    return recalls / len(maps), float(np.mean(maps))


def test_all_vs_all_matches_pml_and_loop():
    rng = np.random.default_rng(0)
    x, y = _clustered(rng, 400, 30, 16)
    y[-1] = 999  # a lone class: left out, as PML does
    ks = (1, 2, 4, 8, 500)
    out = dml.evaluate(x, y, ks=ks, nmi=False)
    assert set(out) == {"R@1", "R@2", "R@4", "R@8", "R@500", "MAP@R"}
    xn = _normalise(x)
    ref = _pml(xn, torch.as_tensor(y))
    assert out["R@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert out["MAP@R"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    recalls, m_ap = _slow(xn, y, xn, y, ks, all_vs_all=True)
    for k, r in zip(ks, recalls):
        assert out[f"R@{k}"] == pytest.approx(r, abs=1e-12)
    assert out["MAP@R"] == pytest.approx(m_ap, abs=1e-12)
    assert out["R@500"] == 1.0  # K clipped to the N - 1 searchable samples


def test_query_gallery_matches_pml_and_loop():
    rng = np.random.default_rng(1)
    x, y = _clustered(rng, 500, 40, 12)
    q, qy, g, gy = x[:200], y[:200], x[200:], y[200:]
    qy = qy.copy()
    qy[:3] = 777  # not in the gallery
    ks = (1, 10, 20)
    out = dml.evaluate(g, gy, ks=ks, query=q, query_labels=qy, nmi=False, chunk_size=33)
    ref = _pml(_normalise(q), torch.as_tensor(qy), _normalise(g), torch.as_tensor(gy))
    assert out["R@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert out["MAP@R"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    recalls, m_ap = _slow(_normalise(q), qy, _normalise(g), gy, ks, all_vs_all=False)
    np.testing.assert_allclose([out[f"R@{k}"] for k in ks], recalls, atol=1e-12)
    assert out["MAP@R"] == pytest.approx(m_ap, abs=1e-12)


def test_ties_ordered_by_index():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 6, size=120)
    x = np.eye(8, dtype=np.float32)[rng.integers(0, 8, size=120)]  # similarities exactly 0 or 1
    ks = (1, 3, 7)
    for chunk in (None, 11):
        out = dml.evaluate(x, y, ks=ks, nmi=False, chunk_size=chunk)
        recalls, m_ap = _slow(_normalise(x), y, _normalise(x), y, ks, all_vs_all=True)
        np.testing.assert_allclose([out[f"R@{k}"] for k in ks], recalls, atol=1e-12)
        assert out["MAP@R"] == pytest.approx(m_ap, abs=1e-12)


def test_stable_topk_equals_stable_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 30), generator=g).float()
    for k in (1, 4, 17, 30):
        vals, idx = dml.stable_topk(scores, k)
        ref_vals, ref_idx = torch.sort(scores, dim=1, descending=True, stable=True)
        torch.testing.assert_close(idx, ref_idx[:, :k])
        torch.testing.assert_close(vals, ref_vals[:, :k])



def test_stable_topk_rows_with_and_without_ties():
    """Distinct rows (topk alone), ties inside the top k (re-ordered), ties at the k-th."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(30, 50, generator=g)
    order = scores.argsort(dim=1, descending=True)
    for r in range(0, 10):  # rows 0-9: the 2nd and 4th largest made equal (inner tie)
        scores[r, order[r, 3]] = scores[r, order[r, 1]].item()
    for r in range(10, 20):  # rows 10-19: the 6th, 7th and 8th largest equal (k = 7)
        scores[r, order[r, 6:8]] = scores[r, order[r, 5]].item()
    ref_vals, ref_idx = torch.sort(scores, dim=1, descending=True, stable=True)
    for k in (1, 5, 7, 49, 50):
        vals, idx = dml.stable_topk(scores, k)
        torch.testing.assert_close(idx, ref_idx[:, :k])
        torch.testing.assert_close(vals, ref_vals[:, :k])

def _nmi_loop(a, b):
    """NMI from the contingency table, one cell at a time (arithmetic mean of entropies)."""
    n = len(a)
    ca, cb = {}, {}
    for u, v in zip(a, b):
        ca[u] = ca.get(u, 0) + 1
        cb[v] = cb.get(v, 0) + 1
    if len(ca) == len(cb) == 1:
        return 1.0
    joint = {}
    for u, v in zip(a, b):
        joint[(u, v)] = joint.get((u, v), 0) + 1
    mi = sum(c / n * math.log(c * n / (ca[u] * cb[v])) for (u, v), c in joint.items())
    h = lambda cnt: -sum(c / n * math.log(c / n) for c in cnt.values())  # noqa: E731
    if mi <= 1e-15:
        return 0.0
    return mi / ((h(ca) + h(cb)) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_matches_sklearn_and_loop(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 20, size=500)
    b = np.where(rng.random(500) < 0.6, a * 7 + 3, rng.integers(0, 25, size=500))  # partly agreeing
    ours = dml.normalized_mutual_info(a, b)
    assert ours == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
    assert ours == pytest.approx(_nmi_loop(a.tolist(), b.tolist()), abs=1e-12)
    for u, v in (
        ([1, 1, 1], [0, 0, 0]),
        ([1, 1, 2], [0, 0, 0]),
        ([0, 0, 1, 1], [1, 1, 0, 0]),
        ([0, 0, 0, 0], [0, 1, 2, 3]),
    ):
        assert dml.normalized_mutual_info(np.array(u), np.array(v)) == normalized_mutual_info_score(
            u, v
        )


def test_evaluate_nmi_uses_seeded_kmeans_on_normalised_queries():
    rng = np.random.default_rng(3)
    x, y = _clustered(rng, 300, 10, 8, spread=3.0)
    out = dml.evaluate(x, y, ks=(1,), nmi=True, seed=5)
    assign = dml.kmeans_assign(_normalise(x), len(np.unique(y)), seed=5)
    assert out["NMI"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert out["NMI"] == pytest.approx(dml.evaluate(x, y, ks=(1,), seed=5)["NMI"])  # deterministic
    assert 0.5 < out["NMI"] <= 1.0  # well separated classes


def test_errors():
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="no query has a same-class sample"):
        dml.evaluate(x, np.arange(6), nmi=False)
    with pytest.raises(ValueError, match="labels has 5"):
        dml.evaluate(x, np.arange(5), nmi=False)
    with pytest.raises(ValueError, match="query_labels"):
        dml.evaluate(x, np.zeros(6, int), query=x, nmi=False)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dml.evaluate(x, np.zeros(6, int), nmi=False)
