"""alpha-QE against the formula with explicit loops; the re-ranking wrapper against re_rank."""

import numpy as np
import pytest

from finegrain.evaluation.reid import re_rank
from finegrain.retrieval.postprocess import (alpha_query_expansion, aqe_search,
                                             k_reciprocal_rerank, rerank_shortlist)
from finegrain.retrieval.search import knn


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_alpha_qe_matches_loop():
    q, nb = _unit(3, 6, 0), _unit(12, 6, 1).reshape(3, 4, 6)
    got = alpha_query_expansion(q, nb, n=3, alpha=3.0)
    for i in range(3):
        acc = q[i].astype(np.float64).copy()
        for j in range(3):
            s = float(q[i] @ nb[i, j])
            acc += (max(s, 0.0) ** 3) * nb[i, j]  # negative similarity: weight 0
        np.testing.assert_allclose(got[i], acc / np.linalg.norm(acc), atol=1e-6)
    np.testing.assert_array_equal(alpha_query_expansion(q, nb, n=0), q)


def test_aqe_search_pulls_in_the_neighbourhood():
    """A cluster of close views: the query's own cluster gains at the expense of a neighbour
    that is only close to the query itself."""
    db = _unit(200, 16, 2)
    q = db[:1] + 0.05 * _unit(1, 16, 3)
    q /= np.linalg.norm(q)
    _, ids = aqe_search(q, lambda i: db[i], lambda x, k: knn(x, db, k), k=5, n=1, alpha=3.0)
    expanded = alpha_query_expansion(q, db[ids[:, :1]], n=1)
    np.testing.assert_array_equal(ids, knn(expanded, db, 5)[1])
    assert ids[0, 0] == 0


def test_k_reciprocal_wrapper_equals_re_rank_on_euclidean_distances():
    q, g = _unit(4, 8, 0), _unit(30, 8, 1)
    got = k_reciprocal_rerank(q, g, k1=5, k2=3, lambda_value=0.3)
    d = lambda a, b: np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))  # noqa: E731
    ref = re_rank(d(q, g), d(q, q), d(g, g), k1=5, k2=3, lambda_value=0.3)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_rerank_shortlist_sorts_each_shortlist_by_reranked_distance():
    q, db = _unit(3, 8, 0), _unit(60, 8, 1)
    _, ids = knn(q, db, 10)
    new_ids, dist = rerank_shortlist(q, ids, lambda i: db[i], k1=4, k2=2)
    for i in range(3):
        assert sorted(new_ids[i]) == sorted(ids[i])  # same shortlist, new order
        assert np.all(np.diff(dist[i]) >= 0)
    for i in range(3):  # each query on the graph of itself and its own shortlist
        own = k_reciprocal_rerank(q[i:i + 1], db[ids[i]], k1=4, k2=2)[0]
        col = [list(ids[i]).index(j) for j in new_ids[i]]
        np.testing.assert_allclose(dist[i], own[col], atol=1e-6)


def test_rerank_is_per_query_batch_and_independent_of_the_batch_size():
    """Results independent of the batch (sizes 1, 3, all), memory bounded by it
    (one get_vectors call per batch, at most batch x K vectors), -1 padding last."""
    q, db = _unit(7, 8, 0), _unit(80, 8, 1)
    _, ids = knn(q, db, 12)
    ids[2, -3:] = -1  # an approximate index may return fewer results
    runs = {}
    for bs in (1, 3, 7):
        calls = []

        def get(i):
            calls.append(len(i))
            return db[i]

        runs[bs] = rerank_shortlist(q, ids, get, k1=4, k2=2, batch_size=bs)
        assert len(calls) == -(-7 // bs) and max(calls) <= bs * 12
    for bs in (3, 7):
        np.testing.assert_array_equal(runs[bs][0], runs[1][0])
        np.testing.assert_array_equal(runs[bs][1], runs[1][1])
    assert list(runs[1][0][2, -3:]) == [-1] * 3 and np.isinf(runs[1][1][2, -3:]).all()
    alone, _ = rerank_shortlist(q[4:5], ids[4:5], lambda i: db[i], k1=4, k2=2)
    np.testing.assert_array_equal(alone[0], runs[7][0][4])  # other queries change nothing


def test_bad_neighbour_shape():
    with pytest.raises(ValueError, match="neighbours must be"):
        alpha_query_expansion(_unit(2, 4, 0), _unit(6, 3, 1).reshape(2, 3, 3), n=2)
