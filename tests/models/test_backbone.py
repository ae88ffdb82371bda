"""``create_backbone``, the one timm backbone builder.

Every registered model (tiny ``test`` and ``demo`` scales of ``finegrain.models.tiny``) and the
task variants of ``test_all_models.py`` build exactly the modules they built with the five
former copies of backbone setup: ``backbone_reference.json`` holds, per model, a hash of the
state_dict's names and shapes, float64 fingerprints of its values under ``torch.manual_seed(0)``
and a hash of ``repr(model)`` (drop-path rates, dynamic sizes ...). Names and shapes are
compared always; values and repr where torch and timm are the versions that wrote the file
(initialisation streams may change between releases).

Values are not hashed: the same seed, torch and timm give the same values only up to the last
bits on another CPU kernel path (AVX-512, AVX2, default: ``normal_`` and ``erfinv`` are
vectorised differently), so a bitwise hash fails on a machine other than the one that wrote it.
Each tensor's fingerprint (sum, sum of squares, sum weighted by a fixed ramp) is compared within
a bound that last-bit rounding cannot exceed and that any real change of initialisation does
(another std, a zeroed or permuted tensor).

Rewrite the reference after an intended change: ``python tests/models/test_backbone.py``.
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


def fingerprints(state: dict) -> dict:
    """Per tensor, in float64: (sum v, sum v^2, sum v * ramp) with ramp in [-1, 1], and the count."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().double().flatten()
        ramp = torch.linspace(-1.0, 1.0, v.numel(), dtype=torch.float64)
        out[k] = [float(f"{float(x):.9g}") for x in (v.sum(), (v * v).sum(), (v * ramp).sum())]
        out[k].append(v.numel())  # 9 digits: far finer than the comparison's 1e-5
    return out


def value_changes(now: dict, ref: dict, rel: float = 1e-5) -> list[str]:
    """Names of the tensors whose fingerprint moved more than rounding can move it.

    Values that differ by a relative e each move sum v and sum v * ramp by at most
    sqrt(n) * e * ||v|| (Cauchy-Schwarz) and sum v^2 by at most 2 e ||v||^2 (+ e^2); float32
    rounding is e ~ 6e-8, so ``rel`` = 1e-5 leaves a factor ~100 while a 0.1% change of a
    tensor's scale already moves sum v^2 by 2e-3 ||v||^2.
    """
    changed = [k for k in ref if k not in now] + [k for k in now if k not in ref]
    for k in set(now) & set(ref):
        s, ss, sr, n = now[k]
        s0, ss0, sr0, n0 = ref[k]
        norm = max(ss, ss0) ** 0.5
        line = rel * (n ** 0.5) * norm + 1e-30
        if n != n0 or abs(s - s0) > line or abs(sr - sr0) > line or \
                abs(ss - ss0) > rel * max(ss, ss0) + 1e-30:
            changed.append(k)
    return sorted(changed)


def test_the_value_check_ignores_rounding_and_catches_a_real_change():
    torch.manual_seed(0)
    sd = create_model("dcal_deit_tiny_patch16_224", num_classes=4,
                      **tiny_kwargs("dcal_deit_tiny_patch16_224", "test")).state_dict()
    ref = fingerprints(sd)
    ulp = {k: v * (1 + torch.randint(-2, 3, v.shape) * 2.0 ** -23) if v.is_floating_point()
           else v for k, v in sd.items()}  # up to two units in the last place, every value
    assert value_changes(fingerprints(ulp), ref) == []
    name = "backbone.patch_embed.proj.weight"
    for change in (lambda v: v * 1.001, lambda v: v.flip(0), lambda v: torch.zeros_like(v),
                   lambda v: v + 1e-4 * v.abs().max()):
        assert value_changes(fingerprints({**sd, name: change(sd[name])}), ref) == [name]
    assert value_changes({k: v for k, v in ref.items() if k != name}, ref) == [name]


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
    assert not value_changes(fingerprints(sd), ref["values"]), "initial values changed (seed 0)"
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


def write_reference(path: str = REFERENCE) -> None:
    """Rewrite ``backbone_reference.json`` from the current code (after an intended change)."""
    models = {}
    for case in CASES:
        name, scale, kw = case
        torch.manual_seed(0)
        model = create_model(name, num_classes=4, **{**tiny_kwargs(name, scale), **kw})
        sd = model.state_dict()
        shapes = json.dumps({k: list(v.shape) for k, v in sd.items()}, sort_keys=True)
        models[_key(*case)] = {"structure": _short(shapes), "values": fingerprints(sd),
                               "repr": _short(repr(model))}
    with open(path, "w") as f:  # one model per line: a change reads as a one-line diff
        f.write(f'{{"torch": "{torch.__version__}", "timm": "{timm.__version__}", "models": {{\n')
        f.write(",\n".join(json.dumps(k) + ": " + json.dumps(models[k], separators=(",", ":"))
                           for k in sorted(models)))
        f.write("\n}}\n")


if __name__ == "__main__":
    write_reference()
