"""Cross-image attention DML (models/cross_image.py), tiny backbones at 32 px.

The batched conditional embeddings (both hierarchies, with and without the query residual)
are compared with a per-pair loop that spells the multi-head attention and the levels out;
each mechanism's input is shown to move its output; S's symmetry, both gradient paths, the
test-time path (no cross-attention call, baseline FLOPs), the default width's FLOPs at the
recipes' batch, the recipes' optimizer groups making the conditional loss fall on generated
data, the registry smoke test, pictures and chunked re-ranking.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import yaml
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from finegrain import create_model, list_models
from finegrain.errors import InputError
from finegrain.models.cross_image import CrossAttentionLayer, CrossImageDML, conditional_rerank
from finegrain.models.explain import AttentionMap
from finegrain.models.registry import registry_name
from finegrain.models.tiny import TEST_RESNET
from finegrain.models.weights import load_pretrained

VIT_TINY = dict(depth=2, embed_dim=64, num_heads=4, patch_size=8)
TINY = {
    "cross_image_resnet18": dict(embedding_dim=32, num_heads=4),
    "cross_image_resnet50": dict(embedding_dim=32, num_heads=4),
    "cross_image_vit_small_patch16_224": dict(embedding_dim=32, num_heads=4, img_size=32,
                                              backbone_kwargs=VIT_TINY),
    "cross_image_deit_tiny_patch16_224": dict(embedding_dim=32, num_heads=4, img_size=32,
                                              backbone_kwargs=VIT_TINY),
}
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "dml"
VIT = "cross_image_deit_tiny_patch16_224"  # 16 patch tokens at 32 px (the tiny ResNet has 1)


def _model(name="cross_image_resnet18", **kw):
    return create_model(name, **{**TINY[name], **kw})


def _images(n=len(LABELS), size=32):
    return torch.randn(n, 3, size, size)


# -- reference: one pair at a time, attention written out per head ---------------------------------
def ref_layer(layer: CrossAttentionLayer, q: torch.Tensor, kv: torch.Tensor,
              residual: bool = True) -> torch.Tensor:
    """q (D,), kv (N, D): a = proj(concat_h softmax(k_h q_h / sqrt(d)) v_h); q' = q + a (or a
    without the residual); q' + MLP(LN(q'))."""
    D = q.shape[0]
    H, hd = layer.num_heads, layer.head_dim
    Q = layer.q(layer.norm_q(q))  # (D,)
    KV = layer.kv(layer.norm_kv(kv))  # (N, 2D)
    K, V = KV[:, :D], KV[:, D:]
    heads = []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(K[:, sl] @ Q[sl] / math.sqrt(hd), dim=0)  # (N,)
        heads.append(a @ V[:, sl])
    a = layer.proj(torch.cat(heads))
    q = q + a if residual else a
    return q + layer.mlp(layer.norm_mlp(q))


def ref_pair(model, tokens_i, tokens_j, z_i, z_j):
    """(c_{i|j}, c_{j|i}) for one pair, level by level: q^0_{i|j} = W_q z_j; level l reads
    T_i with q^{l-1}_{i|j} (stack) or, for l >= 2, the partner's q^{l-1}_{j|i} (mutual)."""
    cross = model.cross
    kv_i, kv_j = cross.token_proj(tokens_i), cross.token_proj(tokens_j)
    q_ij, q_ji = cross.query_proj(z_j), cross.query_proj(z_i)
    for level, layer in enumerate(cross.layers):
        if level > 0 and cross.hierarchy == "mutual":
            q_ij, q_ji = q_ji, q_ij
        res = level > 0 or cross.query_residual
        q_ij, q_ji = ref_layer(layer, q_ij, kv_i, res), ref_layer(layer, q_ji, kv_j, res)

    def out(q):
        return F.normalize(cross.out_proj(cross.norm(q)), dim=-1)
    return out(q_ij), out(q_ji)


def _c_s(model, x):
    """c (B, B, E) and S (B, B) of a batch."""
    feats = model.forward_features(x)
    z = model.forward_head(feats)
    c = model.conditional_embeddings(feats, z)
    return c, model.pair_similarity(c, z)


@pytest.mark.parametrize("query_residual", [True, False])
@pytest.mark.parametrize("hierarchy", ["stack", "mutual"])
@pytest.mark.parametrize("name", ["cross_image_resnet18", VIT])
def test_conditional_embeddings_equal_per_pair_reference(name, hierarchy, query_residual):
    model = _model(name, depth=3, hierarchy=hierarchy, query_residual=query_residual).eval()
    with torch.no_grad():
        feats = model.forward_features(_images())
        z = model.forward_head(feats)
        c = model.conditional_embeddings(feats, z)  # (B_i, B_j, E)
        patches = model.patch_tokens(feats)
        B = len(z)
        assert c.shape == (B, B, model.embedding_dim)
        for i in range(B):
            for j in range(i, B):
                c_ij, c_ji = ref_pair(model, patches[i], patches[j], z[i], z[j])
                torch.testing.assert_close(c[i, j], c_ij, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(c[j, i], c_ji, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c[0, 1], c[1, 0])  # conditioning matters


def test_mutual_needs_the_batch_as_its_own_partners_and_names_unknown_hierarchies():
    model = _model(hierarchy="mutual")
    tokens = torch.randn(3, 1, model.backbone.num_features)
    with pytest.raises(ValueError, match="same 3 images"):
        model.cross(tokens, torch.randn(2, 32))
    with pytest.raises(ValueError, match="pairs"):
        model.cross(tokens, torch.randn(3, 1, 32))
    with pytest.raises(ValueError, match="'stack' or 'mutual'"):
        _model(hierarchy="ladder")


# -- each mechanism's input moves its output -------------------------------------------------------
@pytest.mark.parametrize("hierarchy", ["stack", "mutual"])
def test_changing_the_partner_changes_c_and_s_and_nothing_else(hierarchy):
    """Replace image j = 3: c_{i|3}, c_{3|i} and s_i3 change; pairs without image 3 do not."""
    torch.manual_seed(0)
    model = _model(VIT, hierarchy=hierarchy).eval()
    x = _images()
    x2 = x.clone()
    x2[3] = torch.randn(3, 32, 32)
    with torch.no_grad():
        (c, S), (c2, S2) = _c_s(model, x), _c_s(model, x2)
    others = [i for i in range(len(x)) if i != 3]
    for i in others:
        assert (c2[i, 3] - c[i, 3]).norm() > 1e-3  # c_{i|j} moves with its partner
        assert abs(S2[i, 3] - S[i, 3]) > 1e-4
    keep = torch.tensor(others)
    torch.testing.assert_close(c2[keep][:, keep], c[keep][:, keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("hierarchy", ["stack", "mutual"])
def test_mutual_level_reads_the_partners_previous_level(hierarchy):
    """Hold z fixed and change only image j's tokens: that changes the partner's level-1
    c_{j|i} and nothing else that c_{i|j} reads in ``stack``. So c_{i|j} moves in ``mutual``
    (its level-2 query is c_{j|i}) and is bit-identical in ``stack``."""
    torch.manual_seed(0)
    model = _model(VIT, hierarchy=hierarchy).eval()
    with torch.no_grad():
        patches = model.patch_tokens(model.forward_features(_images()))
        z = torch.nn.functional.normalize(torch.randn(len(patches), 32), dim=-1)
        c = model.cross(patches, z)
        moved = patches.clone()
        moved[3] += torch.randn_like(moved[3])
        c2 = model.cross(moved, z)
    delta = (c2[:, 3] - c[:, 3]).norm(dim=-1)  # c_{i|3}, i = 0..5
    if hierarchy == "mutual":
        assert (delta[[0, 1, 2, 4, 5]] > 1e-3).all()
    else:
        assert torch.equal(c2[[0, 1, 2, 4, 5], 3], c[[0, 1, 2, 4, 5], 3])
    assert (c2[3] - c[3]).norm(dim=-1).min() > 1e-3  # c_{3|j} reads image 3 in both


@pytest.mark.parametrize("query_residual", [True, False])
def test_query_residual_decides_whether_c_carries_the_partners_z(query_residual):
    """One layer over ONE token (the 32 px ResNet's 1x1 map): attention weights are 1 whatever
    the query, so z_j reaches c_{i|j} only through the residual."""
    model = _model(depth=1, query_residual=query_residual).eval()
    with torch.no_grad():
        tokens = model.patch_tokens(model.forward_features(_images()))
        assert tokens.shape[1] == 1
        z = torch.nn.functional.normalize(torch.randn(len(tokens), 32), dim=-1)
        z2 = z.clone()
        z2[2] = torch.nn.functional.normalize(torch.randn(32), dim=0)
        c, c2 = model.cross(tokens, z), model.cross(tokens, z2)
    delta = (c2[:, 2] - c[:, 2]).norm(dim=-1)
    if query_residual:
        assert (delta > 1e-3).all()
    else:
        assert delta.max() < 1e-6


def test_similarity_symmetric_by_default_and_asymmetric_option_matches_loop():
    model = _model().eval()
    with torch.no_grad():
        feats = model.forward_features(_images())
        z = model.forward_head(feats)
        c = model.conditional_embeddings(feats, z)
        S = model.pair_similarity(c, z)
        assert torch.equal(S, S.T)
        B = len(z)
        ref = torch.tensor([[F.cosine_similarity(c[i, j], c[j, i], dim=0).item()
                             for j in range(B)] for i in range(B)])
        torch.testing.assert_close(S, ref, atol=1e-5, rtol=1e-5)
        model.asymmetric = True
        Sa = model.pair_similarity(c, z)
        ref_a = torch.tensor([[F.cosine_similarity(c[i, j], z[j], dim=0).item()
                               for j in range(B)] for i in range(B)])
        torch.testing.assert_close(Sa, ref_a, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(Sa, Sa.T)


def test_explicit_attention_equals_fused_sdpa():
    layer = CrossAttentionLayer(32, num_heads=4)
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    out, attn = layer(q, kv, return_attn=True)
    torch.testing.assert_close(out, layer(q, kv), rtol=1e-5, atol=1e-6)
    assert attn.shape == (3, 4, 5, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 5))


def _backbone_grad_norm(model):
    return sum(p.grad.abs().sum().item() for p in model.backbone.parameters()
               if p.grad is not None)


@pytest.mark.parametrize("name", ["cross_image_resnet18", "cross_image_deit_tiny_patch16_224"])
def test_gradients_reach_the_backbone_through_both_losses(name):
    model = _model(name).train()
    out = model(_images(), targets=LABELS)
    assert set(out["losses"]) == {"dml", "cond"}
    out["losses"]["cond"].backward(retain_graph=True)
    assert _backbone_grad_norm(model) > 0
    assert model.cross.layers[0].kv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out["losses"]["dml"].backward()
    assert _backbone_grad_norm(model) > 0
    assert all(p.grad is None for p in model.cross.parameters())


def test_conditional_loss_reaches_the_feature_map_through_keys_and_values():
    """With the query detached, the conditional loss still moves the backbone: the direct path
    from the loss to the feature map that the paper argues for."""
    model = _model().train()
    feats = model.forward_features(_images())
    z = model.forward_head(feats).detach()
    S = model.pair_similarity(model.conditional_embeddings(feats, z), z)
    model.cond_loss(S, LABELS).backward()
    assert _backbone_grad_norm(model) > 0


def test_test_time_path_never_calls_the_cross_attention():
    model = _model()
    calls = []
    for m in model.cross.modules():
        m.register_forward_hook(lambda *_: calls.append(1))
    x = _images()
    model.eval()
    with torch.no_grad():
        out = model(x)
        out_t = model(x, targets=LABELS)
    assert calls == []
    assert set(out) == {"embedding"} and set(out_t["losses"]) == {"dml"}
    model.train()
    model(x)  # no targets: the embedding only
    assert calls == []
    model(x, targets=LABELS)
    assert len(calls) > 0


def _flops(model, x):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    return counter.get_total_flops()


def test_test_time_flops_and_outputs_equal_the_baseline():
    torch.manual_seed(0)
    model = _model().eval()
    torch.manual_seed(0)
    base = _model(cross_attention=False).eval()
    assert base.cross is None and base.cond_loss is None
    assert not any("cross" in n for n, _ in base.named_parameters())
    extra = sum(p.numel() for p in model.cross.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in base.parameters()) == n_params - extra
    base.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("cross.")})
    x = _images()
    assert _flops(model, x) == _flops(base, x) > 0
    torch.testing.assert_close(model(x)["embedding"], base(x)["embedding"])
    base.train()
    assert set(base(x, targets=LABELS)["losses"]) == {"dml"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_registry_forward_backward_every_param_gets_a_grad(name):
    assert name in list_models("cross_image*")
    model = _model(name).train()
    out = model(_images(), targets=LABELS)
    emb = out["embedding"]
    assert emb.shape == (len(LABELS), 32) and "logits" not in out
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(LABELS)))
    total = sum(out["losses"].values())
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in out["logs"].values())
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all(), n


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics():
    model = _model().train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    model(_images(), targets=LABELS)
    assert torch.equal(before, bns[0].running_mean)
    free = _model(freeze_bn=False).train()
    assert all(m.training for m in free.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_autocast_keeps_embeddings_losses_and_similarities_fp32():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images(), targets=LABELS)
    assert out["embedding"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out["losses"].values())


def test_proxy_loss_on_z_with_pair_loss_on_s():
    model = _model(loss="proxy_anchor", num_classes=3, cond_loss="contrastive",
                   miner="multi_similarity").train()
    out = model(_images(), targets=LABELS)
    sum(out["losses"].values()).backward()
    assert model.loss.loss.proxies.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pair-based"):
        _model(cond_loss="proxy_anchor", num_classes=3)


def test_cond_weight_scales_the_logged_raw_value():
    model = _model(cond_weight=0.25).train()
    out = model(_images(), targets=LABELS)
    torch.testing.assert_close(out["losses"]["cond"].detach(), 0.25 * out["logs"]["cond"])
    assert {"cond_sim_pos", "cond_sim_neg"} <= set(out["logs"])


def test_no_weight_decay_names_vit_embeddings():
    model = _model("cross_image_deit_tiny_patch16_224")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"backbone.pos_embed", "backbone.cls_token"} <= names
    assert all(n in params for n in names if n in ("backbone.pos_embed", "backbone.cls_token"))
    assert _model().no_weight_decay() == set()


def test_timm_backbone_weights_load_by_key_name(tmp_path):
    from safetensors.torch import save_file
    ref = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = _model()
    report = load_pretrained(model, str(path))
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight)


@pytest.mark.parametrize("hierarchy", ["stack", "mutual"])
@pytest.mark.parametrize("name", ["cross_image_resnet18", "cross_image_deit_tiny_patch16_224"])
def test_explain_maps_are_tagged_with_their_image(name, hierarchy):
    model = _model(name, hierarchy=hierarchy).eval()
    assert model.pairwise_explain
    x, p = _images(2), _images(2)
    out = model.explain(x, pair=p)
    assert all(isinstance(m, AttentionMap) for m in out)
    maps = {m.name: m.map for m in out}
    h = 1 if "resnet" in name else 4
    assert {"activation", "cross_attention", "cross_attention_layer0",
            "cross_attention_layer1", "cross_attention_reverse"} <= set(maps)
    for m in maps.values():
        assert m.shape[0] == 2 and m.ndim == 3 and torch.isfinite(m).all()
    assert maps["cross_attention"].shape == (2, h, h)
    # the reverse map is image b's query over pair b's tokens: it lies over the pair image
    assert {m.name for m in out if m.image == "pair"} == {"cross_attention_reverse"}
    assert [m.name for m in model.explain(x)] == ["activation", "self_attention"]
    baseline = _model(name, cross_attention=False)
    assert not baseline.pairwise_explain
    assert [m.name for m in baseline.explain(x)] == ["activation"]
    with pytest.raises(InputError, match="pair-wise"):
        baseline.explain(x, pair=p)


def test_explain_reverse_map_is_drawn_over_the_pair_image(tmp_path, monkeypatch):
    """The reverse map (image b's query over pair b's tokens) is tagged as the pair's and
    ``save_explain`` overlays it on the pair image, every other map on the query image."""
    from finegrain import visualize
    model = _model("cross_image_deit_tiny_patch16_224").eval()
    x, p = _images(1), torch.full((1, 3, 32, 32), 2.0)  # the pair image: a flat, bright one
    out = model.explain(x, pair=p)
    rev = next(m for m in out if m.name == "cross_attention_reverse")
    assert rev.image == "pair" and rev.map.shape == (1, 4, 4)
    drawn = []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes
    orig = matplotlib.axes.Axes.imshow

    def spy(ax, arr, *a, **kw):
        drawn.append((np.asarray(arr).copy(), kw.get("cmap")))
        return orig(ax, arr, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    visualize.save_explain(x, out, str(tmp_path / "pair.png"), (0.5,) * 3, (0.5,) * 3,
                           pair_images=p)
    pair_base = visualize.denormalize(p, (0.5,) * 3, (0.5,) * 3)[0]
    query_base = visualize.denormalize(x, (0.5,) * 3, (0.5,) * 3)[0]
    # every heat map is drawn over a base picture; the one before the reverse map's heat map
    # is the pair image
    heat_idx = [i for i, d in enumerate(drawn) if d[1] == "jet"]
    assert len(heat_idx) == len(out)
    for m, i in zip(out, heat_idx):
        name, base = m.name, drawn[i - 1][0]
        want = pair_base if name == "cross_attention_reverse" else query_base
        np.testing.assert_allclose(base, want)


def test_explain_cross_attention_is_the_pair_query_over_image_tokens():
    """Where image b is looked at when conditioned on pair b: recompute it by hand."""
    model = _model("cross_image_deit_tiny_patch16_224").eval()
    x, p = _images(2), _images(2)
    maps = {m.name: m.map for m in model.explain(x, pair=p)}
    with torch.no_grad():
        kv = model.cross.token_proj(model.patch_tokens(model.forward_features(x)))
        q = model.cross.query_proj(model.forward_head(model.forward_features(p)))[:, None]
        _, attn = model.cross.layers[0](q, kv, return_attn=True)  # (B, H, 1, N)
    a = attn.mean(1)[:, 0]  # raw: the model does not scale it
    torch.testing.assert_close(maps["cross_attention_layer0"], a.reshape(2, 4, 4))


@pytest.mark.parametrize("hierarchy", ["stack", "mutual"])
def test_conditional_rerank_scores_equal_pairwise_conditional_similarity(hierarchy):
    model = _model(VIT, hierarchy=hierarchy).eval()
    with torch.no_grad():
        q_tok = model.forward_features(_images(2))
        db_tok = model.forward_features(_images(5))
    topk = torch.tensor([[4, 0, 2], [1, 3, 0]])
    scores, ids = conditional_rerank(model, q_tok, db_tok, topk)
    assert scores.shape == ids.shape == (2, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    with torch.no_grad():
        for qi in range(2):
            assert sorted(ids[qi].tolist()) == sorted(topk[qi].tolist())
            for r in range(3):
                n = ids[qi, r].item()
                feats = torch.cat([q_tok[qi:qi + 1], db_tok[n:n + 1]])
                z = model.forward_head(feats)
                S = model.pair_similarity(model.conditional_embeddings(feats, z), z)
                assert scores[qi, r].item() == pytest.approx(S[0, 1].item(), abs=1e-5)
    with pytest.raises(ValueError, match="cross_attention"):
        _model(cross_attention=False).conditional_similarity(q_tok, db_tok[None, :2])


class _CountingRows:
    """A database that records how many token maps each read gathers."""

    def __init__(self, tokens):
        self.tokens, self.shape, self.reads = tokens, tokens.shape, []

    def __getitem__(self, ids):
        self.reads.append(len(ids))
        return self.tokens[ids]


@pytest.mark.parametrize("mix", [1.0, 0.5])
def test_conditional_rerank_chunks_are_identical_and_bounded(mix):
    """7 queries x top-3: every chunk size gives the unchunked result; at most chunk_size * k
    token maps are gathered at once; a numpy (memory-mappable) database works too."""
    torch.manual_seed(0)
    model = _model(VIT, hierarchy="mutual").eval()
    with torch.no_grad():
        q_tok = model.forward_features(_images(7))
        db_tok = model.forward_features(_images(9))
    topk = torch.stack([torch.randperm(9)[:3] for _ in range(7)])
    full = conditional_rerank(model, q_tok, db_tok, topk, mix=mix, chunk_size=7)
    for chunk in (1, 2, 3, 100):
        db = _CountingRows(db_tok)
        scores, ids = conditional_rerank(model, q_tok, db, topk, mix=mix, chunk_size=chunk)
        torch.testing.assert_close(scores, full[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(ids, full[1])
        assert max(db.reads) == min(chunk, 7) * 3 and sum(db.reads) == 7 * 3
    scores, ids = conditional_rerank(model, q_tok, db_tok.numpy(), topk, mix=mix, chunk_size=2)
    torch.testing.assert_close(scores, full[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        conditional_rerank(model, q_tok, db_tok, topk, chunk_size=0)


# -- precision of the distance-based conditional losses near s_ij = 1 ------------------------------
def _close_pair_c(dtype, d=8e-4, B=4, E=32):
    """c (B, B, E), unit rows, with c_{0|1} and c_{1|0} at chord distance d (float64 made)."""
    g = torch.Generator().manual_seed(0)
    c = F.normalize(torch.randn(B, B, E, dtype=torch.float64, generator=g), dim=-1)
    t = torch.randn(E, dtype=torch.float64, generator=g)
    t = F.normalize(t - (t @ c[0, 1]) * c[0, 1], dim=0)
    th = 2 * math.asin(d / 2)
    c[1, 0] = math.cos(th) * c[0, 1] + math.sin(th) * t
    return (c * 1.3).to(dtype).requires_grad_(True)  # off the sphere: the radial part cancels


def test_distance_losses_get_the_exact_gradient_near_s_equal_1():
    """Contrastive cond loss (a positive pair at d = 8e-4, where sqrt(2 - 2 S) from an fp32 S is
    off by 10-30 %): the model's path (d from the vectors' difference) matches float64."""
    model = _model(cond_loss="contrastive")
    labels = torch.tensor([0, 0, 1, 1])
    grads = {}
    for dtype in (torch.float64, torch.float32):
        c_raw = _close_pair_c(dtype)
        c = F.normalize(c_raw, dim=-1)
        z = c[:, 0]  # unused by the symmetric reading
        S, D = model.pair_similarity(c, z), model.pair_distance(c, z)
        assert D[0, 1].item() == pytest.approx(8e-4, rel=1e-3)
        model.cond_loss(S, labels, dist=D).backward()
        grads[dtype] = c_raw.grad.double()
    err = (grads[torch.float32] - grads[torch.float64]).norm() / grads[torch.float64].norm()
    assert err < 1e-4
    assert grads[torch.float64][0, 1].norm() > 0.1  # the close pair does pull


def test_forward_passes_exact_distances_to_distance_losses_only():
    torch.manual_seed(0)
    x = _images()
    for cond_loss, reads in (("contrastive", True), ("multi_similarity", False)):
        model = _model(VIT, cond_loss=cond_loss).train()
        assert model.cond_loss.reads_distance is reads
        torch.manual_seed(1)
        out = model(x, targets=LABELS)
        feats = model.forward_features(x)
        z = model.forward_head(feats)
        c = model.conditional_embeddings(feats, z)
        S, D = model.pair_similarity(c, z), model.pair_distance(c, z)
        # reference: a per-pair loop in float64 on the vectors' difference. sqrt(2 - 2 s) is
        # no reference: c is unit only to 1e-7 in fp32, so near s = 1 it is 4.5e-4 off even in
        # float64 (the rounding pair_distance avoids)
        c64 = c.detach().double()
        ref = torch.stack([torch.stack([torch.linalg.vector_norm(c64[i, j] - c64[j, i])
                                        for j in range(len(c64))]) for i in range(len(c64))])
        assert not model.asymmetric and ref.diagonal().abs().max() == 0
        torch.testing.assert_close(D.double(), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out["logs"]["cond"], model.cond_loss(S, LABELS, dist=D))


# -- cost of the default width at the recipes' batch -----------------------------------------------
def _meta_train_flops(cross_attention: bool, batch: int = 112) -> int:
    with torch.device("meta"):
        model = create_model("cross_image_resnet50", cross_attention=cross_attention).train()
        x = torch.randn(batch, 3, 224, 224)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        feats = model.forward_features(x)
        z = model.forward_head(feats)
        total = z.sum()
        if cross_attention:
            total = total + model.pair_similarity(model.conditional_embeddings(feats, z), z).sum()
        total.backward()
    return counter.get_total_flops()


def test_default_width_keeps_the_resnet50_branch_under_1_15x_at_batch_112():
    """FLOPs counted on the meta device (no compute): default attn_dim = min(E, 256)."""
    with torch.device("meta"):
        assert create_model("cross_image_resnet50").cross.token_proj.out_features == 256
        assert create_model("cross_image_vit_small_patch16_224").cross.token_proj.out_features \
            == 256
    assert _model().cross.token_proj.out_features == 32  # E = 32 < 256
    ratio = _meta_train_flops(True) / _meta_train_flops(False)
    assert 1.0 < ratio <= 1.15


# -- the recipes' optimizer groups train the branch ------------------------------------------------
def _generated_batch(num_classes: int = 6, per_class: int = 2, size: int = 64):
    """A fixed batch from the synthetic_dml renderer (classes differ in small parts)."""
    from finegrain.data.synthetic import class_parts, render
    imgs, labels = [], []
    for ci, parts in enumerate(class_parts(num_classes, 0)):
        for k in range(per_class):
            img, _ = render(parts, np.random.default_rng([0, ci, k]), (size, size))
            imgs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
            labels.append(ci)
    x = torch.stack(imgs)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, torch.tensor(labels)


def _cond_loss_trajectory(recipe: dict, steps: int = 40, **override) -> list[float]:
    """Train a tiny ResNet twin of ``recipe`` (its losses, miner, hierarchy and optimizer
    settings; groups built by the engine's configure_optimizers) on one fixed batch."""
    from finegrain.engine.module import FinegrainModule
    model_cfg = recipe["model"]
    kw = {**model_cfg["model"]["init_args"], "backbone": "resnet18", "embedding_dim": 32,
          "num_heads": 4, "attn_dim": 32, "backbone_kwargs": TEST_RESNET}
    opt = model_cfg["optimizer"]
    opt_cls = getattr(torch.optim, opt["class_path"].rsplit(".", 1)[1])
    hp = {k: v for k, v in model_cfg.items() if k not in ("model", "optimizer", "pretrained")}
    torch.manual_seed(0)
    module = FinegrainModule(CrossImageDML(**kw),
                             optimizer=lambda params: opt_cls(params, **opt["init_args"]),
                             **{**hp, **override})
    # 10 steps per epoch (warm-up 10 steps), a long run: the first steps of a real schedule
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(steps_per_epoch=lambda: 10),
                                      accumulate_grad_batches=1, max_epochs=100, max_steps=-1)
    opt = module.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    x, y = _generated_batch()
    model = module.model.train()
    out_traj = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: faster, and the same numbers on any machine
    try:
        for _ in range(steps):
            out = model(x, targets=y)
            optimizer.zero_grad(set_to_none=True)
            sum(out["losses"].values()).backward()
            optimizer.step()
            sched.step()
            out_traj.append(out["logs"]["cond"].item())
    finally:
        torch.set_num_threads(threads)
    return out_traj


def test_recipe_learning_rates_make_the_conditional_loss_fall():
    """cub_resnet50.yaml's groups (backbone 1e-5, branch and embedding layer x head_lr_mult):
    the conditional loss on a fixed generated batch falls clearly in 40 steps; with the whole
    model at the backbone's 1e-5 (the recipes before) it barely moves."""
    recipe = yaml.safe_load((RECIPES / "cub_resnet50.yaml").read_text())
    lr = recipe["model"]["optimizer"]["init_args"]["lr"]
    assert recipe["model"]["head_lr_mult"] * lr == pytest.approx(1e-4)
    traj = _cond_loss_trajectory(recipe)
    flat = _cond_loss_trajectory(recipe, head_lr_mult=1.0)
    first, last = traj[0], float(np.mean(traj[-5:]))
    assert last < 0.6 * first, traj
    assert float(np.mean(flat[-5:])) > 0.95 * flat[0], flat


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="divisible"):
        _model(num_heads=5)
    with pytest.raises(ValueError, match="pool"):
        _model(pool="token")
    with pytest.raises(ValueError, match="depth"):
        _model(depth=0)


def test_recipes_name_registered_models_and_twins_differ_only_in_the_branch():
    folder = RECIPES
    recipes = sorted(folder.glob("*.yaml"))
    assert len(recipes) == 16
    for path in recipes:
        cfg = yaml.safe_load(path.read_text())
        name, _ = registry_name(cfg["model"]["model"])
        assert name in list_models("cross_image*"), path.name
        assert cfg["data"]["sampler"] == "pk" and cfg["data"]["num_instances"] == 2
        if path.stem.endswith("_baseline"):
            twin = yaml.safe_load((folder / f"{path.stem[:-9]}.yaml").read_text())
            kw = cfg["model"]["model"].pop("init_args")
            kw_twin = twin["model"]["model"].pop("init_args")
            assert kw.pop("cross_attention") is False and kw_twin.pop("cross_attention") is True
            branch = ("depth", "num_heads", "attn_dim", "hierarchy", "query_residual")
            assert {k: v for k, v in kw_twin.items() if k not in branch} == kw
            assert cfg["model"] == twin["model"] and cfg["data"] == twin["data"]
            assert cfg["trainer"] == twin["trainer"]
