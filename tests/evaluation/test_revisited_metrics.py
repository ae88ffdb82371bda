"""finegrain.evaluation.revisited against a direct port of revisitop's compute_map, on the real
ROxford5k / RParis6k ground truth."""

import pickle

import numpy as np
import pytest

from finegrain.evaluation import revisited


def _compute_ap_loop(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _compute_map_loop(ranks, gnd, kappas):
    """revisitop python/evaluate.py compute_map, query by query, junk by junk."""
    m_ap, nq, nempty = 0.0, len(gnd), 0
    aps, pr, prs = np.zeros(nq), np.zeros(len(kappas)), np.zeros((nq, len(kappas)))
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", np.empty(0)))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = _compute_ap_loop(pos, len(qgnd))
        m_ap += ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return m_ap / (nq - nempty), aps, pr / (nq - nempty), prs


def test_setting_gnd_matches_revisitop_example(shared_data):
    gnd = revisited.load_gnd(shared_data / "revisitop" / "gnd_rparis6k.pkl")["gnd"]
    for setting, ref in _settings(gnd).items():
        ours = revisited.setting_gnd(gnd, setting)
        for a, b in zip(ours, ref):
            np.testing.assert_array_equal(a["ok"], b["ok"])
            np.testing.assert_array_equal(a["junk"], b["junk"])


def _settings(gnd):
    """The revisitop example's Easy / Medium / Hard ok and junk lists."""
    out = {}
    out["easy"] = [
        {"ok": np.concatenate([g["easy"]]), "junk": np.concatenate([g["junk"], g["hard"]])}
        for g in gnd
    ]
    out["medium"] = [
        {"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.concatenate([g["junk"]])}
        for g in gnd
    ]
    out["hard"] = [
        {"ok": np.concatenate([g["hard"]]), "junk": np.concatenate([g["junk"], g["easy"]])}
        for g in gnd
    ]
    return out


def _near_random_ranks(rng, gnd, n_db, strength):
    """argsort of random scores, positives pushed up a bit so that APs are not all tiny."""
    scores = rng.random((n_db, len(gnd)))
    for i, g in enumerate(gnd):
        scores[g["easy"], i] += strength
        scores[g["hard"], i] += strength / 2
    return np.argsort(-scores, axis=0)


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_matches_revisitop_on_real_gnd(shared_data, name):
    cfg = revisited.load_gnd(shared_data / "revisitop" / f"gnd_{name}.pkl")
    n_db, gnd = len(cfg["imlist"]), cfg["gnd"]
    assert len(gnd) == len(cfg["qimlist"]) == 70
    rng = np.random.default_rng(0)
    ranks = _near_random_ranks(rng, gnd, n_db, strength=0.7)
    out = revisited.evaluate(ranks, cfg)
    kappas = [1, 5, 10]
    for setting, sgnd in _settings(gnd).items():
        ref_map, ref_aps, ref_pr, ref_prs = _compute_map_loop(ranks, sgnd, kappas)
        m_ap, aps, mpr, prs = revisited.compute_map(ranks, sgnd, kappas)
        assert m_ap == pytest.approx(ref_map, abs=1e-12)
        np.testing.assert_allclose(
            aps, ref_aps, atol=1e-12, rtol=0
        )  # nan where the reference has nan
        np.testing.assert_allclose(mpr, ref_pr, atol=1e-12, rtol=0)
        np.testing.assert_allclose(prs, ref_prs, atol=1e-12, rtol=0)
        assert out[setting]["mAP"] == pytest.approx(ref_map, abs=1e-12)
        for k, p in zip(kappas, ref_pr):
            assert out[setting][f"mP@{k}"] == pytest.approx(p, abs=1e-12)
    if name == "roxford5k":  # ROxford has queries without easy images: excluded, not zero
        assert np.isnan(revisited.compute_map(ranks, _settings(gnd)["easy"])[1]).any()


def test_distractors_and_truncated_ranks(shared_data):
    cfg = revisited.load_gnd(shared_data / "revisitop" / "gnd_rparis6k.pkl")
    gnd = _settings(cfg["gnd"])["medium"]
    rng = np.random.default_rng(1)
    ranks = _near_random_ranks(
        rng, cfg["gnd"], len(cfg["imlist"]) + 3000, strength=0.3
    )  # +distractors
    ref = _compute_map_loop(ranks, gnd, [1, 5, 10])
    out = revisited.compute_map(ranks.astype(np.int32), gnd, (1, 5, 10))
    assert out[0] == pytest.approx(ref[0], abs=1e-12)
    np.testing.assert_allclose(out[3], ref[3], atol=1e-12)
    # truncated: only the top 2000 of each column; positives below count as missed
    top = ranks[:2000]
    ref = _compute_map_loop(top, gnd, [1, 5, 10])
    out = revisited.compute_map(top, gnd, (1, 5, 10))
    np.testing.assert_allclose(out[1], ref[1], atol=1e-12)


def test_overlapping_ok_and_junk_like_revisitop():
    ranks = np.array([[3, 0, 1, 2, 4, 5]]).T
    gnd = [{"ok": np.array([0, 2, 5]), "junk": np.array([2, 4])}]
    ref = _compute_map_loop(ranks, gnd, [1, 2, 4])
    out = revisited.compute_map(ranks, gnd, (1, 2, 4))
    assert out[0] == pytest.approx(ref[0], abs=1e-15)
    np.testing.assert_allclose(out[3], ref[3])


def test_hand_computed_ap():
    # clean ranking: pos, neg, pos (junk in between removed) -> AP = (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    ranks = np.array([[7, 9, 3, 8]]).T
    m_ap, aps, mpr, prs = revisited.compute_map(ranks, [{"ok": [7, 8], "junk": [3]}], (1, 2))
    assert m_ap == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    np.testing.assert_allclose(prs, [[1.0, 0.5]])


def test_perfect_ranking_gives_one(shared_data):
    cfg = revisited.load_gnd(shared_data / "revisitop" / "gnd_roxford5k.pkl")
    n_db, gnd = len(cfg["imlist"]), cfg["gnd"]
    for setting, sgnd in _settings(gnd).items():
        ranks = np.empty((n_db, len(gnd)), dtype=np.int64)
        for i, g in enumerate(sgnd):  # positives, then junk, then the rest
            first = np.concatenate([g["ok"], np.setdiff1d(g["junk"], g["ok"])]).astype(np.int64)
            ranks[:, i] = np.concatenate([first, np.setdiff1d(np.arange(n_db), first)])
        assert revisited.evaluate(ranks, gnd)[setting]["mAP"] == pytest.approx(1.0)
        assert revisited.compute_map(ranks, sgnd)[0] == pytest.approx(1.0)


def test_load_gnd_refuses_code(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match="refuses to load global"):
        revisited.load_gnd(path)
    ok = tmp_path / "gnd_np.pkl"
    ok.write_bytes(
        pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": np.arange(3)}]})
    )
    assert revisited.load_gnd(ok)["gnd"][0]["easy"].tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        revisited.load_gnd(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="imlist"):
        revisited.load_gnd(bad)


def test_errors():
    with pytest.raises(ValueError, match="query columns"):
        revisited.compute_map(np.zeros((5, 3), int), [{"ok": [1]}])
    with pytest.raises(ValueError, match="no query has a positive"):
        revisited.compute_map(np.zeros((5, 1), int), [{"ok": []}])
    with pytest.raises(ValueError, match="lacks"):
        revisited.evaluate(np.zeros((5, 1), int), [{"ok": [1]}])
    with pytest.raises(ValueError, match="setting must be one of"):
        revisited.setting_gnd([{"easy": [], "hard": [], "junk": []}], "medium-hard")
    with pytest.raises(ValueError, match="integer"):
        revisited.compute_map(np.zeros((5, 1)), [{"ok": [1]}])
