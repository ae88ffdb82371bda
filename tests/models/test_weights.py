"""Weight loading (``finegrain.models.weights``) and the model registry.

Every weight file is written here from a timm / torchvision model built with
``pretrained=False``, in the format its publisher uses (timm ``.safetensors`` and ``.pth``,
DeiT's ``{"model": sd}``, DDP's ``module.`` prefix, torchvision ``.pth``, big_vision / JAX
``.npz``), then loaded through ``finegrain.create_model(..., pretrained=path)`` and checked
against the source model's own features. The registry-wide smoke test runs every baseline
classifier forward and backward with tiny backbones.
"""

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import finegrain
from finegrain.models import classifier as classifier_mod
from finegrain.models import registry as registry_mod
from finegrain.models.tiny import tiny_input_size, tiny_kwargs
from finegrain.models.weights import load_pretrained, load_state_dict_file

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(embed_dim=32, depth=2, num_heads=2)  # real key names, 16 px patches
SRC_IMG = 64  # the file's grid: 4 x 4 patches + cls


# ---- weight files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_vit() -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model(VIT, pretrained=False, img_size=SRC_IMG, **VIT_KW).eval()


def _write(sd: dict, path, fmt: str) -> str:
    """Save ``sd`` the way ``fmt``'s publisher does."""
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "pth":  # timm / torchvision: a plain dict
        torch.save(sd, path)
    elif fmt == "deit":  # DeiT releases: {"model": sd}
        torch.save({"model": sd, "epoch": 299}, path)
    elif fmt == "ddp":  # a DDP training script: module. prefix inside "state_dict"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        raise ValueError(fmt)
    return str(path)


_EXT = {"safetensors": "safetensors", "pth": "pth", "deit": "pth", "ddp": "bin"}


def _vit(img_size, pretrained=None, num_classes=7) -> nn.Module:
    return finegrain.create_model(VIT, pretrained=pretrained, img_size=img_size,
                                  num_classes=num_classes, backbone_kwargs=VIT_KW).eval()


# ---- (a) timm / DeiT / DDP files into the backbone ------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "deit", "ddp"])
def test_timm_vit_file_gives_timm_features(tmp_path, timm_vit, fmt):
    path = _write(timm_vit.state_dict(), tmp_path / f"vit.{_EXT[fmt]}", fmt)
    model = _vit(SRC_IMG, pretrained=path)
    x = torch.randn(2, 3, SRC_IMG, SRC_IMG)
    with torch.no_grad():
        ref_tokens = timm_vit.forward_features(x)  # (B, N+1, D)
        ref_pooled = timm_vit.forward_head(ref_tokens, pre_logits=True)  # (B, D)
        tokens = model.backbone.forward_features(x)
        pooled = model.backbone(x)
        out = model(x)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)
    assert out["logits"].shape == (2, 7)

    report = load_pretrained(_vit(SRC_IMG), path)
    assert report.target == "backbone"
    assert report.missing == [], f"backbone keys not in the file: {report.missing}"
    # the only key the backbone cannot take is the ImageNet head, and it is named
    assert set(report.unexpected) <= {"head.weight", "head.bias"}, report.unexpected
    assert "head.weight" in str(report) or any("head.weight" in s for s in report.skipped_shape)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_mismatched_head_is_reported_as_skipped(tmp_path, timm_vit, arch):
    if arch == "vit":
        path = _write(timm_vit.state_dict(), tmp_path / "vit.safetensors", "safetensors")
        report, head = load_pretrained(_vit(SRC_IMG), path), "head"
    else:
        path = _write(torchvision.models.resnet18(weights=None).state_dict(),
                      tmp_path / "r18.pth", "pth")
        report, head = load_pretrained(finegrain.create_model("resnet18", num_classes=5),
                                       path), "fc"
    skipped = [s for s in report.skipped_shape if s.startswith(f"{head}.weight")]
    assert skipped and "1000" in skipped[0], report
    assert not any(k.startswith(f"{head}.") for k in report.unexpected), report


# ---- (b) position-embedding resampling ------------------------------------------------------
@pytest.mark.parametrize("img_size,grid", [(96, (6, 6)), ((64, 32), (4, 2))])
def test_pos_embed_resampled_to_new_grid(tmp_path, timm_vit, img_size, grid):
    path = _write(timm_vit.state_dict(), tmp_path / "vit.safetensors", "safetensors")
    model = _vit(img_size, pretrained=path)
    assert tuple(model.backbone.patch_embed.grid_size) == grid
    expected = resample_abs_pos_embed(timm_vit.pos_embed.detach(), new_size=list(grid),
                                      old_size=[4, 4], num_prefix_tokens=1)
    assert expected.shape == (1, grid[0] * grid[1] + 1, VIT_KW["embed_dim"])
    torch.testing.assert_close(model.backbone.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    # the rest of the backbone is loaded unchanged
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight,
                               timm_vit.patch_embed.proj.weight, rtol=0, atol=0)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert model(torch.randn(1, 3, h, w))["logits"].shape == (1, 7)


# ---- (c) torchvision ResNet ----------------------------------------------------------------
def test_torchvision_resnet_file_gives_torchvision_features(tmp_path):
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    for m in tv.modules():  # non-trivial BN statistics, so eval-mode BN is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = _write(tv.state_dict(), tmp_path / "resnet18.pth", "pth")
    model = finegrain.create_model("resnet18", pretrained=path, num_classes=5).eval()
    tv.fc = nn.Identity()  # torchvision's features: everything up to and including avgpool
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), tv(x), rtol=0, atol=1e-5)
        assert model(x)["logits"].shape == (2, 5)
    report = load_pretrained(finegrain.create_model("resnet18", num_classes=5), path)
    assert report.missing == [] and set(report.unexpected) <= {"fc.weight", "fc.bias"}, report


# ---- (d) big_vision / JAX .npz --------------------------------------------------------------
def _export_npz(model: nn.Module, path) -> str:
    """Write a timm ViT as an original JAX ``.npz`` (the names ``timm _load_weights`` reads:
    HWIO conv kernels, (in, out) dense kernels, attention kernels split per head)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D = model.embed_dim
    H = model.blocks[0].attn.num_heads
    hd = D // H
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (P, P, 3, D)
         "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"],  # (1, 1, D)
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],  # (1, N+1, D)
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[b + f"{ln}/scale"] = sd[p + f"{norm}.weight"]
            w[b + f"{ln}/bias"] = sd[p + f"{norm}.bias"]
        qkv_w = np.split(sd[p + "attn.qkv.weight"], 3)  # 3 x (D_out, D_in)
        qkv_b = np.split(sd[p + "attn.qkv.bias"], 3)
        for name, wt, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[mha + f"{name}/kernel"] = wt.T.reshape(D, H, hd)  # (D_in, H, hd)
            w[mha + f"{name}/bias"] = bias.reshape(H, hd)
        w[mha + "out/kernel"] = sd[p + "attn.proj.weight"].reshape(D, H, hd).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            w[b + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            w[b + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return str(path)


def test_npz_file_round_trips(tmp_path):
    from timm.models.vision_transformer import _load_weights

    kw = dict(VIT_KW, depth=1)
    torch.manual_seed(3)
    src = timm.create_model(VIT, pretrained=False, img_size=SRC_IMG, **kw).eval()
    path = _export_npz(src, tmp_path / "ViT-Ti_16.npz")
    # the export follows timm's reader: timm itself gets the source weights back
    fresh = timm.create_model(VIT, pretrained=False, img_size=SRC_IMG, **kw).eval()
    _load_weights(fresh, path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=1e-7, msg=k)
    model = finegrain.create_model(VIT, pretrained=path, img_size=SRC_IMG, num_classes=3,
                                   backbone_kwargs=kw).eval()
    x = torch.randn(2, 3, SRC_IMG, SRC_IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x),
                                   src.forward_head(src.forward_features(x), pre_logits=True),
                                   rtol=0, atol=1e-6)


# ---- (e) files needing arbitrary unpickling are refused -------------------------------------
_UNPICKLED = []


def _side_effect():
    _UNPICKLED.append(1)
    return {}


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (_side_effect, ())


@pytest.mark.parametrize("ext", ["pth", "bin"])
def test_pickle_with_arbitrary_object_is_refused(tmp_path, ext):
    path = tmp_path / f"evil.{ext}"
    torch.save({"x": Payload(), "w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="cannot be loaded safely") as e:
        finegrain.create_model("resnet18", pretrained=str(path), num_classes=3)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_state_dict_file(str(path))
    assert _UNPICKLED == [], "the refused file's code ran"


def test_foreign_lightning_ckpt_loads_as_weights(tmp_path):
    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "other_project.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
                "epoch": 3}, path)
    model = finegrain.create_model("resnet18", pretrained=str(path), num_classes=3)
    torch.testing.assert_close(model.backbone.conv1.weight, src.conv1.weight, rtol=0, atol=0)


# ---- (f) / (g) registry and file errors -----------------------------------------------------
def test_unknown_model_lists_closest_names():
    with pytest.raises(KeyError, match="vit_tiny_patch16_224") as e:
        finegrain.create_model("vit_tiny_pach16_224")
    assert "vit_tiny_pach16_224" in str(e.value)
    assert "vit_tiny_patch16_224" in finegrain.list_models("vit_tiny*")


@pytest.mark.parametrize("ext", [
    "pth", "safetensors", "bin", "npz",
    "ckpt",
])
def test_missing_weights_file_names_the_path(tmp_path, ext):
    path = str(tmp_path / "nowhere" / f"weights.{ext}")
    with pytest.raises(FileNotFoundError, match="weights") as e:
        finegrain.create_model(VIT, pretrained=path, img_size=32, num_classes=3,
                               backbone_kwargs=dict(VIT_KW, patch_size=8, depth=1))
    assert path in str(e.value)


# ---- (h) registry-wide smoke test of the baseline classifiers -------------------------------
def _baselines() -> list[str]:
    names = finegrain.list_models()
    return [n for n in names if registry_mod._MODELS[n].__module__ == classifier_mod.__name__]


def _tiny_kwargs(name: str) -> tuple[dict, int]:
    """Each baseline's tiny arguments and input size, from the shared table."""
    return tiny_kwargs(name), tiny_input_size(name)[0]


def test_baselines_are_registered():
    names = _baselines()
    for n in ("vit_tiny_patch16_224", "deit_small_patch16_224", "resnet18", "resnet50"):
        assert n in names


def _check_grads(model: nn.Module) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient in {bad}"


@pytest.mark.parametrize("name", _baselines())
def test_baseline_forward_backward(name):
    kw, size = _tiny_kwargs(name)
    model = finegrain.create_model(name, num_classes=3, **kw)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    out = model.train()(x, targets=y)
    assert set(out) == {"logits", "losses", "logs"}
    assert out["logits"].shape == (4, 3)
    assert set(out["losses"]) == {"ce"} and out["losses"]["ce"].ndim == 0
    assert torch.isfinite(out["losses"]["ce"])
    sum(out["losses"].values()).backward()
    _check_grads(model)
    with torch.no_grad():
        ev = model.eval()(x)
    assert set(ev) == {"logits"} and torch.isfinite(ev["logits"]).all()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_baseline_reid_task(name):
    kw, size = _tiny_kwargs(name)
    model = finegrain.create_model(name, num_classes=3, task="reid", **kw)
    x, y = torch.randn(6, 3, size, size), torch.tensor([0, 0, 1, 1, 2, 2])  # P=3 x K=2
    out = model.train()(x, targets=y)
    assert set(out) == {"logits", "embedding", "losses", "logs"}
    assert set(out["losses"]) == {"ce", "triplet"}
    emb = out["embedding"]
    assert emb.shape == (6, model.backbone.num_features)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6), rtol=0, atol=1e-5)
    sum(out["losses"].values()).backward()
    _check_grads(model)
    assert not model.bnneck.bias.requires_grad  # BNNeck: the shift is frozen
    with torch.no_grad():
        ev = model.eval()(x)
    assert set(ev) == {"logits", "embedding"}
    torch.testing.assert_close(ev["embedding"].norm(dim=1), torch.ones(6), rtol=0, atol=1e-5)


def test_a_finegrain_record_missing_its_head_is_refused_not_run_with_a_random_head(tmp_path,
                                                                                  capsys):
    """weights.safetensors + model.json whose head tensors were removed: predict / export /
    load_model refuse it naming the tensors (before, predict ran a random head, exit 0)."""
    import json

    from safetensors.torch import save_file

    from finegrain import create_model
    from finegrain.cli import main
    from finegrain.errors import InputError
    from finegrain.models.registry import config_meta, load_model
    from finegrain.models.tiny import tiny_kwargs
    name = "dcal_deit_tiny_patch16_224"
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **tiny_kwargs(name))
    meta = {**config_meta(model.finegrain_config), "img_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "task": "classification", "class_names": list("abcd"),
            "dataset": "synthetic_fgvc"}
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "weights.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(meta))
    load_model(str(tmp_path / "weights.safetensors"))  # the whole record loads
    del sd["head.weight"], sd["head.bias"]
    save_file(sd, str(tmp_path / "weights.safetensors"))
    with pytest.raises(InputError, match=r"2 missing \(head.weight, head.bias\)"):
        load_model(str(tmp_path / "weights.safetensors"))
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    assert main(["predict", str(tmp_path / "weights.safetensors"), str(tmp_path / "a.jpg")]) == 2
    assert main(["export", str(tmp_path / "weights.safetensors"), "--out",
                 str(tmp_path / "exp")]) == 2
    assert "head.weight" in capsys.readouterr().err and not (tmp_path / "exp").exists()
