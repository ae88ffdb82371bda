"""DALG: every module against a direct slow reference, plus the model contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import InputError
from finegrain import create_model, list_models
from finegrain.models.dalg import (DALG, CrossAttentionFusion, OrthogonalFusion,
                                   SpatialAttention2d, WindowAttentionBlock)
from finegrain.models.registry import registry_name

TINY = dict(depth=4, embed_dim=64, num_heads=4, patch_size=8)


def tiny(**kw) -> DALG:
    args = dict(num_classes=7, img_size=64, global_dim=64, local_dim=64, embedding_dim=32,
                window_size=4, fusion_heads=4, backbone_kwargs=TINY)
    args.update(kw)
    return create_model("dalg_deit_tiny_patch16_224", **args)


# ---------------------------------------------------------------- window attention
def _window_attention_reference(block: WindowAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Explicit loop: every image, every window, every head; only real (unpadded) tokens."""
    attn = block.attn
    B, H, W, C = x.shape
    ws, nh = block.window_size, attn.num_heads
    D = C // nh
    table = attn.relative_position_bias_table  # ((2ws-1)^2, nh)
    out = torch.zeros_like(x)
    for b in range(B):
        for r0 in range(0, H, ws):
            for c0 in range(0, W, ws):
                pos = [(r, c) for r in range(r0, min(r0 + ws, H))
                       for c in range(c0, min(c0 + ws, W))]
                toks = torch.stack([x[b, r, c] for r, c in pos])  # (n, C)
                qkv = toks @ attn.qkv.weight.t() + attn.qkv.bias  # (n, 3C)
                heads = []
                for h in range(nh):
                    q = qkv[:, h * D:(h + 1) * D]
                    k = qkv[:, C + h * D:C + (h + 1) * D]
                    v = qkv[:, 2 * C + h * D:2 * C + (h + 1) * D]
                    logits = torch.empty(len(pos), len(pos))
                    for i, (ri, ci) in enumerate(pos):
                        for j, (rj, cj) in enumerate(pos):
                            dr = (ri - r0) - (rj - r0) + ws - 1
                            dc = (ci - c0) - (cj - c0) + ws - 1
                            bias = table[dr * (2 * ws - 1) + dc, h]
                            logits[i, j] = (q[i] @ k[j]) / math.sqrt(D) + bias
                    heads.append(torch.softmax(logits, dim=1) @ v)
                o = torch.cat(heads, dim=1) @ attn.proj.weight.t() + attn.proj.bias
                for i, (r, c) in enumerate(pos):
                    out[b, r, c] = o[i]
    return out


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])
def test_window_attention_matches_per_window_loop(hw):
    block = WindowAttentionBlock(dim=16, num_heads=2, window_size=4).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 0.5)  # make the bias matter
    x = torch.randn(2, *hw, 16)
    got = block.window_attention(x)
    ref = _window_attention_reference(block, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_window_attention_is_local_and_padding_free():
    """A change in one window leaves the other windows unchanged; padded maps match the
    unpadded computation (tested above) and the block is residual."""
    block = WindowAttentionBlock(dim=16, num_heads=2, window_size=4).eval()
    x = torch.randn(1, 8, 8, 16)
    y = x.clone()
    y[0, 0, 0] += 5.0  # top-left window only
    dx, dy = block(x), block(y)
    assert not torch.allclose(dx[0, :4, :4], dy[0, :4, :4])
    torch.testing.assert_close(dx[0, 4:], dy[0, 4:])
    torch.testing.assert_close(dx[0, :4, 4:], dy[0, :4, 4:])


# ---------------------------------------------------------------- spatial attention
def test_spatial_attention_formula():
    sa = SpatialAttention2d(in_dim=6, dim=5).eval()
    with torch.no_grad():
        sa.bn.running_mean.normal_()
        sa.bn.running_var.uniform_(0.5, 2.0)
        sa.bn.weight.normal_()
        sa.bn.bias.normal_()
    x = torch.randn(2, 6, 3, 4)
    got, att = sa(x)
    W1, b1 = sa.conv1.weight[:, :, 0, 0], sa.conv1.bias
    W2, b2 = sa.conv2.weight[:, :, 0, 0], sa.conv2.bias
    bn = sa.bn
    for b in range(2):
        for i in range(3):
            for j in range(4):
                f = W1 @ x[b, :, i, j] + b1
                f = (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                f = f * bn.weight + bn.bias
                a = torch.log1p(torch.exp(W2 @ torch.relu(f) + b2))  # softplus
                torch.testing.assert_close(att[b, 0, i, j], a[0], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(got[b, :, i, j], a * f / f.norm(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- fusions
def test_cross_attention_fusion_matches_explicit_softmax():
    fus = CrossAttentionFusion(global_dim=12, local_dim=10, num_heads=3)
    fg, fl = torch.randn(2, 12), torch.randn(2, 10, 3, 5)
    out = fus(fg, fl)
    _, attn = fus.attend(fg, fl)
    assert out.shape == (2, 24) and attn.shape == (2, 3, 15)
    D = 4
    for b in range(2):
        q = fus.q(fg[b])  # (12,)
        toks = fl[b].flatten(1).t()  # (15, 10)
        kv = fus.kv(toks)  # (15, 24)
        K, V = kv[:, :12], kv[:, 12:]
        heads = []
        for h in range(3):
            s = torch.stack([q[h * D:(h + 1) * D] @ K[n, h * D:(h + 1) * D] for n in range(15)])
            a = torch.softmax(s / math.sqrt(D), 0)
            torch.testing.assert_close(attn[b, h], a, atol=1e-6, rtol=1e-5)
            heads.append(sum(a[n] * V[n, h * D:(h + 1) * D] for n in range(15)))
        attended = fus.proj(torch.cat(heads))
        torch.testing.assert_close(out[b], torch.cat([fg[b], attended]), atol=1e-5, rtol=1e-5)


def test_orthogonal_fusion_matches_explicit_projection_removal():
    fus = OrthogonalFusion(global_dim=6)
    fg, fl = torch.randn(2, 6), torch.randn(2, 6, 3, 2)
    out = fus(fg, fl)
    for b in range(2):
        orth = []
        for i in range(3):
            for j in range(2):
                v = fl[b, :, i, j]
                o = v - (v @ fg[b]) / (fg[b] @ fg[b]) * fg[b]
                assert abs(float(o @ fg[b])) < 1e-5
                orth.append(o)
        torch.testing.assert_close(out[b], torch.cat([fg[b], torch.stack(orth).mean(0)]),
                                   atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the model
def test_registry_names():
    assert {"dalg_vit_base_patch16_224", "dalg_vit_small_patch16_224",
            "dalg_deit_tiny_patch16_224"} <= set(list_models("dalg*"))


@pytest.mark.parametrize("fusion,local", [("cross_attention", "window_attention"),
                                          ("orthogonal", "window_attention"),
                                          ("none", "none")])
def test_forward_backward_contract(fusion, local):
    model = tiny(fusion=fusion, local=local).train()
    x, y = torch.randn(3, 3, 64, 48), torch.tensor([0, 3, 6])
    out = model(x, targets=y)
    assert out["embedding"].shape == (3, 32) and out["logits"].shape == (3, 7)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    assert set(out["losses"]) == {"arcface"} and out["losses"]["arcface"].dtype == torch.float32
    out["losses"]["arcface"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_logits_are_scaled_cosines_without_margin():
    model = tiny(embedding_dim=24, arcface_s=30.0).eval()
    x = torch.randn(2, 3, 40, 64)  # any size and aspect ratio
    with torch.no_grad():
        out = model(x)
    assert out["embedding"].shape == (2, 24)
    w = F.normalize(model.head.weight, dim=1)
    torch.testing.assert_close(out["logits"], 30.0 * out["embedding"] @ w.t(), atol=1e-4, rtol=1e-4)


def test_global_branch_is_the_timm_class_token():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = model.global_proj(model.backbone.forward_features(x)[:, 0])
        inter = model.backbone.forward_intermediates(x, indices=[model.local_block],
                                                     intermediates_only=True)[0]
    torch.testing.assert_close(ours["global"], ref)
    assert model.local_block == 1  # 2 * 4 // 3 - 1
    # local branch input = the timm intermediate of that block (NCHW)
    tokens = model.window_block(inter.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours["local"], model.spatial_attention(tokens)[0])


def test_local_block_and_invalid_combinations():
    assert tiny(local_block=-1).local_block == 3
    with pytest.raises(ValueError, match="fusion"):
        tiny(local="none", fusion="cross_attention")
    with pytest.raises(ValueError, match="local_dim == global_dim"):
        tiny(fusion="orthogonal", local_dim=32)
    with pytest.raises(ValueError, match="outside"):
        tiny(local_block=9)


def test_explain_maps_are_raw_and_of_the_query():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 40)
    out = model.explain(x)
    assert [m.name for m in out] == ["spatial_attention", "fusion_attention"]
    for m in out:
        assert m.image == "query" and m.map.shape == (2, 8, 5) and torch.isfinite(m.map).all()
    with torch.no_grad():
        raw = model.forward_features(x)["spatial_attention"][:, 0]
    torch.testing.assert_close(out[0].map, raw)  # not min-max scaled
    assert tiny(local="none", fusion="none").eval().explain(torch.randn(1, 3, 32, 32)) == []
    assert not model.pairwise_explain
    with pytest.raises(InputError, match="pair-wise"):
        model.explain(x, pair=x)


def test_pretrained_backbone_file_loads_into_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file
    ref = timm.create_model("deit_tiny_patch16_224", num_classes=0, img_size=64, **TINY)
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    model = create_model("dalg_deit_tiny_patch16_224", pretrained=str(tmp_path / "vit.safetensors"),
                         num_classes=7, img_size=64, global_dim=64, local_dim=64,
                         embedding_dim=32, window_size=4, fusion_heads=4, backbone_kwargs=TINY)
    torch.testing.assert_close(model.backbone.blocks[2].attn.qkv.weight,
                               ref.blocks[2].attn.qkv.weight)


def test_recipes_build_and_twins_differ_only_in_the_branches():
    import yaml
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "recipes" / "dalg"
    recipes = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"gldv2_vit_base", "gldv2_vit_base_baseline",
                                         "gldv2_vit_small", "gldv2_vit_small_baseline"}
    for path in recipes:
        cfg = yaml.safe_load(path.read_text())
        name, kw = registry_name(cfg["model"]["model"])
        assert name in list_models("dalg*"), path.name
        assert cfg["data"]["dataset"] == "gldv2" and cfg["data"]["img_size"] == 512
        opt = cfg["model"]["optimizer"]
        assert opt["class_path"] == "torch.optim.SGD" and opt["init_args"]["lr"] == 0.01
        # the recipe's arguments build the model (tiny backbone to stay fast)
        model = create_model(name, num_classes=3,
                             **{**kw, "img_size": 64, "backbone_kwargs": TINY})
        assert model.embedding_dim == 512 and model.head.s == 30.0 and model.head.m == 0.15
        if path.stem.endswith("_baseline"):
            twin = yaml.safe_load((folder / f"{path.stem[:-9]}.yaml").read_text())
            kw_twin = registry_name(twin["model"]["model"])[1]
            assert (kw.pop("local"), kw.pop("fusion")) == ("none", "none")
            assert (kw_twin.pop("local"), kw_twin.pop("fusion")) == ("window_attention",
                                                                     "cross_attention")
            local_only = ("local_dim", "window_size", "fusion_heads")
            assert {k: v for k, v in kw_twin.items() if k not in local_only} == kw
            for key in ("model", "data", "trainer"):
                a, b = dict(cfg[key]), dict(twin[key])
                if key == "model":
                    a["model"] = b["model"] = None
                assert a == b, (path.name, key)


def test_no_weight_decay_names_exist():
    model = tiny()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"backbone.pos_embed", "backbone.cls_token",
            "window_block.attn.relative_position_bias_table"} <= names
    assert names <= set(params)


def test_grad_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(2, 3, 32, 40), torch.tensor([1, 2])
    grads = []
    for ck in (False, True):
        torch.manual_seed(0)
        model = tiny(drop_path_rate=0.0).train()
        model.set_grad_checkpointing(ck)
        model(x, targets=y)["losses"]["arcface"].backward()
        grads.append(model.backbone.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_window_block_exported_at_one_grid_pads_every_other(tmp_path):
    """An ONNX graph exported with dynamic height / width masks the padded tokens at every
    grid, also when the example grid needed no padding: the mask used to be traced away, and
    DALG's local features differed from eager by 0.1 at 6 x 5 tokens (window 4)."""
    import contextlib
    import io

    import onnxruntime as ort

    from finegrain.models.dalg import WindowAttentionBlock
    torch.manual_seed(0)
    blk = WindowAttentionBlock(dim=16, num_heads=2, window_size=4).eval()
    auto = torch.export.Dim.AUTO
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(blk, (torch.randn(1, 8, 8, 16),), dynamo=True,
                                 dynamic_shapes=({1: auto, 2: auto},))
    prog.save(str(tmp_path / "w.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "w.onnx"))
    for h, w in ((8, 8), (6, 5), (5, 8), (3, 3)):
        x = torch.randn(1, h, w, 16)
        with torch.no_grad():
            want = blk(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert abs(got - want).max() < 1e-5, (h, w, abs(got - want).max())
