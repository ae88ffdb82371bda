"""Every method memorises 8 images through ``finegrain train`` (a method that cannot learn
fails here).

Each test runs the real command in-process (``finegrain.cli.main(["train", ...])``) on a
generated dataset cut to 8 training images (the synthetic sets' own size parameters), one
batch of 8 per epoch, no augmentation (``data.augment: false``), no validation, the tiny model
of :mod:`finegrain.models.tiny`, AdamW with a cosine schedule; then reads the per-step raw
loss terms (``train/<name>`` = the model's ``out["logs"]``) from the run folder's
``metrics.csv``.

The criterion is per loss term: its excess over the lowest value the term can take must fall
below ``FRACTION`` (5%) of its initial excess, ``(final - floor) <= 0.05 (initial - floor)``
(25% for DCAL's PWCA, a regulariser: see ``PWCA_FRACTION``).
The floor is 0 for cross-entropy, triplet and ArcFace; the entropy of the smoothed target for
label-smoothed CE (Re-ID); the value at a perfect embedding for the multi-similarity loss,
whose positive term never vanishes. The total ``train/loss`` is not used: DCAL's uncertainty
weighting makes it negative. "final" is the mean of the last 3 steps.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from finegrain import create_model
from finegrain.cli import main
from finegrain.data import build_dataset
from finegrain.models.registry import model_arg
from finegrain.models.tiny import TEST_VIT, tiny_kwargs

FRACTION = 0.05
# DCAL's PWCA is a regulariser by design: the class token of image 1 also attends, under one
# softmax, to a random distractor's tokens, which resists memorisation, and the uncertainty
# weighting (Eq. 6) down-weights it as it lags. It must learn, not memorise in this budget.
PWCA_FRACTION = 0.25
# DCAL at width 64 (4 heads): at the table's width 32 the PWCA branch needs ~3x the steps
DCAL = {"backbone_kwargs": {**TEST_VIT, "embed_dim": 64, "num_heads": 4}}
IMAGES = 8
LR = {"vit": 2e-3, "cnn": 5e-3}  # AdamW peak learning rate, cosine to 0, per backbone kind

FGVC = ("synthetic_fgvc", {"num_classes": 4, "train_per_class": 2, "test_per_class": 1,
                           "size": 32, "seed": 0})
REID = ("synthetic_reid", {"num_train_ids": 4, "num_test_ids": 1, "num_cameras": 2,
                           "images_per_camera": 1, "height": 64, "width": 32, "seed": 0})
# cub200_dml: the first half of the classes train, all their images pooled: 4 x (1 + 1)
DML = ("synthetic_dml", {"num_classes": 8, "train_per_class": 1, "test_per_class": 1,
                         "size": 32, "seed": 0})
# train views of (num_landmarks + extra_train) landmarks: 4 x 2
LANDMARKS = ("synthetic_landmarks", {"num_landmarks": 2, "queries_per_landmark": 1,
                                     "easy_per_landmark": 1, "hard_per_landmark": 1,
                                     "junk_per_landmark": 0, "num_distractors": 1,
                                     "train_per_landmark": 2, "extra_train": 2, "seed": 0})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("overfit-data")


def _overfit(tmp_path, cache, name: str, model_kwargs: dict, data: tuple[str, dict],
             epochs: int, lr: float, pk: bool = False) -> list[dict]:
    """``finegrain train`` for ``epochs`` epochs of one batch; the metrics.csv step rows."""
    dataset, config = data
    ds = build_dataset(dataset, str(cache), "train", config=config)
    assert len(ds) == IMAGES, f"{dataset} config gives {len(ds)} training images"
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--seed_everything", "0",
            "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(name, {**tiny_kwargs(name), **model_kwargs}),
            "--model.optimizer.lr", str(lr), "--model.optimizer.weight_decay", "0",
            "--model.scheduler", "cosine",
            "--data.dataset", dataset, "--data.root", str(cache),
            "--data.dataset_kwargs", json.dumps({"config": config}),
            "--data.img_size", "32", "--data.resize_size", "32",
            "--data.batch_size", str(IMAGES), "--data.num_workers", "0",
            "--data.augment", "false", "--data.val_split", "none"]
    if pk:  # P identities x K = 2 images: the whole set, every batch
        argv += ["--data.sampler", "pk", "--data.num_instances", "2"]
    assert main(argv) == 0
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(epochs)), "one logged step per epoch"
    return rows


def _assert_memorised(rows: list[dict], key: str, floor: float = 0.0,
                      fraction: float = FRACTION) -> tuple[float, float]:
    """``(final - floor) <= fraction * (initial - floor)``; returns (initial, final)."""
    values = [float(r[f"train/{key}"]) for r in rows]
    initial, final = values[0], sum(values[-3:]) / 3
    assert all(math.isfinite(v) for v in values), f"{key}: non-finite loss"
    assert initial - floor > 0.1, f"{key}: starts at {initial:.4f}, at its floor {floor:.4f}"
    assert final - floor <= fraction * (initial - floor), (
        f"{key} did not memorise 8 images: {initial:.4f} -> {final:.4f} (floor {floor:.4f}, "
        f"allowed {floor + fraction * (initial - floor):.4f})")
    print(f"{key}: {initial:.4f} -> {final:.4f} (floor {floor:.4f}, "
          f"excess ratio {(final - floor) / (initial - floor):.4f})")
    return initial, final


def _smoothed_ce_floor(num_classes: int, eps: float) -> float:
    """min over logits of CE with label smoothing eps: the entropy of the smoothed target."""
    q = torch.full((num_classes,), eps / num_classes)
    q[0] += 1 - eps
    return float(-(q * q.log()).sum())


def test_dcal_fgvc_overfits(tmp_path, cache):
    rows = _overfit(tmp_path, cache, "dcal_deit_tiny_patch16_224", {**DCAL, "task": "classification"},
                    FGVC, 120, LR["vit"])
    _assert_memorised(rows, "sa")
    _assert_memorised(rows, "glca")
    _assert_memorised(rows, "pwca", fraction=PWCA_FRACTION)


def test_dcal_reid_overfits(tmp_path, cache):
    rows = _overfit(tmp_path, cache, "dcal_deit_tiny_patch16_224", {**DCAL, "task": "reid"},
                    REID, 160, LR["vit"], pk=True)  # distractors of other identities: harder
    floor = _smoothed_ce_floor(4, 0.1)  # CE with label smoothing 0.1 over 4 identities
    for branch in ("sa", "glca"):  # each = CE + batch-hard triplet (floor 0)
        _assert_memorised(rows, branch, floor)
        _assert_memorised(rows, f"{branch}_triplet")
    _assert_memorised(rows, "pwca", floor, fraction=PWCA_FRACTION)


def test_tasn_overfits(tmp_path, cache):
    rows = _overfit(tmp_path, cache, "tasn_resnet18", {}, FGVC, 60, LR["cnn"])
    for key in ("ce_attention", "ce_part", "ce_master", "ce_part_aux", "ce_master_aux"):
        _assert_memorised(rows, key)
    # the distillation term is a soft CE at T = 10: its floor is the teacher's (changing,
    # near-uniform) entropy, not a number; it only has to stay finite
    assert all(math.isfinite(float(r["train/distill"])) for r in rows)


def test_dalg_overfits(tmp_path, cache):
    rows = _overfit(tmp_path, cache, "dalg_deit_tiny_patch16_224", {}, LANDMARKS, 40, LR["vit"])
    _assert_memorised(rows, "arcface")  # margin 0.15, s = 30: ~0 once every class is apart
    assert float(rows[-1]["train/acc"]) == 1.0


def test_cross_image_dml_overfits(tmp_path, cache):
    name = "cross_image_resnet18"
    rows = _overfit(tmp_path, cache, name, {}, DML, 60, LR["cnn"], pk=True)
    # the multi-similarity loss never reaches 0 (its positive term is log(1 + e^{-alpha
    # (1 - base)}) / alpha at s = 1): the floor is its value for perfect embeddings / S
    model = create_model(name, num_classes=4, **tiny_kwargs(name))
    y = torch.arange(4).repeat_interleave(2)  # the P x K batch: 4 classes x 2
    with torch.no_grad():
        floor_z = float(model.loss(F.one_hot(y, 4).float(), y))
        floor_s = float(model.cond_loss((y[:, None] == y[None, :]).float(), y))
    assert floor_z > 0.1 and floor_s > 0.1  # the floor matters
    _assert_memorised(rows, "dml", floor_z)
    _assert_memorised(rows, "cond", floor_s)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_plain_classifier_overfits(tmp_path, cache, name):
    rows = _overfit(tmp_path, cache, name, {}, FGVC, 80, LR["vit" if "vit" in name else "cnn"])
    _assert_memorised(rows, "ce")
