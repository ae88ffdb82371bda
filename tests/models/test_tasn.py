"""TASN: trilinear attention, the attention sampler and the model, against slow references."""

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.models import create_model, list_models
from finegrain.models.tasn import (TASN, AttentionNet, attention_grid, attention_sample,
                                   detail_map, distinct_maps_mask, inverse_cdf, max_marginals,
                                   structure_map, trilinear_attention, zoom_bounded_density)

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


def test_distinct_maps_counted_once_in_structure_and_detail():
    maps = torch.rand(2, 5, 3, 3)
    maps[0, 1] = maps[0, 0]  # channels 0, 1, 3 identical in image 0
    maps[0, 3] = maps[0, 0]
    mask = distinct_maps_mask(maps)
    assert mask[1].all()
    assert mask[0].tolist().count(True) == 3 and mask[0, 2] and mask[0, 4]
    assert int(mask[0, [0, 1, 3]].sum()) == 1
    expected0 = (maps[0, 0] + maps[0, 2] + maps[0, 4]) / 3
    s = structure_map(maps)
    torch.testing.assert_close(s[0], expected0)
    torch.testing.assert_close(s[1], maps[1].mean(0))
    torch.testing.assert_close(structure_map(maps, distinct=False)[0], maps[0].mean(0))

    gen = torch.Generator().manual_seed(0)
    picks = set()
    for _ in range(60):
        d = detail_map(maps, generator=gen)  # (B, h, w)
        idx = [int(k) for k in range(5) if torch.equal(d[0], maps[0, k])]
        picks.add(min(idx))
    assert picks == {0, 2, 4}  # duplicates drawn as one group, never more often


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


def test_sampled_ramp_lands_where_index_math_says():
    """A ramp image (value = pixel index) sampled with bilinear interpolation returns the
    sampled coordinate itself: checks inverse CDF, pixel centres and align_corners at once."""
    B, H, W, out_h, out_w = 2, 20, 24, 11, 13
    att = torch.rand(B, H, W) ** 3
    cols = torch.arange(W, dtype=torch.float32).expand(B, 1, H, W)
    rows = torch.arange(H, dtype=torch.float32)[:, None].expand(B, 1, H, W)
    for max_zoom, iters in [(4.0, 5), (1e3, 0)]:
        out = attention_sample(torch.cat([cols, rows], 1), att, (out_h, out_w), max_zoom, iters)
        for b in range(B):
            a = att[b].tolist()
            col_prof = [max(a[r][c] for r in range(H)) for c in range(W)]  # max over rows
            row_prof = [max(a[r]) for r in range(H)]  # max over columns
            xs = _ref_coords(_ref_density(col_prof, out_w, max_zoom, iters), out_w)
            ys = _ref_coords(_ref_density(row_prof, out_h, max_zoom, iters), out_h)
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


def test_peaked_map_magnifies_its_region_bounded_by_the_cap():
    att, n, m = _peaked_map(), 64, 32
    uniform_step = 2.0 / m  # grid step of the plain resize, in grid units
    for max_zoom in (2.0, 4.0):
        grid = attention_grid(att, (n, n), (m, m), max_zoom=max_zoom, iterations=5)
        gx, gy = grid[0, 0, :, 0], grid[0, :, 0, 1]
        for g, centre in ((gx, 40.5), (gy, 20.5)):
            step = g[1:] - g[:-1]
            magnification = uniform_step / step  # local zoom relative to the uniform resize
            assert magnification.max() <= max_zoom * 1.01
            assert magnification.max() >= max_zoom * 0.95  # the cap is reached
            zoomed = (g[1:][magnification >= 0.95 * max_zoom] + 1) * n / 2  # pixel coords
            assert zoomed.min() - 1 < centre < zoomed.max() + 1  # the peak is magnified
            assert zoomed.max() - zoomed.min() < n / 2  # ... and not everything else
    # without clipping the same map is magnified far beyond the cap (the test above can fail)
    grid = attention_grid(att, (n, n), (m, m), max_zoom=4.0, iterations=0)
    step = grid[0, 0, 1:, 0] - grid[0, 0, :-1, 0]
    assert (uniform_step / step).max() > 8.0


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


def test_sampler_rejects_bad_shapes():
    with pytest.raises(ValueError, match="attention"):
        attention_sample(torch.rand(2, 3, 8, 8), torch.rand(3, 4, 4), 4)


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


def test_eval_uses_average_map_and_master_path_only():
    model = tiny_tasn().eval()
    store = _capture(model)
    images = torch.randn(2, 3, 40, 40)
    out = model(images)
    assert set(out) == {"logits", "embedding"}
    assert store["backbone"][0] == 2 and "fc_part" not in store and "fc_master" not in store
    torch.testing.assert_close(out["logits"], model(images)["logits"])  # nothing random
    # the path written out: average (distinct) map -> upsample -> square -> sampler -> fc
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
    ex = model.explain(images)
    assert model.training and torch.equal(stats, model.attention.bn.running_mean)
    model.eval()
    assert ex["structure"].shape == ex["detail"].shape == (2, 40, 40)
    assert ex["structure_image"].shape == ex["detail_image"].shape == (2, 3, 32, 32)
    for k in ("structure", "detail"):
        assert ex[k].min() >= 0 and ex[k].max() <= 1 and ex[k].amax((1, 2)).eq(1).all()
    again = model.explain(images)
    torch.testing.assert_close(ex["detail_image"], again["detail_image"])  # seeded draw
    with torch.no_grad():
        maps, _ = model.attention_maps(images)
    fixed = model.explain(images, channel=3)["detail"]
    ref = F.interpolate(maps[:, 3:4], (40, 40), mode="bilinear")[:, 0]
    lo, hi = ref.amin((1, 2), keepdim=True), ref.amax((1, 2), keepdim=True)
    torch.testing.assert_close(fixed, (ref - lo) / (hi - lo))


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
