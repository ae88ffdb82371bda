"""DCAL choices around the mechanisms: the GLCA feature's literal reading (a class token that
no selection can move) beside the deviation we take, the Re-ID distractor drawn from other
identities, and uncertainty weights that can reach what Eq. 6 asks of them."""

from __future__ import annotations

import math

import torch

from finegrain import create_model
from finegrain.engine.report import format_summary
from finegrain.losses.uncertainty import UncertaintyWeighting
from finegrain.models.dcal import random_derangement, random_other_class_partner
from finegrain.models.tiny import tiny_kwargs

NAME = "dcal_deit_tiny_patch16_224"


def _model(**kw):
    torch.manual_seed(0)
    return create_model(NAME, num_classes=4, **{**tiny_kwargs(NAME), **kw}).eval()


def _glca(model, x, selected):
    """The GLCA feature of ``x`` for a given selection (the SA pass as forward_features)."""
    bb = model.backbone
    h = model._embed(x)
    for blk in bb.blocks[:-1]:
        h = blk(h)
    out = model.glca_block(h, selected, model.glca_feature == "class_token")
    return model.glca_norm(out[:, 0] if model.glca_feature == "class_token" else out.mean(1))


def test_the_literal_class_token_feature_cannot_see_the_selection_the_default_does():
    x = torch.randn(2, 3, 32, 32)
    literal, ours = _model(glca_feature="class_token"), _model()
    ours.load_state_dict(literal.state_dict())
    n = literal.backbone.patch_embed.num_patches
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[n - 1, n - 2], [n - 3, n - 4]])
    with torch.no_grad():
        lit_a, lit_b = _glca(literal, x, a), _glca(literal, x, b)
        our_a, our_b = _glca(ours, x, a), _glca(ours, x, b)
        # the forward pass reads the same feature as the helper above
        f = literal.forward_features(x)
        torch.testing.assert_close(f["glca"], _glca(literal, x, f["selected"]))
    torch.testing.assert_close(lit_a, lit_b, atol=1e-6, rtol=0)  # the selection cannot move it
    assert (our_a - our_b).abs().max() > 1e-2  # ours moves with it


def test_reid_distractors_come_from_other_identities():
    torch.manual_seed(0)
    y = torch.arange(16).repeat_interleave(4)  # P x K = 16 x 4
    same_any = same_other = 0
    for _ in range(50):
        same_other += int((y[random_other_class_partner(y)] == y).sum())
        same_any += int((y[random_derangement(64)] == y).sum())
    assert same_other == 0
    assert 0.02 < same_any / (50 * 64) < 0.08  # (K - 1) / (B - 1) = 3 / 63
    one_class = torch.zeros(4, dtype=torch.long)  # nobody else: a derangement, never itself
    p = random_other_class_partner(one_class)
    assert (p != torch.arange(4)).all()
    assert _model(task="reid").pwca_partner == "other_class"
    assert _model().pwca_partner == "any"


def _adamw_w(lr: float, loss: float, steps: int) -> float:
    """``w`` after ``steps`` AdamW steps on Eq. 6 with a constant branch loss ``loss``."""
    uw = UncertaintyWeighting(["sa"])
    opt = torch.optim.AdamW(uw.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        uw({"sa": torch.tensor(loss)})["sa"].backward()
        opt.step()
    return float(uw.w)


def test_uncertainty_weights_reach_log_loss_at_the_recipes_w_lr_not_at_the_head_lr():
    # Eq. 6's optimum is w = log L: a branch whose loss fell to 0.1 wants w = -2.3
    target = math.log(0.1)
    assert abs(_adamw_w(1e-3, 0.1, 4000) - target) < 0.1
    assert abs(_adamw_w(1.5625e-5, 0.1, 4000)) < 0.07  # barely leaves 0


def test_the_summary_shows_the_learned_uncertainty_weights():
    model = _model()
    learned = model.learned_scalars()
    assert set(learned) == {"w_sa", "w_glca", "w_pwca", "loss factor sa", "loss factor glca",
                            "loss factor pwca"}
    assert learned["loss factor sa"] == 0.5  # w = 0
    text = format_summary("runs/x", "top1", None, None, "classification", None, True, learned)
    assert "learned: w_sa 0, w_glca 0, w_pwca 0" in text
    assert create_model("vit_tiny_patch16_224", num_classes=4,
                        **tiny_kwargs("vit_tiny_patch16_224")).learned_scalars() == {}
