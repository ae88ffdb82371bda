"""Every shipped recipe builds at its own image size and class count and trains: two optimizer
steps at batch 2 (P x K recipes: 2 classes x 2 images) on CPU in the recipe's precision give a
finite loss and a gradient to every trainable parameter. Slow (ViT-B at 448 and 512 px on CPU):
``make test-slow`` or ``pytest -m slow tests/engine/test_recipes_real_size.py`` (56 recipes: 37 min
on two shared cores, up to 9 GB of memory)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from finegrain.engine.run import build_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ViT-B at 448 px, three passes (DCAL), on two shared cores
@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_trains_two_steps_at_its_real_size(path):
    torch.manual_seed(0)
    model, opt, cfg = build_recipe(path)
    size = cfg["data"]["img_size"]
    h, w = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    dtype = torch.bfloat16 if "bf16" in str(cfg["trainer"]["precision"]) else None
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reached = set()
    y = torch.tensor([0, 1])
    if "sampler: pk" in open(path).read():  # pair losses: positives and negatives, 2 x 2
        y = torch.tensor([0, 0, 1, 1])
    x = torch.randn(len(y), 3, h, w)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(x, targets=y)
        loss = sum(v.float() for v in out["losses"].values())
        assert torch.isfinite(loss), (path, {k: float(v) for k, v in out["losses"].items()})
        loss.backward()
        bad = [n for n, p in trainable.items()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients: {bad[:8]}"
        # a parameter is trained when its gradient is non-zero (a value can stay equal: an
        # update of 1e-9 vanishes in fp32 beside a BatchNorm weight of 1.0)
        reached |= {n for n, p in trainable.items() if p.grad is not None and p.grad.any()}
        opt.step()
    missed = sorted(set(trainable) - reached)
    assert not missed, f"{os.path.basename(path)}: no gradient: {missed[:8]} ({len(missed)})"
