"""The path from a recipe to a number: the checkpoint is never chosen on the test split by
default, inputs are prepared as the loaded weights expect, and the DML recipes train and
evaluate with the standard pair of transforms."""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pytest
import yaml
from jsonargparse import Namespace
from torchvision.transforms import v2

from finegrain.cli import main
from finegrain.data.holdout import holdout
from finegrain.data.transforms import build_transform
from finegrain.engine.datamodule import FinegrainDataModule
from finegrain.engine.run import follow_weights
from finegrain.errors import InputError
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "vit_tiny_patch16_224"
CFG = dict(num_classes=4, train_per_class=10, test_per_class=3, size=32, seed=0)


# ---- the held-out draw ------------------------------------------------------------------------
def test_classification_holds_out_images_of_every_class_labels_unchanged():
    labels = np.repeat(np.arange(5), 20)
    h = holdout("classification", labels, 0.1, seed=0)
    assert len(h.val) == 10 and set(labels[h.val]) == set(range(5))
    assert np.intersect1d(h.train, h.val).size == 0 and len(h.train) + len(h.val) == 100
    assert h.relabel == {c: c for c in range(5)}
    again = holdout("classification", labels, 0.1, seed=0)
    assert np.array_equal(again.val, h.val)  # seeded
    assert not np.array_equal(holdout("classification", labels, 0.1, seed=1).val, h.val)


def test_dml_and_reid_hold_out_whole_classes_and_relabel_the_rest():
    labels = np.repeat(np.arange(20), 4)
    for task in ("dml", "reid"):
        h = holdout(task, labels, 0.1, seed=0)
        held = set(labels[h.val])
        assert len(held) == 2 and not held & set(labels[h.train])
        assert sorted(h.relabel.values()) == list(range(18))
        assert set(h.relabel) == set(labels[h.train])
    h = holdout("reid", labels, 0.1, seed=0)
    queries = labels[h.val][h.query]
    assert sorted(queries) == sorted(set(labels[h.val]))  # one query per identity
    with pytest.raises(InputError, match="val_fraction"):
        holdout("dml", labels, 1.5)


def test_the_data_module_never_evaluates_the_test_split_by_default(tmp_path):
    dm = FinegrainDataModule("synthetic_fgvc", str(tmp_path), img_size=32,
                             dataset_kwargs={"config": CFG})
    test = FinegrainDataModule("synthetic_fgvc", str(tmp_path), img_size=32, val_split="test",
                               dataset_kwargs={"config": CFG})
    val_paths = {s.path for s in dm.val_set.samples}
    train_paths = {s.path for s in dm.train_set.samples}
    test_paths = {s.path for s in test.val_set.samples}
    assert dm.val_mode == "holdout" and len(val_paths) == 4  # 10% of 10 per class
    assert not val_paths & test_paths and not val_paths & train_paths
    assert len(train_paths) == 36 and len(test.train_set) == 40
    assert dm.selected_on == "held-out 10% of the training images (seed 0)"
    assert {s.path for s in dm.test_set().samples} == test_paths


def _train(tmp, run, *extra):
    return ["train", "--run-dir", str(tmp / run), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(NAME, tiny_kwargs(NAME)),
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": CFG}),
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            *extra]


def test_train_chooses_on_held_out_data_then_scores_the_test_protocol(tmp_path, capsys):
    assert main(_train(tmp_path, "run")) == 0
    out = capsys.readouterr().out
    assert "checkpoint choice: best.ckpt is chosen on held-out 10% of the training images" in out
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["selected_on"].startswith("held-out") and m["test"]["checkpoint"] == "best.ckpt"
    assert f"test top1 {100 * m['test']['top1']:.2f}% of best.ckpt (chosen on held-out" in out
    meta = json.load(open(tmp_path / "run" / "model.json"))
    assert meta["selected_on"] == m["selected_on"]
    # metrics.csv holds the held-out evaluations only: one per epoch, none of the test pass
    with open(tmp_path / "run" / "metrics.csv") as f:
        vals = [r["val/top1"] for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(m["history"]) == 1
    assert [float(v) for v in vals] == pytest.approx([m["history"][0]["top1"]])


# ---- inputs follow the weights ----------------------------------------------------------------
def _cfg(pretrained, backbone="vit_base_patch16_224", **data):
    init = Namespace(backbone=backbone)
    return Namespace(model=Namespace(pretrained=pretrained,
                                     model=Namespace(class_path="x", init_args=init)),
                     data=Namespace(mean=data.get("mean"), std=data.get("std"),
                                    interpolation=data.get("interpolation"),
                                    crop_pct=data.get("crop_pct"),
                                    resize_size=data.get("resize_size")))


def test_inputs_follow_a_hub_tags_pretrained_cfg():
    cfg = _cfg("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    note = follow_weights(cfg)
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.5, 0.5, 0.5]
    assert cfg.data.interpolation == "bicubic" and cfg.data.crop_pct == 0.9
    assert "augreg2_in21k_ft_in1k" in note
    tv = _cfg("timm/resnet50.tv_in1k", "resnet50", resize_size=256)
    follow_weights(tv)
    assert tv.data.interpolation == "bilinear" and tv.data.crop_pct is None  # recipe's resize
    assert follow_weights(_cfg(None)) is None  # no weights: the ImageNet defaults stay


def test_a_recipe_that_contradicts_its_weights_is_refused_naming_both():
    cfg = _cfg("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
               mean=[0.485, 0.456, 0.406])
    with pytest.raises(InputError, match=r"data.mean \[0.485, 0.456, 0.406\] contradicts .*"
                                         r"augreg2_in21k_ft_in1k.*expect mean \[0.5, 0.5, 0.5\]"):
        follow_weights(cfg)
    ok = _cfg("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", mean=[0.5, 0.5, 0.5])
    follow_weights(ok)  # agreeing values are kept
    assert ok.data.mean == [0.5, 0.5, 0.5] and ok.data.std == [0.5, 0.5, 0.5]


def test_fine_tuning_a_finegrain_file_follows_its_recorded_normalisation(tmp_path, capsys):
    half = ["--data.mean", "[0.5, 0.5, 0.5]", "--data.std", "[0.5, 0.5, 0.5]"]
    assert main(_train(tmp_path, "pre", *half, "--data.val_split", "none")) == 0
    weights = str(tmp_path / "pre" / "weights.safetensors")
    assert main(_train(tmp_path, "fine", "--model.pretrained", weights,
                       "--data.val_split", "none")) == 0
    assert "inputs follow the weights: mean [0.5, 0.5, 0.5]" in capsys.readouterr().out
    meta = json.load(open(tmp_path / "fine" / "model.json"))
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]
    assert main(_train(tmp_path, "bad", "--model.pretrained", weights,
                       "--data.mean", "[0.485, 0.456, 0.406]")) == 2
    assert "contradicts the weights" in capsys.readouterr().err


# ---- each recipe's transforms -----------------------------------------------------------------
def _ops(tf) -> list[str]:
    out = []
    for t in tf.transforms:
        if isinstance(t, v2.RandomResizedCrop):
            out.append(f"RandomResizedCrop({list(t.size)}, scale={tuple(t.scale)})")
        elif isinstance(t, v2.Resize):
            out.append(f"Resize({t.size})")
        elif isinstance(t, (v2.CenterCrop, v2.RandomCrop)):
            out.append(f"{type(t).__name__}({list(t.size)})")
        else:
            out.append(type(t).__name__)
    return out


RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))
TASKS = {"dcal": None, "tasn": "classification", "dalg": "retrieval", "dml": "dml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(r, ROOT) for r in RECIPES])
def test_each_recipes_train_and_eval_transforms(recipe):
    cfg = yaml.safe_load(open(recipe))
    d = cfg["data"]
    task = TASKS[os.path.basename(os.path.dirname(recipe))] or \
        cfg["model"]["model"]["init_args"].get("task", "classification")
    task = {"fgvc": "classification"}.get(task, task)
    kw = dict(resize_size=d.get("resize_size"), resize_mode=d.get("resize_mode", "square"),
              rotation=d.get("rotation", 0.0), color_jitter=d.get("color_jitter", 0.0))
    train = _ops(build_transform(task, True, d["img_size"], **kw))
    kw.pop("rotation")
    kw.pop("color_jitter")
    ev = _ops(build_transform(task, False, d["img_size"], **kw))
    print(f"{os.path.relpath(recipe, ROOT)}\n  train: {train}\n  eval:  {ev}")
    if task == "dml":  # the standard DML pipeline (spec: RandomResizedCrop 224 + flip; 256 / 224)
        assert train[:2] == ["RandomResizedCrop([224, 224], scale=(0.08, 1.0))",
                             "RandomHorizontalFlip"]
        assert ev[:2] == ["Resize([256])", "CenterCrop([224, 224])"]
    if task == "classification" and d.get("resize_size"):
        assert train[0].startswith("Resize(") and ev[1].startswith("CenterCrop(")
