"""DCAL (arXiv 2205.02151) against slow, explicit references written here.

Every reference below recomputes attention by hand (per head, explicit exp / sum softmax,
explicit LayerNorm / GELU / linear algebra) from the timm weights, so the model's fused and
batched paths are checked against the paper's formulas, not against themselves.
"""

import math
from fractions import Fraction
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.models import create_model, list_models
from finegrain.models import dcal as dcal_mod
from finegrain.models.dcal import (DCAL, GlobalLocalCrossAttention, attention_rollout_class_row,
                                   num_selected, pwca_attention, random_derangement,
                                   select_top_patches)
from finegrain.models.registry import registry_name
from finegrain.models.weights import load_pretrained

TINY = dict(depth=3, embed_dim=32, num_heads=2, patch_size=8)
IMG = 32  # 4 x 4 = 16 patches


def tiny(**kw) -> DCAL:
    kw = {"num_classes": 5, "img_size": IMG, "drop_path_rate": 0.0, "backbone_kwargs": TINY,
          "top_ratio": 0.25, **kw}
    return DCAL("deit_tiny_patch16_224", **kw)


def timm_tiny(num_classes: int = 5) -> nn.Module:
    return timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, img_size=IMG,
                             drop_path_rate=0.0, **TINY)


# ---- slow references ------------------------------------------------------------------------

def ref_layernorm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


def ref_softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = ref_linear(mlp.fc1, x)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return ref_linear(mlp.fc2, h)


def ref_qkv(blk: nn.Module, x: torch.Tensor):
    """Per-head q, k, v lists of (T, D) for one image's (T, C) tokens, after norm1."""
    attn = blk.attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(blk.ls1, nn.Identity)
    h = ref_layernorm(blk.norm1, x)
    out = ref_linear(attn.qkv, h)  # (T, 3A)
    A = attn.num_heads * attn.head_dim
    q, k, v = out[:, :A], out[:, A:2 * A], out[:, 2 * A:]
    D = attn.head_dim
    split = lambda t: [t[:, i * D:(i + 1) * D] for i in range(attn.num_heads)]  # noqa: E731
    return split(q), split(k), split(v)


def ref_tail(blk: nn.Module, x: torch.Tensor, heads_out: list) -> torch.Tensor:
    """Concat heads, proj, residual, then MLP + residual (pre-LN)."""
    x = x + ref_linear(blk.attn.proj, torch.cat(heads_out, dim=-1))
    return x + ref_mlp(blk.mlp, ref_layernorm(blk.norm2, x))


def ref_sa_block(blk: nn.Module, x: torch.Tensor):
    """One SA block on (T, C); returns (output, head-mean attention (T, T))."""
    qs, ks, vs = ref_qkv(blk, x)
    probs = [ref_softmax(q @ k.T / math.sqrt(q.shape[-1])) for q, k in zip(qs, ks)]
    out = ref_tail(blk, x, [p @ v for p, v in zip(probs, vs)])
    return out, torch.stack(probs).mean(0)


def ref_embed(model: DCAL, images: torch.Tensor) -> torch.Tensor:
    bb = model.backbone
    x = bb.patch_embed(images)  # (B, N, C)
    cls = bb.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + bb.pos_embed


def ref_rollout_row(means: list) -> torch.Tensor:
    """Row 0 of S_hat = S_bar_k ... S_bar_1 by full matrix products, in a loop."""
    T = means[0].shape[-1]
    s_hat = torch.eye(T, dtype=torch.float64)
    for s in means:
        s_bar = 0.5 * s.double() + 0.5 * torch.eye(T, dtype=torch.float64)
        s_bar = s_bar / s_bar.sum(-1, keepdim=True)
        s_hat = s_bar @ s_hat
    return s_hat[0]


def ref_pwca(model: DCAL, images: torch.Tensor, i1, i2, from_sa_stream: bool = False):
    """PWCA by hand: I1's own stream; in every block, per image and head,
    softmax(Q1 [K1; K2]^T / sqrt d) [V1; V2] with I2's K/V from I2's SA stream at that layer.
    ``from_sa_stream`` builds the known bug (each layer's queries recomputed from the SA
    stream instead of the PWCA stream). Returns (class features (P, C), last-block probs
    (P, H, T, 2T))."""
    x0 = ref_embed(model, images)
    blocks = model.backbone.blocks
    feats, last_probs = [], []
    for a, b in zip(i1.tolist(), i2.tolist()):
        x_sa = [x0[a]], [x0[b]]
        for blk in blocks:
            x_sa[0].append(ref_sa_block(blk, x_sa[0][-1])[0])
            x_sa[1].append(ref_sa_block(blk, x_sa[1][-1])[0])
        xp = x0[a]
        for l, blk in enumerate(blocks):
            src = x_sa[0][l] if from_sa_stream else xp
            q1, k1, v1 = ref_qkv(blk, src)
            _, k2, v2 = ref_qkv(blk, x_sa[1][l])
            outs, probs = [], []
            for h in range(len(q1)):
                kc, vc = torch.cat([k1[h], k2[h]]), torch.cat([v1[h], v2[h]])  # (2T, D)
                p = ref_softmax(q1[h] @ kc.T / math.sqrt(q1[h].shape[-1]))  # (T, 2T)
                outs.append(p @ vc)
                probs.append(p)
            xp = ref_tail(blk, src, outs)
        feats.append(ref_layernorm(model.backbone.norm, xp)[0])
        last_probs.append(torch.stack(probs))
    return torch.stack(feats), torch.stack(last_probs)


# ---- rollout and selection (Eqs. 2-3) -------------------------------------------------------

def test_rollout_class_row_matches_full_product():
    B, T, k = 3, 7, 4
    means = [torch.rand(B, T, T).softmax(-1) for _ in range(k)]
    row = attention_rollout_class_row(means)
    for b in range(B):
        ref = ref_rollout_row([m[b] for m in means])
        torch.testing.assert_close(row[b].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(row.sum(-1), torch.ones(B))  # still a distribution


@pytest.mark.parametrize("n,ratio", [(196, 0.1), (784, 0.1), (128, 0.3), (130, 0.3), (16, 0.25),
                                     (5, 1.0), (3, 0.01)])
def test_num_selected_is_ceil(n, ratio):
    assert num_selected(n, ratio) == max(1, math.ceil(Fraction(str(ratio)) * n))


def test_model_rollout_and_top_r_against_explicit_loop():
    model = tiny().eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        f = model.forward_features(images)
        x0 = ref_embed(model, images)
        for b in range(2):
            x, means = x0[b], []
            for blk in model.backbone.blocks[:-1]:  # the SA blocks before GLCA
                x, s = ref_sa_block(blk, x)
                means.append(s)
            row = ref_rollout_row(means)
            torch.testing.assert_close(f["rollout"][b].double(), row, rtol=1e-4, atol=1e-6)
            N = row.shape[0] - 1
            R = math.ceil(Fraction("0.25") * N)
            assert f["selected"].shape == (2, R)
            expected = torch.argsort(row[1:], descending=True)[:R]
            assert f["selected"][b].tolist() == expected.tolist()


def test_select_top_patches_ignores_class_token():
    row = torch.tensor([[10.0, 0.1, 0.5, 0.3, 0.2]])
    assert select_top_patches(row, 0.5).tolist() == [[1, 2]]  # patches 1 (0.5), 2 (0.3)


# ---- GLCA (Eq. 4) ----------------------------------------------------------------------------

def test_glca_block_matches_hand_written_formula():
    model = tiny().eval()
    glca = model.glca_block
    with torch.no_grad():  # make its weights its own, different from the last SA block
        for p in glca.parameters():
            p.add_(0.05 * torch.randn_like(p))
    B, T, C = 2, 17, 32
    x = torch.randn(B, T, C)
    index = torch.stack([torch.randperm(T - 1)[:4] for _ in range(B)])  # (B, R)
    with torch.no_grad():
        out = glca(x, index)
        blk = glca.block
        for b in range(B):
            tokens = (index[b] + 1).tolist()  # Q^l: the R selected tokens only
            qs, _, _ = ref_qkv(blk, x[b][tokens])  # local queries from the R tokens
            _, ks, vs = ref_qkv(blk, x[b])  # global keys / values from all N+1 tokens
            heads = [ref_softmax(q @ k.T / math.sqrt(q.shape[-1])) @ v
                     for q, k, v in zip(qs, ks, vs)]
            ref = ref_tail(blk, x[b][tokens], heads)  # proj + residual, MLP + residual
            torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-5)


def ref_glca_feature(model: DCAL, images: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """GLCA feature by hand: SA blocks 1..L-1 per image, then Eq. 4 with Q^l = the selected
    tokens and K^g, V^g = all tokens, the block's tail on those R tokens, LN of their mean."""
    x0 = ref_embed(model, images)
    blk = model.glca_block.block
    feats = []
    for b in range(images.shape[0]):
        x = x0[b]
        for sa in model.backbone.blocks[:-1]:
            x = ref_sa_block(sa, x)[0]
        tokens = (selected[b] + 1).tolist()
        qs, _, _ = ref_qkv(blk, x[tokens])
        _, ks, vs = ref_qkv(blk, x)
        heads = [ref_softmax(q @ k.T / math.sqrt(q.shape[-1])) @ v for q, k, v in zip(qs, ks, vs)]
        z = ref_tail(blk, x[tokens], heads)  # (R, C)
        feats.append(ref_layernorm(model.glca_norm, z.mean(0)))
    return torch.stack(feats)


def test_glca_branch_reads_last_block_input_and_own_norm():
    model = tiny().eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        f = model.forward_features(images)
        ref = ref_glca_feature(model, images, f["selected"])
    torch.testing.assert_close(f["glca"], ref, rtol=1e-4, atol=1e-5)


def _perturbed(model: DCAL) -> DCAL:
    with torch.no_grad():  # trained-looking weights: GLCA its own, not a copy of the last block
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_glca_feature_and_logits_depend_on_the_selection(monkeypatch):
    # The fault this catches: a class-token query attends to everything and the MLP is per
    # token, so a feature read from the class token ignores which patches were selected.
    torch.manual_seed(0)
    model = _perturbed(tiny()).eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        f = model.forward_features(images)
        out = model(images)["logits"]
        other = (f["selected"] + 5) % 16  # another 4 patches per image
        assert not torch.equal(other.sort(1).values, f["selected"].sort(1).values)
        monkeypatch.setattr(dcal_mod, "select_top_patches", lambda row, ratio: other)
        f2 = model.forward_features(images)
        out2 = model(images)["logits"]
        ref2 = ref_glca_feature(model, images, other)
    assert torch.equal(f2["selected"], other)
    torch.testing.assert_close(f2["glca"], ref2, rtol=1e-4, atol=1e-5)
    assert (f2["glca"] - f["glca"]).abs().max() > 1e-2
    assert (out2 - out).abs().max() > 1e-3
    torch.testing.assert_close(f2["sa"], f["sa"])  # only GLCA moved


def test_random_and_rollout_selection_differ_on_the_same_weights():
    torch.manual_seed(0)
    model = _perturbed(tiny()).eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        roll = model(images)["logits"]
        f_roll = model.forward_features(images)
        model.glca_selection = "random"
        torch.manual_seed(1)
        f_rand = model.forward_features(images)
        torch.manual_seed(1)
        rand = model(images)["logits"]
    assert "rollout" not in f_rand  # random selection needs no rollout (fused SA attention)
    assert f_rand["selected"].shape == f_roll["selected"].shape == (2, 4)
    for b in range(2):  # R distinct patches per image, in range
        assert len(set(f_rand["selected"][b].tolist())) == 4
    assert not torch.equal(f_rand["selected"].sort(1).values, f_roll["selected"].sort(1).values)
    assert (rand - roll).abs().max() > 1e-3
    with pytest.raises(ValueError, match="glca_selection"):
        tiny(glca_selection="top")


def test_random_selection_is_uniform_per_image():
    torch.manual_seed(0)
    counts = torch.zeros(16)
    for _ in range(400):
        sel = dcal_mod.random_patches(8, 16, 0.25)
        assert sel.shape == (8, 4)
        assert all(len(set(r.tolist())) == 4 for r in sel)
        counts += torch.bincount(sel.flatten(), minlength=16)
    # 400 x 8 x 4 = 12,800 draws over 16 patches: 800 each; 5 sigma ~ 130
    assert (counts - 800).abs().max() < 130, counts


def test_reid_embedding_depends_on_the_selection(monkeypatch):
    torch.manual_seed(0)
    model = _perturbed(tiny(task="reid", img_size=(64, 32), top_ratio=None)).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        f = model.forward_features(images)
        e = model(images)["embedding"]
        other = (f["selected"] + 7) % 32
        monkeypatch.setattr(dcal_mod, "select_top_patches", lambda row, ratio: other)
        e2 = model(images)["embedding"]
    D = e.shape[1] // 2
    assert (e2[:, D:] - e[:, D:]).abs().max() > 1e-3  # the GLCA half moves


def test_sa_only_inference_is_the_sa_head_at_zero_extra_cost(monkeypatch):
    torch.manual_seed(0)
    model = _perturbed(tiny()).eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        sa_logits = model.head(model.forward_features(images)["sa"])
        model.sa_only = True
        calls = []
        monkeypatch.setattr(dcal_mod, "attention_rollout_class_row",
                            lambda m: calls.append(1))
        model.glca_block.register_forward_hook(lambda *a: calls.append(2))
        out = model(images)
    assert not calls  # neither the rollout nor the GLCA block ran
    torch.testing.assert_close(out["logits"], sa_logits)
    reid = tiny(task="reid", sa_only=True).eval()
    with torch.no_grad():
        assert reid(images)["embedding"].shape == (2, 32)  # SA feature only
    model.train()  # training keeps every branch
    y = torch.tensor([0, 1])
    monkeypatch.undo()
    assert set(model(images, targets=y)["losses"]) == {"sa", "glca", "pwca"}


def test_glca_block_is_an_own_copy():
    model = tiny()
    last, own = model.backbone.blocks[-1], model.glca_block.block
    for (n, a), (_, b) in zip(last.state_dict().items(), own.state_dict().items()):
        assert torch.equal(a, b), n
        assert a.data_ptr() != b.data_ptr(), n  # not shared


# ---- PWCA (Eq. 5) ----------------------------------------------------------------------------

def test_pwca_attention_is_one_softmax_over_concatenation():
    attn = timm_tiny().blocks[0].attn.eval()
    P, H, T, D = 2, 2, 5, 16
    q1, k1, v1, k2, v2 = (torch.randn(P, H, T, D) for _ in range(5))
    out = pwca_attention(attn, q1, k1, v1, k2, v2)
    for p in range(P):
        for h in range(H):
            kc, vc = torch.cat([k1[p, h], k2[p, h]]), torch.cat([v1[p, h], v2[p, h]])
            ref = ref_softmax(q1[p, h] @ kc.T / math.sqrt(D)) @ vc
            torch.testing.assert_close(out[p, h], ref, rtol=1e-4, atol=1e-5)


def test_pwca_stream_matches_reference_at_every_layer():
    model = tiny().eval()  # eval: no drop path / dropout; PWCA forced through pairs=
    images = torch.randn(3, 3, IMG, IMG)
    i1, i2 = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    with torch.no_grad():
        f = model.forward_features(images, pairs=(i1, i2), pair_probs=True)
        ref, ref_probs = ref_pwca(model, images, i1, i2)
        bug, _ = ref_pwca(model, images, i1, i2, from_sa_stream=True)
        sa_only = model.forward_features(images)
    torch.testing.assert_close(f["pwca"], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f["pair_probs"], ref_probs, rtol=1e-4, atol=1e-6)
    # its own stream: differs from the SA class feature and from the per-layer recompute bug
    assert (f["pwca"] - bug).abs().max() > 1e-3
    assert (f["pwca"] - f["sa"]).abs().max() > 1e-3
    # the PWCA stream does not disturb SA / GLCA
    torch.testing.assert_close(f["sa"], sa_only["sa"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f["glca"], sa_only["glca"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detach_pair", [False, True])
def test_gradient_into_partner_keys_values(detach_pair):
    model = tiny(detach_pair=detach_pair).eval()
    images = torch.randn(2, 3, IMG, IMG, requires_grad=True)
    f = model.forward_features(images, pairs=(torch.tensor([0]), torch.tensor([1])))
    (f["pwca"] * torch.randn_like(f["pwca"])).sum().backward()  # (a LayerNormed sum is ~0)
    partner_grad = images.grad[1].abs().sum().item()
    assert (partner_grad == 0.0) == detach_pair
    assert images.grad[0].abs().sum() > 0


def test_random_derangement_has_no_fixed_point():
    for n in (2, 3, 8, 17):
        for _ in range(20):
            p = random_derangement(n)
            assert sorted(p.tolist()) == list(range(n))
            assert not (p == torch.arange(n)).any()
    assert random_derangement(1).tolist() == [0]


def test_pwca_runs_only_in_training_with_targets(monkeypatch):
    calls = []
    real = dcal_mod.pwca_attention
    monkeypatch.setattr(dcal_mod, "pwca_attention", lambda *a: calls.append(1) or real(*a))
    model = tiny()
    images, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 3])
    model.eval()
    out = model(images, targets=y)
    assert calls == [] and "pwca" not in out["losses"]
    model.train()
    model(images)
    assert calls == []
    out = model(images, targets=y)
    assert len(calls) == TINY["depth"] and "pwca" in out["losses"]


# ---- inference and losses ---------------------------------------------------------------------

def test_eval_logits_are_log_mean_of_sa_and_glca_probabilities():
    model = tiny().eval()
    images = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        out = model(images)
        f = model.forward_features(images)
        p = 0.5 * (F.softmax(model.head(f["sa"]), -1) + F.softmax(model.glca_head(f["glca"]), -1))
    assert set(out) == {"logits"}
    torch.testing.assert_close(out["logits"], torch.log(p), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"].softmax(-1), p, rtol=1e-5, atol=1e-6)


def test_reid_embedding_concatenates_bnneck_class_features():
    model = tiny(task="reid", img_size=(64, 32), top_ratio=None).eval()
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        out = model(images)
        f = model.forward_features(images)
        ref = F.normalize(torch.cat([model.bnneck(f["sa"]), model.glca_bnneck(f["glca"])], -1), dim=-1)
    assert out["embedding"].shape == (3, 64)
    torch.testing.assert_close(out["embedding"], ref)
    assert model.top_ratio == 0.3 and f["selected"].shape[1] == math.ceil(Fraction("0.3") * 32)


def test_reid_losses_and_bnneck_running_stats_from_sa_only():
    model = tiny(task="reid")
    images, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        sa = model.eval().forward_features(images)["sa"]
    model.train()
    out = model(images, targets=y)
    for b in ("sa", "glca", "pwca"):
        assert out["logs"][b].item() == pytest.approx(
            (out["logs"][f"{b}_ce"] + out["logs"][f"{b}_triplet"]).item(), rel=1e-5)
    # running mean updated by the SA stream alone (momentum 0.1 from 0)
    torch.testing.assert_close(model.bnneck.running_mean, 0.1 * sa.mean(0), rtol=1e-4, atol=1e-6)


def test_losses_are_uncertainty_weighted_and_reach_w_and_backbone():
    model = tiny()
    with torch.no_grad():
        model.uncertainty.w.copy_(torch.tensor([0.2, -0.3, 0.5]))
    model.train()
    out = model(torch.randn(4, 3, IMG, IMG), targets=torch.tensor([0, 1, 2, 3]))
    ws = {"sa": 0.2, "glca": -0.3, "pwca": 0.5}
    for b, w in ws.items():
        raw = out["logs"][b].item()
        assert out["losses"][b].item() == pytest.approx(0.5 * (math.exp(-w) * raw + w), rel=1e-5)
        assert out["logs"][f"w_{b}"].item() == pytest.approx(w)
    sum(out["losses"].values()).backward()
    for i, (b, w) in enumerate(ws.items()):
        expected = 0.5 * (1 - math.exp(-w) * out["logs"][b].item())
        assert model.uncertainty.w.grad[i].item() == pytest.approx(expected, rel=1e-4)
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.glca_block.block.attn.qkv.weight.grad.abs().sum() > 0
    assert "uncertainty.w" in model.no_weight_decay()


def test_w_init_and_parameter_groups():
    from finegrain.engine.module import param_groups
    model = tiny(w_init={"sa": -1.85, "glca": -1.05}, w_lr=0.01)
    torch.testing.assert_close(model.uncertainty.w.detach(), torch.tensor([-1.85, -1.05, 0.0]))
    assert tiny(w_init=0.5).uncertainty.w.tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(KeyError, match="w_init"):
        tiny(w_init={"glcaa": 1.0})
    groups = param_groups(model, lr=1e-4, weight_decay=0.05, head_lr_mult=10.0)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)  # each parameter once
    # the GLCA block and norm are copies of backbone modules: backbone lr, decay on matrices
    assert lr_of[id(named["glca_block.block.attn.qkv.weight"])] == (1e-4, 0.05)
    assert lr_of[id(named["glca_block.block.norm1.weight"])] == (1e-4, 0.0)
    assert lr_of[id(named["glca_norm.weight"])] == (1e-4, 0.0)
    assert lr_of[id(named["backbone.blocks.0.mlp.fc1.weight"])] == (1e-4, 0.05)
    assert lr_of[id(named["head.weight"])] == pytest.approx((1e-3, 0.05))  # new: x head_lr_mult
    assert lr_of[id(named["glca_head.weight"])] == pytest.approx((1e-3, 0.05))
    assert lr_of[id(named["uncertainty.w"])] == (0.01, 0.0)  # w_lr, no decay
    plain = tiny()  # no w_lr: the uncertainty weights train as a new (head) parameter
    default = param_groups(plain, lr=1e-4, weight_decay=0.05, head_lr_mult=10.0)
    g = next(g for g in default if any(p is plain.uncertainty.w for p in g["params"]))
    assert (g["lr"], g["weight_decay"]) == (pytest.approx(1e-3), 0.0)


# ---- baseline twin and weights -------------------------------------------------------------------

def test_baseline_twin_is_the_plain_vit():
    ref = timm_tiny().eval()
    model = tiny(glca=False, pwca=False).eval()
    sd = ref.state_dict()
    model.backbone.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
    model.head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"backbone", "head"}
    images, y = torch.randn(3, 3, IMG, IMG), torch.tensor([0, 1, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(images)["logits"], ref(images), rtol=1e-5, atol=1e-6)
        model.train()
        ref.train()
        out = model(images, targets=y)
        torch.testing.assert_close(out["losses"]["sa"], F.cross_entropy(ref(images), y))
    assert set(out["losses"]) == {"sa"}


def test_loading_timm_file_matches_timm_and_copies_glca(tmp_path):
    ref = timm_tiny(num_classes=1000).eval()
    path = tmp_path / "deit_tiny.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("dcal_deit_tiny_patch16_224", pretrained=str(path), num_classes=5,
                         img_size=IMG, drop_path_rate=0.0, backbone_kwargs=TINY).eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        f = model.forward_features(images)  # explicit-attention SA path (GLCA on)
        torch.testing.assert_close(f["sa"], ref.forward_head(ref.forward_features(images),
                                                             pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
    for name, v in ref.blocks[-1].state_dict().items():
        assert torch.equal(model.glca_block.block.state_dict()[name], v), name
    for name, v in ref.norm.state_dict().items():
        assert torch.equal(model.glca_norm.state_dict()[name], v), name

    # A trained DCAL checkpoint keeps its own GLCA weights (not re-copied from the last block).
    with torch.no_grad():
        model.glca_block.block.mlp.fc1.weight.add_(1.0)
    mine = tmp_path / "dcal.pth"
    torch.save(model.state_dict(), mine)
    again = tiny()
    load_pretrained(again, str(mine))
    torch.testing.assert_close(again.glca_block.block.mlp.fc1.weight,
                               model.glca_block.block.mlp.fc1.weight)


# ---- explain ----------------------------------------------------------------------------------------

def test_explain_maps():
    model = tiny()
    model.train()
    images, pair = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG)
    out = model.explain(images, pair=pair)
    assert model.training  # mode restored
    assert model.pairwise_explain
    maps = {m.name: m.map for m in out}
    assert [m.name for m in out] == ["rollout", "glca_selected", "pair_attention"]
    assert {m.name: m.image for m in out}["pair_attention"] == "pair"  # over I2, the pair
    for v in maps.values():
        assert v.shape == (2, 4, 4) and torch.isfinite(v).all()
    assert maps["glca_selected"].sum((1, 2)).tolist() == [4.0, 4.0]
    with torch.no_grad():
        f = model.eval().forward_features(images)
        _, probs = ref_pwca(model, torch.cat([images, pair]), torch.tensor([0, 1]),
                            torch.tensor([2, 3]))
    sel = torch.zeros(2, 16).scatter_(1, f["selected"], 1.0)
    assert torch.equal(maps["glca_selected"].reshape(2, 16), sel)
    T = 17
    on_i2 = probs.mean(1)[:, 0, T + 1:]  # (2, N) class token of I1 over I2's patches, raw
    torch.testing.assert_close(maps["pair_attention"].reshape(2, 16), on_i2,
                               rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(maps["rollout"].reshape(2, 16), f["rollout"][:, 1:])


# ---- registry-wide smoke test -------------------------------------------------------------------

SMOKE = [(n, "classification") for n in list_models("dcal_*")] + [("dcal_deit_tiny_patch16_224", "reid")]


@pytest.mark.parametrize("name,task", SMOKE)
def test_registry_smoke(name, task):
    kw = dict(depth=2, embed_dim=32, num_heads=2)
    if "r50" not in name:
        kw["patch_size"] = 8
    size = (32, 16) if task == "reid" else 32
    model = create_model(name, num_classes=4, img_size=size, task=task, backbone_kwargs=kw)
    images = torch.randn(4, 3, *((size, size) if isinstance(size, int) else size))
    y = torch.tensor([0, 0, 1, 1])
    model.train()
    out = model(images, targets=y)
    loss = sum(out["losses"].values())
    assert torch.isfinite(loss)
    assert set(out["losses"]) == {"sa", "glca", "pwca"}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        out = model(images)
    expected = {"logits", "embedding"} if task == "reid" else {"logits"}
    assert set(out) == expected and out["logits"].shape == (4, 4)
    assert torch.isfinite(out["logits"]).all()


def test_bf16_autocast_losses_in_fp32():
    model = tiny(task="reid").train()
    images, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, targets=y)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["losses"].values())
    assert out["logits"].dtype == torch.float32 and out["embedding"].dtype == torch.float32
    sum(out["losses"].values()).backward()
    assert torch.isfinite(model.backbone.pos_embed.grad).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task"):
        tiny(task="dml")
    with pytest.raises(ValueError, match="depth"):
        DCAL("deit_tiny_patch16_224", img_size=IMG, backbone_kwargs={**TINY, "depth": 1})
    with pytest.raises(ValueError, match="pair"):
        tiny().explain(torch.randn(2, 3, IMG, IMG), pair=torch.randn(1, 3, IMG, IMG))
    with pytest.raises(ValueError, match="class token"):
        DCAL("deit_tiny_patch16_224", img_size=IMG,
             backbone_kwargs={**TINY, "global_pool": "avg"})
    assert isinstance(tiny().glca_block, GlobalLocalCrossAttention)


# ---- recipes -------------------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "dcal").glob("*.yaml"))


def test_recipes_are_valid_and_twinned():
    import inspect

    import yaml

    from finegrain.data.registry import get_dataset_class
    from finegrain.engine.datamodule import FinegrainDataModule
    from finegrain.engine.module import FinegrainModule

    assert len(RECIPES) >= 16
    dcal_args = set(inspect.signature(DCAL).parameters)
    module_args = set(inspect.signature(FinegrainModule).parameters)
    data_args = set(inspect.signature(FinegrainDataModule).parameters)
    names = set(list_models("dcal_*"))
    by_stem = {p.stem: yaml.safe_load(p.read_text()) for p in RECIPES}
    for stem, r in by_stem.items():
        text = (RECIPES[0].parent / f"{stem}.yaml").read_text()
        assert "2205.02151" in text or "baseline twin" in text, stem
        assert r["model"]["model"]["class_path"] == "finegrain.models.dcal.DCAL", stem
        assert registry_name(r["model"]["model"])[0] in names, stem
        assert set(r["model"]) <= module_args, stem
        init = r["model"]["model"]["init_args"]
        assert set(init) <= dcal_args, stem
        assert set(r["data"]) <= data_args, stem
        get_dataset_class(r["data"]["dataset"])
        assert "img_size" not in init, stem  # linked from data.img_size
        reid = init["task"] == "reid"
        opt, lr = r["model"]["optimizer"], r["model"]["optimizer"]["init_args"]["lr"]
        if reid:
            assert opt["class_path"] == "torch.optim.SGD" and lr == 0.008, stem
            assert r["data"]["sampler"] == "pk" and r["data"]["batch_size"] == 64, stem
        else:
            # the paper's rule, 5e-4 / 512 x batch, computed from the global batch at fit time
            assert lr == 5e-4 and r["model"]["lr_batch"] == 512, stem
            assert init["w_lr"] == 1e-3, stem
            assert (r["data"]["img_size"], r["data"]["resize_size"]) == (448, 550), stem
        if not stem.endswith("_baseline"):
            twin = by_stem[f"{stem}_baseline"]
            mk = dict(twin["model"]["model"]["init_args"])
            assert mk.pop("glca") is False and mk.pop("pwca") is False, stem
            assert mk == init, stem
            assert {**twin, "model": None} == {**r, "model": None}, stem
