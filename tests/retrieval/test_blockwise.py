"""+1M evaluation scored in blocks against memory-mapped files (bounded memory) gives
exactly what the all-in-memory complete ranking gives."""

import numpy as np
import pytest

from finegrain.errors import InputError
from finegrain.evaluation import revisited
from finegrain.retrieval.pipeline import PostprocessOptions, rank_database, rank_positions
from finegrain.retrieval.search import blockwise_knn, knn


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data(tmp_path, shared_data):
    """Real ROxford5k gnd, clustered random descriptors, 1,500 memory-mapped distractors."""
    cfg = revisited.load_gnd(shared_data / "revisitop" / "gnd_roxford5k.pkl")
    rng = np.random.default_rng(0)
    n_db, gnd = len(cfg["imlist"]), cfg["gnd"]
    centres = rng.standard_normal((11, 24))
    gallery = _unit(centres[np.arange(n_db) % 11] + rng.standard_normal((n_db, 24)))
    queries = _unit(centres[np.arange(70) % 11] + 0.5 * rng.standard_normal((70, 24)))
    np.save(tmp_path / "dis.npy", _unit(rng.standard_normal((1500, 24))))
    distractors = np.load(tmp_path / "dis.npy", mmap_mode="r")
    return queries, gallery, distractors, gnd


def test_blockwise_knn_matches_exact_search_and_counts_positions():
    rng = np.random.default_rng(1)
    db = _unit(rng.standard_normal((300, 16)))
    db[100] = db[200] = db[7]  # exact ties, ordered by row
    q = _unit(rng.standard_normal((4, 16)))
    q[0] = db[7]
    scores = q.astype(np.float64) @ db.astype(np.float64).T
    full = np.array([np.lexsort((np.arange(300), -s)) for s in scores])
    where = np.argsort(full, axis=1)  # position of every row in each query's ranking
    targets = [np.array([7, 200, 5, 299]), rng.choice(300, 40, replace=False),
               np.array([100]), np.empty(0, np.int64)]
    for block in (5, 64, 300):
        s, ids, pos = blockwise_knn(q, [db[:77], db[77:]], 20, targets, block_size=block)
        np.testing.assert_array_equal(ids, full[:, :20])
        for i, t in enumerate(targets):
            np.testing.assert_array_equal(pos[i], where[i, t])
    ref_s, ref_ids = knn(q[1:], db, 20)  # faiss, float32: same neighbours
    np.testing.assert_array_equal(ids[1:], ref_ids)
    np.testing.assert_allclose(s[1:], ref_s, atol=1e-5)
    bad = db.copy()
    bad[123, 3] = np.nan
    with pytest.raises(InputError, match="row 123"):
        blockwise_knn(q, [bad], 5, block_size=50)


@pytest.mark.parametrize("kw", [{}, {"aqe": True, "aqe_n": 3},
                                {"rerank": True, "rerank_k": 30},
                                {"aqe": True, "aqe_n": 3, "rerank": True, "rerank_k": 30}])
def test_blockwise_positions_equal_the_in_memory_ranking(data, kw):
    """Tiny blocks over [gallery, memory-mapped distractors] vs one in-memory array."""
    queries, gallery, distractors, gnd = data
    whole = np.concatenate([gallery, np.asarray(distractors)])
    post = PostprocessOptions(**kw)
    ranks = rank_database(queries, whole, post, block_size=1 << 20)  # one block, all rows
    labelled = [np.unique(np.concatenate([g["easy"], g["hard"], g["junk"]]).astype(np.int64))
                for g in gnd]
    top, pos = rank_positions(queries, [gallery, distractors], labelled, k=50, post=post,
                              block_size=97)
    np.testing.assert_array_equal(top, ranks[:50].T)
    where = np.argsort(ranks, axis=0)
    for i, t in enumerate(labelled):
        np.testing.assert_array_equal(pos[i], where[t, i])
    ranked = list(zip(labelled, pos))
    assert revisited.evaluate_positions(ranked, gnd) == revisited.evaluate(ranks, gnd)
    ref = revisited.compute_map(ranks, revisited.setting_gnd(gnd, "hard"))[1]
    np.testing.assert_array_equal(revisited.query_aps(ranked, gnd, "hard"), ref)


def test_evaluate_positions_of_a_truncated_list(shared_data):
    """Labelled images left out of ``positions`` count as not retrieved, as below a cut."""
    cfg = revisited.load_gnd(shared_data / "revisitop" / "gnd_rparis6k.pkl")
    rng = np.random.default_rng(2)
    ranks = np.argsort(-rng.random((len(cfg["imlist"]), 70)), axis=0)
    top = ranks[:500]
    where = np.argsort(ranks, axis=0)
    ranked = []
    for i, g in enumerate(cfg["gnd"]):
        t = np.unique(np.concatenate([g["easy"], g["hard"], g["junk"]]).astype(np.int64))
        p = where[t, i]
        ranked.append((t[p < 500], p[p < 500]))
    assert revisited.evaluate_positions(ranked, cfg) == revisited.evaluate(top, cfg)
