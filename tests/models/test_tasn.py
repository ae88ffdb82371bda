"""TASN: trilinear attention, the attention sampler and the model, against slow references."""

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import InputError
from finegrain.models import create_model, list_models
from finegrain.models.tasn import (TASN, AttentionNet, attention_grid, attention_sample,
                                   detail_map, distinct_maps_mask, inverse_cdf, max_marginals,
                                   structure_map, trilinear_attention, zoom_bounded_densities,
                                   zoom_bounded_density)

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)


def tiny_tasn(name: str = "tasn_resnet18", **kw) -> TASN:
    kw = {"num_classes": 5, "sample_size": 32, "attention_size": 32, "backbone_kwargs": TINY,
          "attention_backbone_kwargs": TINY, **kw}
    return create_model(name, **kw)


# ---------------------------------------------------------------------------------------------
# Trilinear attention and the two maps
# ---------------------------------------------------------------------------------------------

def test_trilinear_attention_matches_loop_formula():
    B, c, h, w = 2, 4, 2, 3
    x = torch.randn(B, c, h, w).relu() + 0.1 * torch.randn(B, c, h, w)
    scale = 7.0
    got = trilinear_attention(x, scale)
    X = x.double().reshape(B, c, h * w)
    for b in range(B):
        n1 = [[math.exp(scale * X[b, i, p]) for p in range(h * w)] for i in range(c)]
        n1 = [[v / sum(row) for v in row] for row in n1]  # softmax over positions
        bil = [[sum(n1[i][p] * float(X[b, j, p]) for p in range(h * w)) for j in range(c)]
               for i in range(c)]  # N1(X) X^T
        n2 = [[math.exp(v) for v in row] for row in bil]
        n2 = [[v / sum(row) for v in row] for row in n2]  # softmax over channels of each row
        for i in range(c):
            for p in range(h * w):
                ref = sum(n2[i][j] * float(X[b, j, p]) for j in range(c))  # un-normalised X
                assert float(got[b, i].reshape(-1)[p]) == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_trilinear_scale_matters_and_output_is_fp32():
    x = torch.randn(1, 3, 2, 2).bfloat16()
    a, b = trilinear_attention(x, 7.0), trilinear_attention(x, 1.0)
    assert a.dtype == torch.float32 and not torch.allclose(a, b)


def test_distinct_maps_counted_once_in_detail_and_structure_averages_all():
    maps = torch.rand(2, 5, 3, 3)
    maps[0, 1] = maps[0, 0]  # channels 0, 1, 3 identical in image 0
    maps[0, 3] = maps[0, 0]
    mask = distinct_maps_mask(maps)
    assert mask[1].all()
    assert mask[0].tolist().count(True) == 3 and mask[0, 2] and mask[0, 4]
    assert int(mask[0, [0, 1, 3]].sum()) == 1
    s = structure_map(maps)  # the paper's average of all c maps, duplicates included
    for b in range(2):
        torch.testing.assert_close(s[b], sum(maps[b, k] for k in range(5)) / 5)

    gen = torch.Generator().manual_seed(0)
    picks = set()
    for _ in range(60):
        d = detail_map(maps, generator=gen)  # (B, h, w)
        idx = [int(k) for k in range(5) if torch.equal(d[0], maps[0, k])]
        picks.add(min(idx))
    assert picks == {0, 2, 4}  # duplicates drawn as one group, never more often


def test_distinct_maps_mask_uses_exact_equality_without_chaining():
    """Official ``detail_att``: a new group wherever a sorted sum != its predecessor."""
    maps = torch.rand(1, 6, 4, 4) + 0.5
    base = maps[0, 0].clone()
    tol = 1e-5 * float(base.sum())  # the old neighbour-chaining tolerance (rtol 1e-5)
    maps[0, 1] = base
    maps[0, 1, 0, 0] += 0.6 * tol  # a ~ b: close, but a different map
    maps[0, 2] = base
    maps[0, 2, 0, 0] += 1.2 * tol  # b ~ c, yet c is not close to a
    maps[0, 3] = base  # an exact duplicate of a
    sums = maps.sum((2, 3))[0]
    assert len({float(sums[k]) for k in range(3)}) == 3  # a, b, c really differ in fp32
    mask = distinct_maps_mask(maps)[0]
    assert mask[1] and mask[2]  # close but different: distinct, and a ~ b ~ c did not merge a, c
    assert int(mask[[0, 3]].sum()) == 1  # exact duplicates: one group
    assert mask.tolist().count(True) == 5


def test_structure_map_is_continuous_in_the_maps():
    """3e-6 on one element of one of three duplicate maps moves the structure map by 3e-6 / 6
    there and nowhere else: no group count that flips when a tie breaks (the cause of the
    batch-size dependence of an earlier demo checkpoint, whose near-duplicate maps tied or
    not with the float order)."""
    maps = torch.rand(1, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    maps[0, 1] = maps[0, 3] = maps[0, 0]
    nudged = maps.clone()
    nudged[0, 3, 0, 0] += 3e-6
    assert distinct_maps_mask(maps).sum() == 4 and distinct_maps_mask(nudged).sum() == 5
    change = structure_map(nudged) - structure_map(maps)
    assert abs(change[0, 0, 0] - 5e-7) < 2e-7 and change.flatten()[1:].abs().max() < 1e-7


def test_all_zero_feature_channels_give_one_group():
    """Exact equality is enough in practice: the maps of all-zero channels are bit-identical
    (same N1 row, same products), also at the official c = 512, 28 x 28."""
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(2, 512, 28, 28, generator=gen)
    features[:, 1::3] = 0  # 170 all-zero channels
    maps = trilinear_attention(features)
    zero = maps[:, 1::3]
    assert torch.equal(zero, zero[:, :1].expand_as(zero))
    mask = distinct_maps_mask(maps)
    assert (mask[:, 1::3].sum(1) == 1).all()


def test_detail_map_is_one_random_channel_per_image():
    maps = torch.rand(3, 6, 2, 2)
    gen = torch.Generator().manual_seed(1)
    seen = [set() for _ in range(3)]
    for _ in range(80):
        d = detail_map(maps, distinct=False, generator=gen)
        for b in range(3):
            match = [k for k in range(6) if torch.equal(d[b], maps[b, k])]
            assert len(match) == 1
            seen[b].add(match[0])
    assert all(s == set(range(6)) for s in seen)


def test_attention_net_is_stride_8_with_512_channels():
    net = AttentionNet("resnet18", num_classes=3)
    feats, logits = net(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 512, 8, 8) and logits.shape == (1, 3)
    assert (feats >= 0).all()  # sums of ReLUs


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------

def _ref_density(profile: list[float], m: int, max_zoom: float, iterations: int) -> list[float]:
    n = len(profile)
    total = sum(profile)
    d = [v / total * m for v in profile]
    cap = max_zoom * m / n
    for _ in range(iterations):
        d = [min(v, cap) for v in d]
        spread = (m - sum(d)) / n
        d = [v + spread for v in d]
    return d


def _ref_densities_coupled(profiles: list[list[float]], ms: list[int], max_zoom: float,
                           iterations: int) -> list[list[float]]:
    """Official coupled clipping in zoom units (z = d n / m): one threshold for every axis,
    min(max_zoom, max z_a) on the first pass, min_a max z_a afterwards."""
    zs = [[v / sum(p) * len(p) for v in p] for p in profiles]
    for j in range(iterations):
        t = min(max(z) for z in zs)
        if j == 0:
            t = min(t, max_zoom)
        zs = [[min(v, t) for v in z] for z in zs]
        zs = [[v + (len(z) - sum(z)) / len(z) for v in z] for z in zs]
    return [[v * m / len(z) for v in z] for z, m in zip(zs, ms)]


def _ref_coords(d: list[float], m: int) -> list[float]:
    """Input coordinate (pixel k covers [k, k+1)) of each output pixel centre, by walking bins."""
    out, k, cum = [], 0, 0.0
    for i in range(m):
        u = i + 0.5
        while k < len(d) - 1 and cum + d[k] <= u:
            cum += d[k]
            k += 1
        out.append(k + min(max((u - cum) / d[k], 0.0), 1.0))
    return out


def test_max_marginals_are_row_and_column_maxima():
    att = torch.rand(2, 3, 4)
    columns, rows = max_marginals(att)
    assert columns.shape == (2, 4) and rows.shape == (2, 3)
    for b in range(2):
        for c in range(4):
            assert columns[b, c] == max(att[b, r, c] for r in range(3))
        for r in range(3):
            assert rows[b, r] == max(att[b, r, c] for c in range(4))


@pytest.mark.parametrize("max_zoom,iterations", [(4.0, 5), (2.0, 3), (100.0, 0)])
def test_density_matches_loop_reference(max_zoom, iterations):
    prof = torch.rand(3, 17) ** 4 + 1e-3
    got = zoom_bounded_density(prof, 9, max_zoom, iterations)
    for b in range(3):
        ref = _ref_density(prof[b].tolist(), 9, max_zoom, iterations)
        torch.testing.assert_close(got[b], torch.tensor(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.full((3,), 9.0))


def test_density_zero_profile_is_uniform_and_cap_validated():
    torch.testing.assert_close(zoom_bounded_density(torch.zeros(1, 8), 4), torch.full((1, 8), 0.5))
    with pytest.raises(ValueError, match="max_zoom"):
        zoom_bounded_density(torch.ones(1, 8), 4, max_zoom=0.5)
    with pytest.raises(ValueError, match="clip"):
        attention_sample(torch.rand(1, 1, 8, 8), torch.rand(1, 8, 8), 4, clip="both")
    with pytest.raises(ValueError, match="clip"):
        tiny_tasn(clip="per-axis")


@pytest.mark.parametrize("max_zoom,iterations", [(4.0, 5), (2.0, 3), (100.0, 0)])
def test_coupled_densities_match_loop_reference_non_square(max_zoom, iterations):
    cols, rows = torch.rand(2, 17) ** 6 + 1e-3, torch.rand(2, 11) ** 2 + 1e-3
    dx, dy = zoom_bounded_densities([cols, rows], [9, 5], max_zoom, iterations)
    for b in range(2):
        rx, ry = _ref_densities_coupled([cols[b].tolist(), rows[b].tolist()], [9, 5], max_zoom,
                                        iterations)
        torch.testing.assert_close(dx[b], torch.tensor(rx), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dy[b], torch.tensor(ry), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.sum(-1), torch.full((2,), 9.0))
    torch.testing.assert_close(dy.sum(-1), torch.full((2,), 5.0))


@pytest.mark.parametrize("clip", ["coupled", "per_axis"])
def test_sampled_ramp_lands_where_index_math_says(clip):
    """A ramp image (value = pixel index) sampled with bilinear interpolation returns the
    sampled coordinate itself: checks inverse CDF, pixel centres and align_corners at once."""
    B, H, W, out_h, out_w = 2, 20, 24, 11, 13
    att = torch.rand(B, H, W) ** 3
    cols = torch.arange(W, dtype=torch.float32).expand(B, 1, H, W)
    rows = torch.arange(H, dtype=torch.float32)[:, None].expand(B, 1, H, W)
    for max_zoom, iters in [(4.0, 5), (1e3, 0)]:
        out = attention_sample(torch.cat([cols, rows], 1), att, (out_h, out_w), max_zoom, iters,
                               clip)
        for b in range(B):
            a = att[b].tolist()
            col_prof = [max(a[r][c] for r in range(H)) for c in range(W)]  # max over rows
            row_prof = [max(a[r]) for r in range(H)]  # max over columns
            if clip == "coupled":
                dx, dy = _ref_densities_coupled([col_prof, row_prof], [out_w, out_h], max_zoom,
                                                iters)
            else:
                dx = _ref_density(col_prof, out_w, max_zoom, iters)
                dy = _ref_density(row_prof, out_h, max_zoom, iters)
            xs, ys = _ref_coords(dx, out_w), _ref_coords(dy, out_h)
            # pixel index of a continuous coordinate x is x - 0.5, clamped at the border
            ex = torch.tensor([min(max(x - 0.5, 0.0), W - 1) for x in xs])
            ey = torch.tensor([min(max(y - 0.5, 0.0), H - 1) for y in ys])
            torch.testing.assert_close(out[b, 0], ex.expand(out_h, out_w), atol=2e-4, rtol=0)
            torch.testing.assert_close(out[b, 1], ey[:, None].expand(out_h, out_w),
                                       atol=2e-4, rtol=0)


def test_inverse_cdf_matches_reference_with_empty_bins():
    d = torch.tensor([[0.0, 2.0, 0.0, 0.0, 3.0, 1.0, 0.0]])  # sums to 6, zero-width bins
    got = inverse_cdf(d, 6)
    ref = [2 * x / 7 - 1 for x in _ref_coords(d[0].tolist(), 6)]
    torch.testing.assert_close(got[0], torch.tensor(ref))
    assert (got[0, 1:] > got[0, :-1]).all()


@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (24, 24)), ((40, 56), (24, 20)),
                                         ((16, 16), (40, 40)), ((9, 12), (9, 12))])
def test_uniform_map_equals_plain_bilinear_resize(in_hw, out_hw):
    images = torch.rand(2, 3, *in_hw)
    att = torch.ones(2, 7, 7)
    got = attention_sample(images, att, out_hw)
    ref = F.interpolate(images, size=out_hw, mode="bilinear", align_corners=False,
                        antialias=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_single_bright_pixel_stays_put_at_identity_size():
    images = torch.zeros(1, 1, 9, 11)
    images[0, 0, 4, 7] = 1.0
    out = attention_sample(images, torch.ones(1, 3, 3), (9, 11))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def _peaked_map(H: int = 64, W: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    return torch.exp(-((xx - 40) ** 2 + (yy - 20) ** 2) / 8.0)[None]  # (1, H, W), peak (20, 40)


def _magnification(g: torch.Tensor, m: int) -> torch.Tensor:
    """Local zoom of a 1-D grid relative to the uniform resize (its step is 2 / m)."""
    return (2.0 / m) / (g[1:] - g[:-1])


def test_peaked_map_magnifies_its_region_bounded_by_the_cap():
    att, n, m = _peaked_map(), 64, 32
    for max_zoom in (2.0, 4.0):
        grid = attention_grid(att, (n, n), (m, m), max_zoom, 5, clip="per_axis")
        gx, gy = grid[0, 0, :, 0], grid[0, :, 0, 1]
        for g, centre in ((gx, 40.5), (gy, 20.5)):
            magnification = _magnification(g, m)
            assert magnification.max() <= max_zoom * 1.01
            assert magnification.max() >= max_zoom * 0.95  # the cap is reached
            zoomed = (g[1:][magnification >= 0.95 * max_zoom] + 1) * n / 2  # pixel coords
            assert zoomed.min() - 1 < centre < zoomed.max() + 1  # the peak is magnified
            assert zoomed.max() - zoomed.min() < n / 2  # ... and not everything else
        # coupled (official): the first pass clips at the cap, later passes only at
        # min(max_x, max_y), so the peak ends above the cap by the spread mass, equal on x, y
        grid = attention_grid(att, (n, n), (m, m), max_zoom, 5, clip="coupled")
        zx = float(_magnification(grid[0, 0, :, 0], m).max())
        zy = float(_magnification(grid[0, :, 0, 1], m).max())
        assert max_zoom * 0.99 < zx < max_zoom * 1.5 and zy == pytest.approx(zx, rel=0.02)
    # without clipping the same map is magnified far beyond the cap (the test above can fail)
    grid = attention_grid(att, (n, n), (m, m), max_zoom=4.0, iterations=0)
    assert _magnification(grid[0, 0, :, 0], m).max() > 8.0


def test_grid_is_monotone_separable_and_in_range():
    att = torch.rand(3, 5, 6) ** 4
    grid = attention_grid(att, (30, 40), (12, 15))
    assert grid.shape == (3, 12, 15, 2)
    gx, gy = grid[..., 0], grid[..., 1]
    assert (gx[:, :, 1:] > gx[:, :, :-1]).all() and (gy[:, 1:, :] > gy[:, :-1, :]).all()
    assert torch.equal(gx, gx[:, :1].expand_as(gx)) and torch.equal(gy, gy[:, :, :1].expand_as(gy))
    assert gx.abs().max() < 1 and gy.abs().max() < 1


def test_sampler_gradients_reach_the_image_not_the_map():
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    att = torch.rand(2, 4, 4, requires_grad=True)
    attention_sample(images, att, 8).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert att.grad is None
    img64 = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attention_sample(x, a, (4, 5)), (img64,))


def test_sampler_is_vectorised_per_image():
    images, att = torch.rand(3, 3, 20, 20), torch.rand(3, 5, 5) ** 3
    batched = attention_sample(images, att, 10)
    single = torch.cat([attention_sample(images[i:i + 1], att[i:i + 1], 10) for i in range(3)])
    torch.testing.assert_close(batched, single)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_images_are_sampled_in_fp32(dtype, atol):
    """A half-precision grid cannot address a 256-pixel axis (it gave NaN on CPU): the grid
    and the interpolation stay fp32, the result comes back in the image dtype."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 256, 320, generator=gen)
    att = torch.rand(2, 28, 28, generator=gen) ** 4
    ref = attention_sample(images, att, 224)
    half = images.to(dtype)
    got = attention_sample(half, att, 224)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, attention_sample(half.float(), att, 224).to(dtype),
                               atol=0, rtol=0)  # exactly the fp32 computation, rounded
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=0)
    leaf = half.clone().requires_grad_()
    attention_sample(leaf, att, 224).float().sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.abs().sum() > 0


def test_changing_the_attention_map_changes_the_sampled_image():
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    left, right = _peaked_map(), _peaked_map().flip(-1)  # peak at column 40 vs 23
    a = attention_sample(images, left, 32)
    torch.testing.assert_close(attention_sample(images, left.clone(), 32), a)  # same map
    b = attention_sample(images, right, 32)
    assert float((a - b).abs().mean()) > 0.1  # pixels of [0, 1] images
    # the magnified region moves with the peak: a column ramp shows which columns are read
    ramp = torch.arange(64, dtype=torch.float32).expand(1, 1, 64, 64)
    cols_a = attention_sample(ramp, left, 32)[0, 0, 0]
    cols_b = attention_sample(ramp, right, 32)[0, 0, 0]
    dense_a = cols_a[1:][(cols_a[1:] - cols_a[:-1]) < 1.0]  # input columns zoomed in
    dense_b = cols_b[1:][(cols_b[1:] - cols_b[:-1]) < 1.0]
    assert 30 < float(dense_a.mean()) < 50 and 13 < float(dense_b.mean()) < 33


def test_sampler_rejects_bad_shapes():
    with pytest.raises(ValueError, match="attention"):
        attention_sample(torch.rand(2, 3, 8, 8), torch.rand(3, 4, 4), 4)


# ---------------------------------------------------------------------------------------------
# The sampler against a slow port of the official op
# ---------------------------------------------------------------------------------------------
# researchmm/tasn @ 5dba8cc: tasn-mxnet/example/tasn/model.py (``att_sample``: max-marginals,
# normalised to sum 1) and tasn-mxnet/src/operator/contrib/att_sampler-inl.h
# (``AttSamplerOp::Forward``: clipping and index computation; the .cu file only samples with
# the grid, bilinear in align_corners=True units, zeros outside). Ported line by line, loops.

def _official_marginals(att: torch.Tensor) -> tuple[list[float], list[float]]:
    """``map_sx = max(att, axis=2)`` (each row's max: a profile over y) and ``map_sy =
    max(att, axis=1)`` (over x), each divided by its sum. ``att``: (H, W), H == W."""
    a = att.double().tolist()
    n = len(a)
    map_sx = [max(a[r][c] for c in range(n)) for r in range(n)]
    map_sy = [max(a[r][c] for r in range(n)) for c in range(n)]
    sx, sy = sum(map_sx), sum(map_sy)
    return [v / sx for v in map_sx], [v / sy for v in map_sy]


def _official_att_sampler(attx: list[float], atty: list[float], out_size: int,
                          dense: float = 4.0, iters: int = 5) -> dict:
    """``AttSamplerOp::Forward`` for one image (``att_size == in_size``, as in the official
    512 -> 224 use; ``scale = out_size / in_size``). ``attx`` feeds the grid's y channel and
    ``atty`` its x channel (``index_y`` is computed from ``mapxi``). Returns the clipped
    densities, the cumulative sums, their steps and the indices (align_corners=True units)."""
    att_size = len(attx)
    in_size = att_size
    scale = out_size / in_size
    mapx = [v * out_size for v in attx]
    mapy = [v * out_size for v in atty]
    threshold = scale * dense * in_size / att_size
    for j in range(iters):
        map_maxx = 0.0
        map_maxy = 0.0
        for i in range(att_size):
            map_maxx = map_maxx if map_maxx > mapx[i] else mapx[i]
            map_maxy = map_maxy if map_maxy > mapy[i] else mapy[i]
        map_maxx = map_maxy if map_maxx > map_maxy else map_maxx  # ONE threshold for both
        threshold_in_use = map_maxx
        if j == 0:
            threshold_in_use = map_maxx if threshold > map_maxx else threshold
        for i in range(att_size):
            mapx[i] = threshold_in_use if mapx[i] > threshold_in_use else mapx[i]
            mapy[i] = threshold_in_use if mapy[i] > threshold_in_use else mapy[i]
        sumx, sumy = sum(mapx), sum(mapy)  # linalg_gemm with a ones vector
        deltax = (out_size - sumx) / att_size
        deltay = (out_size - sumy) / att_size
        for i in range(att_size):
            mapx[i] += deltax
            mapy[i] += deltay
    # cumulative sums: the buffers are created filled with 1 and element 0 is never written
    mapxi = [1.0] * att_size
    mapyi = [1.0] * att_size
    for i in range(att_size - 1):
        mapxi[i + 1] = mapxi[i] + mapx[i + 1]
        mapyi[i + 1] = mapyi[i] + mapy[i + 1]
    stepx = mapxi[att_size - 1] / out_size
    stepy = mapyi[att_size - 1] / out_size
    myscale = 2.0 / (att_size - 1)
    index_y, index_x = [0.0] * out_size, [0.0] * out_size
    for cum, step, index in ((mapxi, stepx, index_y), (mapyi, stepy, index_x)):
        i = j = 0
        while i < out_size:
            if cum[j] >= i * step:
                # i = 0 meets j = 0 and reads cum[-1]: out of bounds in the op (the previous
                # image's total for b > 0, undefined for b = 0); a total puts x_0 at ~0
                prev = cum[j - 1] if j > 0 else cum[att_size - 1]
                index[i] = (j + (i * step - cum[j]) / (cum[j] - prev)) * myscale - 1.0
                i += 1
            else:
                j += 1
    return {"density_x": mapy, "density_y": mapx, "cum_x": mapyi, "cum_y": mapxi,
            "step_x": stepy, "step_y": stepx, "index_x": index_x, "index_y": index_y}


def _gaussian_map(n: int, cy: float, cx: float, sy: float, sx: float) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((xx - cx) ** 2 / (2 * sx ** 2) + (yy - cy) ** 2 / (2 * sy ** 2)))[None]


OFFICIAL_MAPS = {  # (cy, cx, sigma_y, sigma_x) on a 512 image
    "round": (256.0, 256.0, 28.0, 28.0),
    "elongated": (256.0, 256.0, 8.5, 85.0),
    "off-centre": (400.0, 110.0, 21.0, 32.0),
}


def _official_cdf(cum: list[float], p: float) -> float:
    """The op's cumulative sum as a function of the pixel-centre position p (node j at p = j),
    linear between nodes and beyond the ends."""
    j = min(max(int(math.floor(p)), 0), len(cum) - 2)
    return cum[j] + (p - j) * (cum[j + 1] - cum[j])


@pytest.mark.parametrize("name", list(OFFICIAL_MAPS))
def test_sampler_matches_official_op_port(name):
    """Same clipped densities (hence the same zoom on x and y) as the official op, and the same
    sampling positions up to the two documented index conventions.

    Positions are compared in output pixels of the official op: ``s_i = G(p_i) / step`` is
    where the official op would put the location our output ``i`` samples (``G`` the op's
    cumulative sum, ``p_i`` our pixel-centre position). With equal densities,
    ``G(p) = 1 - d_0 + F(p + 1)`` (``F`` our CDF; the op's cumsum starts at 1, not ``d_0``), our
    ``F(p_i + 0.5) = i + 0.5`` (pixel centres) and the op targets ``i * step`` (left edges), so
    ``s_i - i`` lies in ``[0.5, 1.5 + max(d) / 2]``: about one output pixel, everywhere.
    """
    n, m = 512, 224
    att = _gaussian_map(n, *OFFICIAL_MAPS[name])
    attx, atty = _official_marginals(att[0])
    ref = _official_att_sampler(attx, atty, m)
    ramp = torch.arange(n, dtype=torch.float32)
    ramps = torch.stack([ramp.expand(n, n), ramp[:, None].expand(n, n)])[None]  # x, y index

    dx, dy = zoom_bounded_densities(list(max_marginals(att)), [m, m])
    for d, key in ((dx, "density_x"), (dy, "density_y")):
        expected = torch.tensor(ref[key], dtype=torch.float64)
        torch.testing.assert_close(d[0].double(), expected, rtol=1e-5, atol=1e-6)
    zoom = [float(d.max()) * n / m for d in (dx, dy)]
    ref_zoom = [max(ref[k]) * n / m for k in ("density_x", "density_y")]
    assert zoom == pytest.approx(ref_zoom, rel=1e-5)

    pos = attention_sample(ramps, att, m)[0]  # sampled ramps: our pixel-centre positions
    for axis, p in (("x", pos[0, 0]), ("y", pos[1, :, 0])):
        cum, step = ref[f"cum_{axis}"], ref[f"step_{axis}"]
        s = torch.tensor([_official_cdf(cum, float(p[i])) / step - i for i in range(m)])
        upper = 1.5 + 0.5 * max(ref[f"density_{axis}"])
        assert 0.5 - 1e-3 <= float(s.min()) and float(s.max()) <= upper + 1e-3, (axis, s)
        # the op's own positions, in pixels, advance with the same local zoom as ours
        off = [(g + 1) * (n - 1) / 2 for g in ref[f"index_{axis}"]]  # align_corners=True
        assert off[0] == pytest.approx(0.0, abs=1e-2) and 0 <= min(off) and max(off) < n - 1

    # per-axis clipping, measured the same way, is not the official op (the test can fail)
    px, py = zoom_bounded_densities(list(max_marginals(att)), [m, m], clip="per_axis")
    gap = max(float((px[0].double() - torch.tensor(ref["density_x"], dtype=torch.float64))
                    .abs().max()),
              float((py[0].double() - torch.tensor(ref["density_y"], dtype=torch.float64))
                    .abs().max()))
    assert gap > 0.05


def test_official_coupling_keeps_the_zoom_equal_on_an_elongated_part():
    """On a part 10x longer than wide, the official op zooms both axes alike (its one
    threshold is set by the flatter axis); per-axis clipping zooms across the part to the cap."""
    n, m = 512, 224
    att = _gaussian_map(n, *OFFICIAL_MAPS["elongated"])
    ramp = torch.arange(n, dtype=torch.float32)
    ramps = torch.stack([ramp.expand(n, n), ramp[:, None].expand(n, n)])[None]
    zooms, pos = {}, {}
    for clip in ("coupled", "per_axis"):
        grid = attention_grid(att, n, m, clip=clip)
        zooms[clip] = (float(_magnification(grid[0, 0, :, 0], m).max()),
                       float(_magnification(grid[0, :, 0, 1], m).max()))
        pos[clip] = attention_sample(ramps, att, m, clip=clip)[0, 1, :, 0]  # y positions
    zx, zy = zooms["coupled"]
    assert zy == pytest.approx(zx, rel=0.02) and zx < 3.0
    px, py = zooms["per_axis"]
    assert px == pytest.approx(zx, rel=0.02) and py == pytest.approx(4.0, rel=0.02)
    assert float((pos["coupled"] - pos["per_axis"]).abs().max()) > 20  # pixels of the image


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def _capture(model: TASN) -> dict:
    store: dict = {}
    for name in ("fc_part", "fc_master", "fc", "backbone"):
        def hook(mod, args, out, name=name):
            store[name] = (args[0].shape[0], out)
        getattr(model, name).register_forward_hook(hook)
    return store


def test_training_losses_match_formulas():
    model = tiny_tasn(head_weight=0.3, attention_weight=0.7, distill_weight=1.5).train()
    store = _capture(model)
    images, y = torch.randn(3, 3, 40, 40), torch.tensor([0, 4, 2])
    out = model(images, y)
    assert store["backbone"][0] == 6  # [I_detail; I_structure]
    z_part, z_master = store["fc_part"][1], store["fc_master"][1]
    z_shared = store["fc"][1]  # (2B, C)
    assert z_part.shape == z_master.shape == (3, 5) and z_shared.shape == (6, 5)
    logs, losses = out["logs"], out["losses"]
    torch.testing.assert_close(logs["ce_part"], F.cross_entropy(z_part, y))
    torch.testing.assert_close(logs["ce_master"], F.cross_entropy(z_master, y))
    torch.testing.assert_close(logs["ce_part_aux"], F.cross_entropy(z_shared[:3], y))
    torch.testing.assert_close(logs["ce_master_aux"], F.cross_entropy(z_shared[3:], y))
    T = 10.0
    distill = -(F.softmax(z_part / T, -1) * F.log_softmax(z_master / T, -1)).sum(-1).mean()
    torch.testing.assert_close(logs["distill"], distill)
    weights = {"ce_attention": 0.7, "distill": 1.5}
    for k, v in losses.items():
        torch.testing.assert_close(v, weights.get(k, 0.3) * logs[k])
    assert set(losses) == {"ce_attention", "ce_part", "ce_master", "ce_part_aux",
                           "ce_master_aux", "distill"}
    torch.testing.assert_close(out["logits"], z_shared[3:])  # shared fc on the structure stream


@pytest.mark.parametrize("detach", [False, True])
def test_distillation_teacher_gradient_option(detach):
    model = tiny_tasn(head_weight=0.0, attention_weight=0.0, detach_teacher=detach).train()
    out = model(torch.randn(2, 3, 40, 40), torch.tensor([1, 2]))
    sum(out["losses"].values()).backward()
    assert model.fc_master.weight.grad.abs().sum() > 0
    teacher_grad = model.fc_part.weight.grad
    assert (teacher_grad is None or teacher_grad.abs().sum() == 0) == detach


def test_detail_channel_choice_moves_the_part_stream(monkeypatch):
    """Training: the detail map's channel decides what the part-net sees, and only that."""
    import finegrain.models.tasn as tasn_module
    model = tiny_tasn().train()
    images, y = torch.randn(2, 3, 40, 40), torch.tensor([0, 1])
    with torch.no_grad():
        maps, _ = model.attention_maps(images)
    sums = maps.sum((2, 3))  # (B, c): two channels per image whose maps differ most
    lo, hi = sums.argmin(1), sums.argmax(1)
    assert not torch.equal(maps[0, lo[0]], maps[0, hi[0]])

    store = _capture(model)
    inputs: list = []
    model.backbone.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))

    def run(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def fixed(maps, distinct=True, generator=None):  # stands in for the random draw
            return maps[torch.arange(maps.shape[0]), channels]
        monkeypatch.setattr(tasn_module, "detail_map", fixed)
        with torch.no_grad():
            model(images, y)
        return inputs[-1][:2], inputs[-1][2:], store["fc_part"][1]

    detail_lo, structure_lo, z_part_lo = run(lo)
    detail_hi, structure_hi, z_part_hi = run(hi)
    detail_again, _, z_part_again = run(lo)
    torch.testing.assert_close(detail_again, detail_lo)  # nothing else random
    torch.testing.assert_close(structure_hi, structure_lo)  # the structure stream is unmoved
    assert float((detail_lo - detail_hi).abs().mean()) > 1e-2  # the part-net input moves ...
    assert not torch.allclose(z_part_lo, z_part_hi)  # ... and so do its logits


def test_model_passes_the_clip_rule_to_the_sampler():
    images = torch.randn(1, 3, 64, 64)
    att = _gaussian_map(64, 32.0, 32.0, 1.0, 12.0)  # elongated: the two rules differ
    for clip in ("coupled", "per_axis"):
        model = tiny_tasn(clip=clip)
        torch.testing.assert_close(model._sample(images, att),
                                   attention_sample(images, att, 32, clip=clip))
    assert not torch.allclose(tiny_tasn(clip="coupled")._sample(images, att),
                              tiny_tasn(clip="per_axis")._sample(images, att))


def test_uniform_sampler_map_is_the_same_compute_without_zoom():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    model = tiny_tasn(sampler_map="uniform").eval()
    att = _gaussian_map(64, 20.0, 40.0, 4.0, 4.0).expand(2, -1, -1)
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model._sample(images, att), resized, rtol=1e-4, atol=1e-4)
    paper = tiny_tasn().eval()
    paper.load_state_dict(model.state_dict())
    assert not torch.allclose(paper._sample(images, att), model._sample(images, att), atol=1e-3)
    calls = []
    model.attention.register_forward_hook(lambda *a: calls.append(1))
    model.train()(images, targets=torch.tensor([0, 1]))
    assert calls == [1]  # the attention net still runs (and trains): same compute
    with pytest.raises(ValueError, match="sampler_map"):
        tiny_tasn(sampler_map="none")


def test_attention_pretrained_takes_a_finegrain_classifier_file(tmp_path):
    from safetensors.torch import save_file
    clf = create_model("resnet18", num_classes=7, backbone_kwargs=TINY)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    model = tiny_tasn(attention_pretrained=str(path))
    torch.testing.assert_close(model.attention.body.layer3[1].conv2.weight,
                               clf.backbone.layer3[1].conv2.weight)


def test_eval_does_not_depend_on_the_batch():
    """Eval is per image: a batch of 6 and the same images one at a time give the same
    logits (what an exported model's parity check on a dynamic batch relies on); some
    attention channels are all zero and some nearly zero, giving exact and near-duplicate
    maps."""
    model = tiny_tasn().eval()
    with torch.no_grad():  # X's channels: all zero (0::4), ~1e-6 (1::4), as trained
        model.attention.conv2.bias[0::4] = -1e3
        model.attention.conv2.weight[1::4] *= 1e-6
    images = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps, _ = model.attention_maps(images)
        batch = model(images)["logits"]
        single = torch.cat([model(images[i:i + 1])["logits"] for i in range(6)])
    assert distinct_maps_mask(maps).sum(1).lt(maps.shape[1]).all()  # duplicates are there
    torch.testing.assert_close(single, batch, rtol=1e-5, atol=1e-5)


def test_eval_uses_average_map_and_master_path_only():
    model = tiny_tasn().eval()
    store = _capture(model)
    images = torch.randn(2, 3, 40, 40)
    out = model(images)
    assert set(out) == {"logits", "embedding"}
    assert store["backbone"][0] == 2 and "fc_part" not in store and "fc_master" not in store
    torch.testing.assert_close(out["logits"], model(images)["logits"])  # nothing random
    # the path written out: average of all maps -> upsample -> square -> sampler -> fc
    with torch.no_grad():
        maps, _ = model.attention_maps(images)
        a = F.interpolate(structure_map(maps)[:, None], size=(40, 40), mode="bilinear",
                          align_corners=False)[:, 0] ** 2
        feats = model.backbone(attention_sample(images, a, 32))
        torch.testing.assert_close(out["logits"], model.fc(feats))
        torch.testing.assert_close(out["embedding"], F.normalize(feats, dim=-1))
        torch.testing.assert_close(out["embedding"].norm(dim=-1), torch.ones(2))
        detail = model.detail_attention(maps, images)  # eval: plain average of all maps
        torch.testing.assert_close(detail, F.interpolate(maps.mean(1, keepdim=True), (40, 40),
                                                         mode="bilinear")[:, 0])
    model.test_head = "master"
    with torch.no_grad():
        torch.testing.assert_close(model(images)["logits"], model.fc_master(feats))


def test_eval_with_targets_and_bad_test_head():
    model = tiny_tasn().eval()
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    torch.testing.assert_close(out["losses"]["ce"],
                               F.cross_entropy(out["logits"], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="test_head"):
        tiny_tasn(test_head="part")


def test_attention_pretrained_loads_into_attention_body(tmp_path):
    import timm
    ref = timm.create_model("resnet18", num_classes=7, **TINY)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = tiny_tasn(attention_pretrained=str(path))
    torch.testing.assert_close(model.attention.body.layer3[1].conv2.weight,
                               ref.layer3[1].conv2.weight)
    assert model.attention.body.layer2[0].conv1.stride == (1, 1)  # strides still removed


def test_pretrained_backbone_file_goes_to_the_master_net_only(tmp_path):
    import timm
    ref = timm.create_model("resnet18", num_classes=9, **TINY)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = tiny_tasn(pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    assert not torch.equal(model.attention.body.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)


def test_explain_maps_and_images():
    model = tiny_tasn().train()
    images = torch.randn(2, 3, 40, 40)
    stats = model.attention.bn.running_mean.clone()
    out = model.explain(images)
    assert model.training and torch.equal(stats, model.attention.bn.running_mean)
    model.eval()
    assert not model.pairwise_explain and all(m.image == "query" for m in out)
    ex = {m.name: m.map for m in out}
    assert ex["structure"].shape == ex["detail"].shape == (2, 40, 40)
    assert ex["structure_image"].shape == ex["detail_image"].shape == (2, 3, 32, 32)
    assert [m.is_picture for m in out] == [False, False, True, True]
    again = {m.name: m.map for m in model.explain(images)}
    torch.testing.assert_close(ex["detail_image"], again["detail_image"])  # seeded draw
    with torch.no_grad():
        maps, _ = model.attention_maps(images)
    fixed = {m.name: m.map for m in model.explain(images, channel=3)}["detail"]
    ref = F.interpolate(maps[:, 3:4], (40, 40), mode="bilinear")[:, 0]
    torch.testing.assert_close(fixed, ref)  # raw: the model does not scale it
    with pytest.raises(InputError, match="pair-wise"):
        model.explain(images, pair=images)


@pytest.mark.parametrize("name", list_models("tasn*"))
def test_registry_smoke(name):
    assert set(list_models("tasn*")) == {"tasn_resnet18", "tasn_resnet50"}
    model = tiny_tasn(name).train()
    images, y = torch.randn(2, 3, 36, 36), torch.tensor([0, 3])
    out = model(images, targets=y)
    total = sum(out["losses"].values())
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in out["logs"].values())
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ev = model(images)
    assert set(ev) == {"logits", "embedding"} and ev["logits"].shape == (2, 5)
    assert torch.isfinite(ev["logits"]).all()


def test_bf16_autocast_keeps_losses_fp32():
    model = tiny_tasn().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert all(v.dtype == torch.float32 for v in out["losses"].values())
    assert all(torch.isfinite(v) for v in out["losses"].values())
