"""finegrain.evaluation.reid against slow per-query ports of torchreid's ``eval_market1501``,
fast-reid's ``evaluate_rank`` (mINP) and the k-reciprocal re-ranking reference."""

import numpy as np
import pytest
import torch

from finegrain.evaluation import reid


# ----------------------------------------------------------------------------- references
def _market1501_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, kind=None):
    """Per-query loop over a full argsort, as torchreid (CMC, AP) and fast-reid (INP) do."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind=kind)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(num_q):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw_cmc = matches[q][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        last = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        # torchreid leaves this list ragged when junk removal leaves < max_rank entries; a
        # query with a match has cmc 1 at the end, so pad with that
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), mode="edge"))
        tmp = [x / (i + 1.0) for i, x in enumerate(raw_cmc.cumsum())]
        all_ap.append((np.asarray(tmp) * raw_cmc).sum() / raw_cmc.sum())
    assert all_cmc, "reference: no valid query"
    return (
        np.asarray(all_cmc, dtype=np.float64).mean(0),
        float(np.mean(all_ap)),
        float(np.mean(all_inp)),
    )


def _reid_problem(rng, num_q=60, num_g=400, num_ids=40, num_cams=4, distractors=40):
    """Identities with several images per camera, distractors (pid 0), some queries unmatched."""
    g_pids = np.concatenate(
        [rng.integers(1, num_ids + 1, size=num_g - distractors), np.zeros(distractors, int)]
    )
    g_cams = rng.integers(0, num_cams, size=num_g)
    q_pids = rng.integers(1, num_ids + 6, size=num_q)  # ids > num_ids never appear in the gallery
    q_cams = rng.integers(0, num_cams, size=num_q)
    return q_pids, g_pids, q_cams, g_cams


def _check(out, ref, atol=1e-12):
    cmc, m_ap, m_inp = ref
    assert set(out) == {"cmc", "mAP", "mINP"}
    assert out["cmc"].shape == cmc.shape
    np.testing.assert_allclose(out["cmc"], cmc, atol=atol, rtol=0)
    assert out["mAP"] == pytest.approx(m_ap, abs=atol)
    assert out["mINP"] == pytest.approx(m_inp, abs=atol)


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_references_continuous(seed):
    rng = np.random.default_rng(seed)
    ids = _reid_problem(rng)
    distmat = rng.random((60, 400))  # float64: no ties, so any sort order agrees
    ref = _market1501_loop(distmat, *ids, max_rank=20)
    _check(reid.evaluate(distmat, *ids, max_rank=20), ref)
    _check(
        reid.evaluate(distmat.astype(np.float32), *ids, max_rank=20),
        _market1501_loop(distmat.astype(np.float32), *ids, max_rank=20, kind="stable"),
    )


def test_evaluate_ties_follow_stable_order():
    rng = np.random.default_rng(3)
    ids = _reid_problem(rng)
    distmat = rng.integers(0, 6, size=(60, 400)).astype(np.float32)  # almost everything ties
    distmat[0, :5] = -0.0  # -0.0 ties with 0.0 as in numpy
    ref = _market1501_loop(distmat, *ids, max_rank=30, kind="stable")
    _check(reid.evaluate(distmat, *ids, max_rank=30), ref)
    _check(reid.evaluate(distmat.astype(np.int64), *ids, max_rank=30), ref)


def test_evaluate_chunking_and_torch_input():
    rng = np.random.default_rng(4)
    ids = _reid_problem(rng)
    distmat = rng.random((60, 400)).astype(np.float32)
    full = reid.evaluate(distmat, *ids)
    for chunk in (1, 7, 64, 1000):
        _check(
            reid.evaluate(distmat, *ids, chunk_size=chunk),
            (full["cmc"], full["mAP"], full["mINP"]),
            atol=0,
        )
    out = reid.evaluate(torch.from_numpy(distmat), *(torch.from_numpy(x) for x in ids))
    _check(out, (full["cmc"], full["mAP"], full["mINP"]), atol=0)


def test_evaluate_hand_computed():
    # one query (pid 1, cam 0); gallery sorted by distance: junk, neg, pos, neg, pos
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([1, 2, 1, 3, 1])
    g_cams = np.array([0, 1, 1, 0, 2])
    out = reid.evaluate(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # clean list: neg, pos, neg, pos -> AP = (1/2 + 2/4) / 2, INP = 2 / 4
    np.testing.assert_allclose(out["cmc"], [0, 1, 1, 1])
    assert out["mAP"] == pytest.approx(0.5)
    assert out["mINP"] == pytest.approx(0.5)


def test_evaluate_max_rank_clipped_to_gallery():
    rng = np.random.default_rng(5)
    ids = _reid_problem(rng, num_q=10, num_g=30, num_ids=5, distractors=0)
    distmat = rng.random((10, 30))
    out = reid.evaluate(distmat, *ids, max_rank=50)
    assert out["cmc"].shape == (30,)
    _check(out, _market1501_loop(distmat, *ids, max_rank=50))


def test_evaluate_errors():
    d = np.random.default_rng(0).random((2, 3))
    with pytest.raises(
        ValueError, match="no query identity appears in the gallery under another camera"
    ):
        reid.evaluate(
            d, np.array([1, 2]), np.array([1, 1, 3]), np.array([0, 0]), np.array([0, 0, 0])
        )
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        reid.evaluate(d, np.array([1, 2]), np.array([1, 1]), np.array([0, 0]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="max_rank"):
        reid.evaluate(d, np.array([1, 2]), np.array([1, 1, 3]), np.array([0, 0]), np.ones(3), 0)
    with pytest.raises(ValueError, match="gallery is empty"):
        reid.evaluate(np.zeros((2, 0)), np.array([1, 2]), [], np.array([0, 0]), [])
    d[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reid.evaluate(
            d, np.array([1, 2]), np.array([1, 1, 3]), np.array([0, 0]), np.array([1, 1, 1])
        )


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_evaluate_features_equals_full_distmat(metric, dtype, monkeypatch):
    rng = np.random.default_rng(6)
    ids = _reid_problem(rng, num_q=50, num_g=300)
    centres = rng.standard_normal((50, 16))
    q = centres[ids[0] % 50] + rng.standard_normal((50, 16))
    g = centres[ids[1] % 50] + rng.standard_normal((300, 16))
    full = reid.evaluate(reid.compute_distance(q, g, metric, dtype), *ids)

    shapes = []
    block = reid._distance_block
    monkeypatch.setattr(
        reid, "_distance_block", lambda a, b: shapes.append(a[0].shape) or block(a, b)
    )
    out = reid.evaluate_features(q, g, *ids, metric=metric, chunk_size=16, dtype=dtype)
    _check(out, (full["cmc"], full["mAP"], full["mINP"]), atol=1e-12)
    assert shapes and all(s[0] <= 16 for s in shapes)  # never more than chunk x G distances


def test_compute_distance_definitions():
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(
        9, 5, generator=g, dtype=torch.float64
    )
    d = reid.compute_distance(q, x, "euclidean", torch.float64)
    torch.testing.assert_close(d, torch.cdist(q, x) ** 2)
    d = reid.compute_distance(q, x, "cosine", torch.float64)
    cos = torch.nn.functional.cosine_similarity(q[:, None], x[None], dim=2)
    torch.testing.assert_close(d, 1 - cos)
    with pytest.raises(ValueError, match="metric"):
        reid.compute_distance(q, x, "manhattan")


# ----------------------------------------------------------------------------- re-ranking
def _re_ranking_loop(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Direct port of the k-reciprocal re-ranking reference (distance-matrix version)."""
    original = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ],
        axis=0,
    )
    original = np.power(original, 2).astype(np.float32)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    v = np.zeros_like(original).astype(np.float32)
    initial_rank = np.argsort(original).astype(np.int32)
    num_q = q_g_dist.shape[0]
    num_all = q_g_dist.shape[0] + q_g_dist.shape[1]
    half = int(np.around(k1 / 2.0))
    for i in range(num_all):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            c_forward = initial_rank[cand, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = 1.0 * weight / np.sum(weight)
    original = original[:num_q]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(num_all):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(num_all)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(num_q):
        temp_min = np.zeros(shape=[1, num_all], dtype=np.float32)
        nonzero = np.where(v[i, :] != 0)[0]
        for k in nonzero:
            rows = inv_index[k]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:num_q, num_q:]


def _clustered_distances(rng, num_q, num_g, dim, rounded=False):
    x = rng.standard_normal((num_q + num_g, dim)).astype(np.float32)
    x[num_q:] += 2 * np.repeat(rng.standard_normal((num_g // 5 + 1, dim)), 5, axis=0)[
        :num_g
    ].astype(np.float32)
    if rounded:
        x = np.round(x)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(np.float32)
    return d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


@pytest.mark.parametrize(
    "num_q, num_g, dim, k1, k2, lam, rounded, chunk",
    [
        (20, 80, 8, 20, 6, 0.3, False, None),
        (30, 120, 4, 20, 6, 0.3, False, 7),
        (25, 90, 16, 5, 1, 0.5, False, 3),
        (20, 100, 3, 20, 6, 0.3, True, None),  # tied distances: same np.argsort as the reference
        (10, 40, 4, 60, 10, 0.1, False, None),  # k1 + 1 > N
    ],
)
def test_re_rank_matches_reference(num_q, num_g, dim, k1, k2, lam, rounded, chunk):
    rng = np.random.default_rng(num_q + num_g + k1)
    qg, qq, gg = _clustered_distances(rng, num_q, num_g, dim, rounded)
    ref = _re_ranking_loop(qg, qq, gg, k1, k2, lam)
    out = reid.re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, chunk_size=chunk)
    assert out.shape == (num_q, num_g) and out.dtype == np.float32
    # sums accumulate in a different order than the reference's float32 loop: 1 ulp-level
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_re_rank_float64_inputs_and_errors():
    rng = np.random.default_rng(9)
    qg, qq, gg = (x.astype(np.float64) for x in _clustered_distances(rng, 12, 50, 6))
    np.testing.assert_allclose(
        reid.re_rank(qg, qq, gg), _re_ranking_loop(qg, qq, gg), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="g_g_dist"):
        reid.re_rank(qg, qq, gg[:-1, :-1])


# ----------------------------------------------------------------------------- calibration
def _sweep(pos, neg, targets):
    """Every candidate threshold, accept when distance < threshold."""
    cands = sorted(set(pos.tolist()) | set(neg.tolist()) | {np.inf})
    fars = [sum(n < t for n in neg) / len(neg) for t in cands]
    tars = [sum(p < t for p in pos) / len(pos) for t in cands]
    per_far = []
    for f in targets:
        best = max(i for i in range(len(cands)) if fars[i] <= f)
        per_far.append((cands[best], tars[best], fars[best]))
    gaps = [abs(fa - (1 - ta)) for fa, ta in zip(fars, tars)]
    e = gaps.index(min(gaps))
    return per_far, (fars[e] + 1 - tars[e]) / 2, cands[e]


@pytest.mark.parametrize("rounded", [False, True])
def test_calibrate_matches_sweep(rounded):
    rng = np.random.default_rng(10)
    pos = rng.normal(0.6, 0.2, 150)
    neg = rng.normal(1.2, 0.25, 1000)
    if rounded:
        pos, neg = np.round(pos, 1), np.round(neg, 1)
    targets = (0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0)
    out = reid.calibrate(pos, neg, far=targets)
    per_far, eer, eer_t = _sweep(pos, neg, targets)
    np.testing.assert_allclose(out["threshold"], [p[0] for p in per_far])
    np.testing.assert_allclose(out["tar"], [p[1] for p in per_far])
    np.testing.assert_allclose(out["far_achieved"], [p[2] for p in per_far])
    assert (out["far_achieved"] <= out["far"]).all()
    assert out["eer"] == pytest.approx(eer)
    assert out["eer_threshold"] == pytest.approx(eer_t)


def test_calibrate_errors():
    with pytest.raises(ValueError, match="at least one"):
        reid.calibrate([], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reid.calibrate([0.1], [1.0], far=(2.0,))
