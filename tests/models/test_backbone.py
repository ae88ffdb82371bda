"""``create_backbone``, the one timm backbone builder (issue 13, "fewer copies").

Every registered model (tiny ``test`` and ``demo`` scales of ``finegrain.models.tiny``) and the
task variants of ``test_all_models.py`` build exactly the modules they built with the five
former copies of backbone setup: ``backbone_reference.json`` holds, per model, hashes of the
state_dict's names and shapes, of its values under ``torch.manual_seed(0)`` and of
``repr(model)`` (drop-path rates, dynamic sizes ...), computed with the former code. Names and
shapes are compared always; values and repr where torch and timm are the versions that wrote
the file (initialisation streams may change between releases).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import timm
import torch

from finegrain import create_model, list_models
from finegrain.models.backbone import create_backbone, model_init_arguments, takes_img_size
from finegrain.models.tiny import tiny_kwargs


HERE = os.path.dirname(__file__)
_spec = importlib.util.spec_from_file_location("_all_models", os.path.join(HERE,
                                                                          "test_all_models.py"))
_all_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_all_models)
VARIANTS = _all_models.VARIANTS  # the task variants test_all_models.py checks

REFERENCE = os.path.join(HERE, "backbone_reference.json")
with open(REFERENCE) as _f:
    REF = json.load(_f)
SAME_VERSIONS = REF["torch"] == torch.__version__ and REF["timm"] == timm.__version__

CASES = [(n, s, {}) for n in list_models() for s in ("test", "demo")] + \
        [(n, "test", kw) for n, kw in VARIANTS]


def _key(name: str, scale: str, kw: dict) -> str:
    return f"{name}@{scale}" + "".join(f"-{k}={v}" for k, v in kw.items())


def _short(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def test_reference_covers_every_case():
    assert sorted(_key(*c) for c in CASES) == sorted(REF["models"])


@pytest.mark.parametrize("case", CASES, ids=[_key(*c) for c in CASES])
def test_models_build_the_same_modules_as_before(case):
    name, scale, kw = case
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **{**tiny_kwargs(name, scale), **kw})
    sd = model.state_dict()
    ref = REF["models"][_key(*case)]
    shapes = json.dumps({k: list(v.shape) for k, v in sd.items()}, sort_keys=True)
    assert _short(shapes) == ref["structure"], "parameter names or shapes changed"
    if not SAME_VERSIONS:
        pytest.skip(f"values recorded with torch {REF['torch']}, timm {REF['timm']}")
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == ref["values"], "initial values changed (same seed)"
    assert _short(repr(model)) == ref["repr"], "module configuration changed"


def test_img_size_and_optional_arguments_are_read_from_timm():
    assert takes_img_size("vit_tiny_r_s16_p8_224") and not takes_img_size("resnet18")
    vit, info = create_backbone("deit_tiny_patch16_224", img_size=[48, 32], patch_size=8,
                                embed_dim=32, depth=1, num_heads=2,
                                if_supported={"drop_path_rate": 0.1, "zero_init_last": False})
    assert vit.patch_embed.img_size == (48, 32) and info.is_vit and info.num_features == 32
    assert info.num_prefix_tokens == 1 and info.fixed_input_size
    assert "zero_init_last" not in model_init_arguments("deit_tiny_patch16_224")
    cnn, info = create_backbone("resnet18", img_size=48, channels=[8, 16, 32, 64],
                                if_supported={"zero_init_last": False})
    assert not info.is_vit and info.num_prefix_tokens == 0 and info.num_features == 64
    assert not info.fixed_input_size
    assert all(bool(b.bn2.weight.detach().abs().sum() > 0) for b in cnn.layer1)  # not zeroed
    state = torch.random.get_rng_state()
    model_init_arguments.cache_clear()
    model_init_arguments("resnet50")  # finding the class draws no random numbers
    assert torch.equal(state, torch.random.get_rng_state())


def test_an_unknown_backbone_is_named_with_the_closest_timm_names():
    from finegrain.errors import UnknownNameError
    with pytest.raises(UnknownNameError, match=r"backbone 'resnet81' is not a timm "
                                               r"architecture \(closest: .*resnet18"):
        create_backbone("resnet81")
