"""Cross-image attention DML (models/cross_image.py), tiny backbones at 32 px.

The batched conditional embeddings are compared with a per-pair loop that spells the
multi-head attention out; S's symmetry, both gradient paths, the test-time path (no
cross-attention call, baseline FLOPs), the registry smoke test, pictures and re-ranking.
"""

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from finegrain import create_model, list_models
from finegrain.models.cross_image import CrossAttentionLayer, conditional_rerank
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


def _model(name="cross_image_resnet18", **kw):
    return create_model(name, **{**TINY[name], **kw})


def _images(n=len(LABELS), size=32):
    return torch.randn(n, 3, size, size)


# -- reference: one pair at a time, attention written out per head ---------------------------------
def ref_layer(layer: CrossAttentionLayer, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """q (D,), kv (N, D): q + proj(concat_h softmax(k_h q_h / sqrt(d)) v_h); q + MLP(LN(q))."""
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
    q = q + layer.proj(torch.cat(heads))
    return q + layer.mlp(layer.norm_mlp(q))


def ref_conditional(model, tokens_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
    """c_{i|j} for one pair: tokens_i (N, C) patch tokens of image i, z_j (E,)."""
    cross = model.cross
    kv = cross.token_proj(tokens_i)
    q = cross.query_proj(z_j)
    for layer in cross.layers:
        q = ref_layer(layer, q, kv)
    return F.normalize(cross.out_proj(cross.norm(q)), dim=-1)


@pytest.mark.parametrize("name", ["cross_image_resnet18", "cross_image_deit_tiny_patch16_224"])
def test_conditional_embeddings_equal_per_pair_reference(name):
    model = _model(name).eval()
    with torch.no_grad():
        feats = model.forward_features(_images())
        z = model.forward_head(feats)
        c = model.conditional_embeddings(feats, z)  # (B_i, B_j, E)
        patches = model.patch_tokens(feats)
        B = len(z)
        assert c.shape == (B, B, model.embedding_dim)
        ref = torch.stack([torch.stack([ref_conditional(model, patches[i], z[j])
                                        for j in range(B)]) for i in range(B)])
    torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c[0, 1], c[1, 0])  # conditioning matters


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


@pytest.mark.parametrize("name", ["cross_image_resnet18", "cross_image_deit_tiny_patch16_224"])
def test_explain_maps_are_in_unit_range(name):
    model = _model(name).eval()
    x, p = _images(2), _images(2)
    maps = model.explain(x, pair=p)
    h = 1 if "resnet" in name else 4
    assert {"activation", "cross_attention", "cross_attention_layer0",
            "cross_attention_layer1", "cross_attention_reverse"} <= set(maps)
    for m in maps.values():
        assert m.shape[0] == 2 and m.ndim == 3 and m.min() >= 0 and m.max() <= 1
    assert maps["cross_attention"].shape == (2, h, h)
    assert "self_attention" in model.explain(x)
    assert set(_model(name, cross_attention=False).explain(x)) == {"activation"}


def test_explain_cross_attention_is_the_pair_query_over_image_tokens():
    """Where image b is looked at when conditioned on pair b: recompute it by hand."""
    model = _model("cross_image_deit_tiny_patch16_224").eval()
    x, p = _images(2), _images(2)
    maps = model.explain(x, pair=p)
    with torch.no_grad():
        kv = model.cross.token_proj(model.patch_tokens(model.forward_features(x)))
        q = model.cross.query_proj(model.forward_head(model.forward_features(p)))[:, None]
        _, attn = model.cross.layers[0](q, kv, return_attn=True)  # (B, H, 1, N)
    a = attn.mean(1)[:, 0]
    a = (a - a.amin(1, keepdim=True)) / (a.amax(1, keepdim=True) - a.amin(1, keepdim=True))
    torch.testing.assert_close(maps["cross_attention_layer0"], a.reshape(2, 4, 4))


def test_conditional_rerank_scores_equal_pairwise_conditional_similarity():
    model = _model().eval()
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


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="divisible"):
        _model(num_heads=5)
    with pytest.raises(ValueError, match="pool"):
        _model(pool="token")
    with pytest.raises(ValueError, match="depth"):
        _model(depth=0)


def test_recipes_name_registered_models_and_twins_differ_only_in_the_branch():
    import yaml
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "recipes" / "dml"
    recipes = sorted(folder.glob("*.yaml"))
    assert len(recipes) == 16
    for path in recipes:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["model"]["model_name"] in list_models("cross_image*"), path.name
        assert cfg["data"]["sampler"] == "pk" and cfg["data"]["num_instances"] == 2
        if path.stem.endswith("_baseline"):
            twin = yaml.safe_load((folder / f"{path.stem[:-9]}.yaml").read_text())
            kw, kw_twin = cfg["model"].pop("model_kwargs"), twin["model"].pop("model_kwargs")
            assert kw.pop("cross_attention") is False and kw_twin.pop("cross_attention") is True
            assert {k: v for k, v in kw_twin.items() if k not in ("depth", "num_heads")} == kw
            assert cfg["model"] == twin["model"] and cfg["data"] == twin["data"]
            assert cfg["trainer"] == twin["trainer"]
