"""DML losses: the pml factory and the pair losses on a precomputed similarity matrix S.

Each loss on S is checked against a slow loop over pairs / triplets (arbitrary, also
asymmetric S, per dtype), and against pytorch-metric-learning's own loss on z when
S = normalize(z) normalize(z)^T (values and gradients), also with the exact distances passed
as ``dist``; the gradient near S = 1 against float64; empty cases have their own tests.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity

from finegrain.losses.dml import (DML_LOSSES, PAIR_LOSSES, SimilarityMatrix,
                                  build_dml_loss, build_embedding_loss, build_similarity_loss,
                                  similarity_to_distance)

LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])


def _random_sim(n: int, dtype: torch.dtype, symmetric: bool = False) -> torch.Tensor:
    s = torch.rand(n, n, dtype=dtype) * 1.6 - 0.8  # cosines in [-0.8, 0.8]
    return (s + s.T) / 2 if symmetric else s


def _pairs(labels):
    n = len(labels)
    pos = [(a, b) for a in range(n) for b in range(n) if a != b and labels[a] == labels[b]]
    neg = [(a, b) for a in range(n) for b in range(n) if labels[a] != labels[b]]
    return pos, neg


def _triplets(labels):
    n = len(labels)
    return [(a, p, q) for a, p, q in itertools.product(range(n), repeat=3)
            if a != p and labels[a] == labels[p] and labels[a] != labels[q]]


def _mean_nonzero(values):
    nz = [v for v in values if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


def _dist(s):
    return math.sqrt(max(2.0 - 2.0 * s, 1e-12))


# -- slow references: plain loops over pairs, the papers' formulas -------------------------------
def ref_multi_similarity(S, labels, alpha=2.0, beta=50.0, base=0.5):
    """MS loss, Eq. (5) of Wang et al. 2019, mean over anchors."""
    S, n = S.tolist(), len(labels)
    total = 0.0
    for a in range(n):
        pos = [S[a][b] for b in range(n) if b != a and labels[a] == labels[b]]
        neg = [S[a][b] for b in range(n) if labels[a] != labels[b]]
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in neg)) / beta
    return total / n


def ref_contrastive(S, labels, pos_margin, neg_margin, euclidean):
    S = S.tolist()
    pos, neg = _pairs(labels.tolist())
    if euclidean:  # pull d to pos_margin, push beyond neg_margin
        lp = [max(_dist(S[a][b]) - pos_margin, 0) for a, b in pos]
        ln = [max(neg_margin - _dist(S[a][b]), 0) for a, b in neg]
    else:  # similarities: pull s above pos_margin, push below neg_margin
        lp = [max(pos_margin - S[a][b], 0) for a, b in pos]
        ln = [max(S[a][b] - neg_margin, 0) for a, b in neg]
    return _mean_nonzero(lp) + _mean_nonzero(ln)


def ref_triplet(S, labels, margin, euclidean):
    S = S.tolist()
    out = []
    for a, p, q in _triplets(labels.tolist()):
        if euclidean:
            out.append(max(_dist(S[a][p]) - _dist(S[a][q]) + margin, 0))
        else:
            out.append(max(S[a][q] - S[a][p] + margin, 0))
    return _mean_nonzero(out)


def ref_margin(S, labels, margin=0.2, beta=1.2):
    """Margin loss (Wu et al. 2017) over all triplets, divided by the non-zero terms."""
    S = S.tolist()
    total, count = 0.0, 0
    for a, p, q in _triplets(labels.tolist()):
        lp = max(_dist(S[a][p]) - beta + margin, 0)
        ln = max(beta - _dist(S[a][q]) + margin, 0)
        total += lp + ln
        count += (lp > 0) + (ln > 0)
    return total / count if count else 0.0


CASES = [
    ("multi_similarity", None, {}, lambda S, y: ref_multi_similarity(S, y)),
    ("multi_similarity", None, dict(alpha=3.0, beta=20.0, base=0.3),
     lambda S, y: ref_multi_similarity(S, y, 3.0, 20.0, 0.3)),
    ("contrastive", None, {}, lambda S, y: ref_contrastive(S, y, 0.0, 1.0, True)),
    ("contrastive", "cosine", dict(pos_margin=0.7, neg_margin=0.2),
     lambda S, y: ref_contrastive(S, y, 0.7, 0.2, False)),
    ("triplet", None, {}, lambda S, y: ref_triplet(S, y, 0.05, True)),
    ("triplet", "cosine", dict(margin=0.2), lambda S, y: ref_triplet(S, y, 0.2, False)),
    ("margin", None, {}, lambda S, y: ref_margin(S, y)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name,distance,kwargs,ref", CASES)
def test_loss_on_similarity_matches_loop_reference(name, distance, kwargs, ref, symmetric,
                                                   dtype):
    S = _random_sim(len(LABELS), dtype, symmetric)
    loss = build_similarity_loss(name, distance=distance, **kwargs)(S, LABELS)
    expected = ref(S, LABELS)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected, rel=1e-4 if dtype == torch.float32 else 1e-9,
                                        abs=1e-6)


@pytest.mark.parametrize("miner", [None, "multi_similarity"])
@pytest.mark.parametrize("distance", [None, "cosine"])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_loss_on_gram_matrix_equals_library_loss_on_embeddings(name, distance, miner):
    """S = z_n z_n^T through our distance == the pml loss (same defaults) on z: value + grad."""
    z = torch.randn(len(LABELS), 16, dtype=torch.float64, requires_grad=True)
    zn = F.normalize(z, dim=-1)
    ours = build_similarity_loss(name, distance=distance, miner=miner)(zn @ zn.T, LABELS)
    (g_ours,) = torch.autograd.grad(ours, z)
    lib = build_embedding_loss(name, distance=distance, miner=miner)(z, LABELS)
    (g_lib,) = torch.autograd.grad(lib, z)
    assert ours.item() > 0
    torch.testing.assert_close(ours, lib, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_ours, g_lib, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("miner", [None, "multi_similarity"])
@pytest.mark.parametrize("name", ["contrastive", "triplet", "margin"])
def test_exact_distances_passed_as_dist_equal_library_loss_on_embeddings(name, miner):
    """dist = ||z_a - z_b|| (normalised) is what LpDistance computes: value + grad equal."""
    z = torch.randn(len(LABELS), 16, dtype=torch.float64, requires_grad=True)
    zn = F.normalize(z, dim=-1)
    dist = (zn[:, None] - zn[None]).pow(2).sum(-1).clamp_min(1e-30).sqrt()
    loss = build_similarity_loss(name, miner=miner)
    assert loss.reads_distance
    ours = loss(zn @ zn.T, LABELS, dist=dist)
    (g_ours,) = torch.autograd.grad(ours, z)
    lib = build_embedding_loss(name, miner=miner)(z, LABELS)
    (g_lib,) = torch.autograd.grad(lib, z)
    assert ours.item() > 0
    torch.testing.assert_close(ours, lib, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_ours, g_lib, rtol=1e-5, atol=1e-8)


def test_cosine_losses_ignore_dist_and_shapes_are_checked():
    S = _random_sim(len(LABELS), torch.float64)
    ms = build_similarity_loss("multi_similarity")
    assert not ms.reads_distance
    assert ms(S, LABELS, dist=torch.rand_like(S)).item() == ms(S, LABELS).item()
    with pytest.raises(ValueError, match="dist must have the shape"):
        build_similarity_loss("contrastive")(S, LABELS, dist=torch.rand(3, 3))


def _close_pair(d: float, dtype: torch.dtype, n: int = 4, dim: int = 32) -> torch.Tensor:
    """n raw (un-normalised) vectors; rows 0 and 1 at chord distance d once normalised."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(n, dim, dtype=torch.float64, generator=g), dim=-1)
    t = torch.randn(dim, dtype=torch.float64, generator=g)
    t = F.normalize(t - (t @ v[0]) * v[0], dim=0)
    th = 2 * math.asin(d / 2)
    v[1] = math.cos(th) * v[0] + math.sin(th) * t
    scale = 1 + torch.rand(n, 1, dtype=torch.float64, generator=g)
    return (v * scale).to(dtype).requires_grad_(True)


def _contrastive_grad(d: float, dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """Gradient of the contrastive loss (positive pair 0-1 at distance d) w.r.t. raw vectors."""
    v = _close_pair(d, dtype)
    u = F.normalize(v, dim=-1)
    dist = (u[:, None] - u[None]).pow(2).sum(-1).clamp_min(1e-30).sqrt() if exact else None
    build_similarity_loss("contrastive")(u @ u.T, torch.tensor([0, 0, 1, 1]),
                                         dist=dist).backward()
    return v.grad.double()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def test_gradient_near_s_equal_1_against_float64():
    """fp32, d = 8e-4 (1 - S = 3.2e-7): the exact distances give the float64 gradient (the
    plain sqrt(2 - 2 S) was off by ~10 % here); from S alone the guard gives that pair no
    gradient (finite) and above the guard's floor (d = 3e-3) the gradient is within 1 %."""
    ref = _contrastive_grad(8e-4, torch.float64, exact=True)
    assert _rel_err(_contrastive_grad(8e-4, torch.float32, exact=True), ref) < 1e-4
    assert _rel_err(_contrastive_grad(8e-4, torch.float64, exact=False), ref) < 1e-6
    unguarded = _close_pair(8e-4, torch.float32)
    u = F.normalize(unguarded, dim=-1)
    (2 - 2 * (u[0] @ u[1])).clamp_min(1e-12).sqrt().backward()  # the old form, one pair
    v64 = _close_pair(8e-4, torch.float64)
    u64 = F.normalize(v64, dim=-1)
    (u64[0] - u64[1]).norm().backward()
    assert _rel_err(unguarded.grad.double()[:2], v64.grad[:2]) > 0.05  # why dist exists

    S = (u @ u.T).detach().requires_grad_(True)  # fp32, S[0, 1] within rounding of 1
    build_similarity_loss("contrastive")(S, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(S.grad).all() and S.grad[0, 1] == 0 and S.grad[2, 3] != 0
    above = _contrastive_grad(3e-3, torch.float32, exact=False)
    assert _rel_err(above, _contrastive_grad(3e-3, torch.float64, exact=True)) < 1e-2
    floor = similarity_to_distance(torch.ones(1))
    assert 1e-3 < floor.item() < 2e-3  # fp32 floor: d = sqrt(16 eps) = 1.4e-3


def test_library_defaults_are_what_the_gram_test_compares_with():
    """build_dml_loss(name) is exactly the pml class with its defaults (no hidden changes)."""
    z = torch.randn(len(LABELS), 16)
    direct = {"multi_similarity": pml_losses.MultiSimilarityLoss(),
              "contrastive": pml_losses.ContrastiveLoss(),
              "triplet": pml_losses.TripletMarginLoss(),
              "margin": pml_losses.MarginLoss()}
    for name, lib in direct.items():
        torch.testing.assert_close(build_dml_loss(name)(z, LABELS), lib(z, LABELS))
    cos = pml_losses.ContrastiveLoss(pos_margin=1, neg_margin=0, distance=CosineSimilarity())
    torch.testing.assert_close(
        build_dml_loss("contrastive", distance="cosine", pos_margin=1, neg_margin=0)(z, LABELS),
        cos(z, LABELS))


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_empty_batch_of_one_is_zero_and_differentiable(name):
    S = torch.ones(1, 1, requires_grad=True)
    loss = build_similarity_loss(name)(S, torch.tensor([3]))
    assert loss.item() == 0.0
    loss.backward()
    assert S.grad is not None and torch.all(S.grad == 0)


@pytest.mark.parametrize("name", ["triplet", "margin"])
def test_no_positive_pair_gives_zero_triplet_losses(name):
    S = _random_sim(5, torch.float32).requires_grad_(True)
    loss = build_similarity_loss(name)(S, torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()


def test_multi_similarity_without_positives_keeps_the_negative_term():
    S = _random_sim(5, torch.float64)
    y = torch.arange(5)
    loss = build_similarity_loss("multi_similarity")(S, y)
    assert loss.item() == pytest.approx(ref_multi_similarity(S, y), rel=1e-9)
    assert loss.item() > 0


def test_shapes_are_checked_first():
    loss = build_similarity_loss("multi_similarity")
    with pytest.raises(ValueError, match="batch_size, batch_size"):
        loss(torch.rand(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.rand(4, 4), torch.arange(3))
    with pytest.raises(ValueError, match="embedding_size"):
        build_embedding_loss("multi_similarity")(torch.rand(4), torch.arange(4))


def test_similarity_matrix_distance_returns_a_copy_and_refuses_two_inputs():
    S = torch.rand(3, 3)
    out = SimilarityMatrix()(S)
    assert torch.equal(out, S) and out.data_ptr() != S.data_ptr()
    torch.testing.assert_close(SimilarityMatrix(as_distance=True)(S),
                               similarity_to_distance(S))
    assert torch.equal(SimilarityMatrix(as_distance=True, precomputed=True)(S), S)
    with pytest.raises(ValueError, match="square"):
        SimilarityMatrix()(S, torch.rand(3, 3))


def test_half_precision_similarities_are_computed_in_fp32():
    S = _random_sim(len(LABELS), torch.float32)
    loss = build_similarity_loss("multi_similarity")(S.bfloat16(), LABELS)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", DML_LOSSES)
def test_factory_builds_every_loss_on_embeddings(name):
    z = torch.randn(len(LABELS), 8, requires_grad=True)
    loss = build_embedding_loss(name, embedding_dim=8, num_classes=4)
    value = loss(z, LABELS)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert z.grad.abs().sum() > 0


def test_proxy_losses_need_classes_and_have_no_form_on_similarities():
    with pytest.raises(ValueError, match="num_classes"):
        build_dml_loss("proxy_anchor", embedding_dim=8)
    with pytest.raises(ValueError, match="not pair-based"):
        build_similarity_loss("arcface")
    with pytest.raises(ValueError, match="miner"):
        build_embedding_loss("proxy_anchor", 8, 4, miner="multi_similarity")
    torch.manual_seed(1)
    ours = build_dml_loss("proxy_anchor", embedding_dim=8, num_classes=4, margin=0.2)
    torch.manual_seed(1)
    lib = pml_losses.ProxyAnchorLoss(num_classes=4, embedding_size=8, margin=0.2)
    z = torch.randn(len(LABELS), 8)
    torch.testing.assert_close(ours(z, LABELS), lib(z, LABELS))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="multi_similarity"):
        build_dml_loss("npair")
    with pytest.raises(ValueError, match="cosine"):
        build_similarity_loss("triplet", distance="manhattan")
