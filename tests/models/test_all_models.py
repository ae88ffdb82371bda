"""Every registered model, at its tiny configuration (``finegrain.models.tiny``), in the spirit
of timm's ``tests/test_models.py``:

- training mode (``model(images, targets=y)`` with P x K targets, what Re-ID / DML losses
  need): the DESIGN.md output contract (keys, shapes, unit-norm embeddings, the expected
  loss terms as finite scalars), backward, and every trainable parameter gets a finite
  gradient;
- evaluation mode (``model(images)``): exactly the contract keys, finite, embeddings of unit
  norm; the parameters the evaluation outputs do not depend on are exactly the declared
  training-only ones (loss weights, TASN's detached attention net and training heads,
  cross-image's conditional branch);
- every trainable parameter can learn: its gradient is non-zero within two SGD steps (at
  initialisation a ResNet's zero-initialised last BN of each block legitimately blocks the
  gradient of that block's convolutions; one step later it must not);
- evaluation is independent of the rest of the batch: image i in a batch of 4 gives the same
  output alone and in another batch.

Besides every registered name at its default arguments, the baseline twins / task variants
the recipes and the demo train are checked too (``VARIANTS``).
"""

from __future__ import annotations

import pytest
import torch

from finegrain import create_model, list_models
from finegrain.errors import InputError
from finegrain.models.explain import AttentionMap
from finegrain.models.tiny import family, tiny_input_size, tiny_kwargs

NUM_CLASSES = 4
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # P = 4 identities x K = 2 instances

# Task / ablation variants on top of the registered defaults: (name, extra kwargs).
VARIANTS = [
    ("dcal_deit_tiny_patch16_224", {"task": "reid"}),
    ("dcal_vit_tiny_r_s16_p8_224", {"task": "reid"}),
    ("dcal_deit_tiny_patch16_224", {"glca": False, "pwca": False}),  # DCAL's baseline twin
    ("dcal_deit_tiny_patch16_224", {"glca": True, "pwca": False}),
    ("vit_tiny_patch16_224", {"task": "reid"}),
    ("resnet18", {"task": "reid"}),
    ("dalg_deit_tiny_patch16_224", {"local": "none", "fusion": "none"}),  # DALG's baseline
    ("dalg_deit_tiny_patch16_224", {"fusion": "orthogonal"}),  # the DOLG ablation
    ("cross_image_resnet18", {"cross_attention": False}),  # the DML baseline
    ("cross_image_resnet18", {"asymmetric": True}),
    ("tasn_resnet18", {"test_head": "master"}),
]
CASES = [(n, {}) for n in list_models()] + VARIANTS

# Parameters that legitimately get no gradient from a *training* step (eval-only parts).
# None in the registry today; an entry needs a reason, and a stale entry fails the test.
NO_GRAD_IN_TRAINING: dict[str, tuple[str, ...]] = {}

def _learn_cases() -> list:
    # (cross-image ResNets with freeze_bn once froze timm's zero-initialised last BN of every
    # block, leaving the residual branches dead from scratch: fixed, and caught here)
    return [pytest.param((name, kw), id=_ids((name, kw))) for name, kw in CASES]


def _build(name: str, kw: dict):
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, **{**tiny_kwargs(name), **kw})


def _images(name: str, n: int, seed: int = 0) -> torch.Tensor:
    H, W = tiny_input_size(name)
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _check_contract(out: dict, model, batch: int) -> None:
    assert set(out) >= model.output_keys(), sorted(out)
    if "logits" in out:
        assert out["logits"].shape == (batch, NUM_CLASSES)
        assert torch.isfinite(out["logits"]).all(), "non-finite logits"
    if "embedding" in out:
        e = out["embedding"]
        assert e.ndim == 2 and e.shape[0] == batch and torch.isfinite(e).all()
        torch.testing.assert_close(e.float().norm(dim=1), torch.ones(batch), rtol=0, atol=1e-4)


def _ids(case) -> str:
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def test_table_covers_every_registered_model():
    for name in list_models():
        for scale in ("test", "demo"):
            kw = tiny_kwargs(name, scale)
            assert "num_classes" not in kw and tiny_input_size(name, scale)[0] <= 64, name
        assert tiny_kwargs(name) is not tiny_kwargs(name)  # fresh copies: callers may edit


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_train_step_contract_and_gradients(case):
    name, kw = case
    model = _build(name, kw).train()
    x = _images(name, len(TARGETS))
    out = model(x, targets=TARGETS)
    _check_contract(out, model, len(TARGETS))
    assert set(out) == model.output_keys() | {"losses", "logs"}, sorted(out)
    losses = out["losses"]
    assert set(losses) == model.loss_names(), sorted(losses)
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), f"loss {k} = {v}"
        assert v.requires_grad, f"loss {k} is not connected to the parameters"
    for k, v in out["logs"].items():
        assert v.ndim == 0 and torch.isfinite(v), f"log {k} = {v}"
    sum(v.float() for v in losses.values()).backward()

    exempt = NO_GRAD_IN_TRAINING.get(name, ())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None and not n.startswith(exempt)]
    assert not no_grad, f"{name}: no gradient reaches {no_grad}"
    stale = [e for e in exempt if not any(n.startswith(e) and p.grad is None
                                          for n, p in trainable)]
    assert not stale, f"{name}: exempt prefixes {stale} do get gradients now: drop them"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient in {bad}"
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not nonfinite


@pytest.mark.parametrize("case", _learn_cases())
def test_every_trainable_parameter_learns(case):
    name, kw = case
    model = _build(name, kw).train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in params], lr=1e-2)
    moved = set()
    for step in range(2):
        opt.zero_grad()
        out = model(_images(name, len(TARGETS), seed=step), targets=TARGETS)
        sum(v.float() for v in out["losses"].values()).backward()
        moved |= {n for n, p in params if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
    exempt = NO_GRAD_IN_TRAINING.get(name, ())
    dead = [n for n, _ in params if n not in moved and not n.startswith(exempt)]
    assert not dead, f"{name}: {len(dead)} trainable parameters never get a non-zero " \
                     f"gradient: {dead[:8]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_eval_contract_and_training_only_parameters(case):
    name, kw = case
    model = _build(name, kw).eval()
    x = _images(name, 4)
    out = model(x)
    assert set(out) == model.output_keys(), sorted(out)
    _check_contract(out, model, 4)
    # which parameters do the evaluation outputs depend on?
    g = torch.Generator().manual_seed(1)
    surrogate = sum((v.float() * torch.randn(v.shape, generator=g)).sum() for v in out.values())
    surrogate.backward()
    prefixes = model.training_only()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unreached = {n for n, p in trainable if p.grad is None}
    declared = {n for n, _ in trainable if prefixes and n.startswith(prefixes)}
    assert unreached == declared, (
        f"{name}: evaluation ignores {sorted(unreached - declared)} (not declared training-only)"
        f" and uses {sorted(declared - unreached)} (declared training-only)")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_eval_is_independent_of_the_batch(case):
    name, kw = case
    model = _build(name, kw).eval()
    x = _images(name, 4)
    other = _images(name, 3, seed=7)
    with torch.no_grad():
        full = model(x)
        for i in (0, 3):
            alone = model(x[i:i + 1])
            mixed = model(torch.cat([other[:2], x[i:i + 1], other[2:]]))  # at position 2
            for k in full:
                torch.testing.assert_close(alone[k][0], full[k][i], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{name} {k}, image {i} alone: {m}")
                torch.testing.assert_close(mixed[k][2], full[k][i], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{name} {k}, image {i} mixed: {m}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_explain_returns_raw_named_maps_of_their_image(case):
    """One explain contract (``finegrain.models.explain``): ``explain(images, pair=None)``
    returns :class:`AttentionMap` s, raw (the drawing scales them), each over the image it
    belongs to; ``pair`` works exactly where ``pairwise_explain`` says so."""
    name, kw = case
    model = _build(name, kw).eval()
    x, p = _images(name, 2), _images(name, 2, seed=1)
    try:
        out = model.explain(x)
    except InputError:  # a plain CNN classifier has no attention to show
        assert family(name) == "classifier" and not model.explainable, name
        return
    assert isinstance(out, list) and all(isinstance(m, AttentionMap) for m in out)
    assert all(m.image == "query" for m in out)
    for m in out:
        assert m.map.shape[0] == 2 and m.map.ndim in (3, 4) and torch.isfinite(m.map).all()
        v = m.map.flatten(1)
        if not m.is_picture and v.unique().numel() > 2:  # not a 0/1 selection mask
            scaled = (v.amin(1) == 0) & (v.amax(1) == 1)
            assert not scaled.all(), f"{m.name} looks min-max scaled: models return raw maps"
    if model.pairwise_explain:
        paired = model.explain(x, pair=p)
        assert any(m.image == "pair" for m in paired)
    else:
        with pytest.raises(InputError, match="pair-wise"):
            model.explain(x, pair=p)
