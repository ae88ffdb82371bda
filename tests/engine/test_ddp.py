"""Evaluation under DDP (2 CPU processes, gloo) gives exactly the single-process metrics: every
sample evaluated once, no padded duplicates, even with shards of unequal size."""

import lightning.pytorch as pl
import pytest
import torch

from finegrain.engine import FinegrainDataModule, FinegrainModule
from finegrain.models import create_model
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

TINY = tiny_kwargs("vit_tiny_patch16_224")


def _validate(task_ds, cfg, devices, tmp_path, model_kwargs):
    torch.manual_seed(0)
    dm = FinegrainDataModule(task_ds, root=str(tmp_path / "cache"), img_size=[32, 32],
                             batch_size=4, num_workers=0, dataset_kwargs={"config": cfg})
    module = FinegrainModule(create_model("vit_tiny_patch16_224", num_classes=dm.num_classes,
                                          **model_kwargs))
    dm.val_set  # noqa: B018
    module.set_data_meta(dm.meta())
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         strategy="ddp_spawn" if devices > 1 else "auto")
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


def test_ddp_classification_eval_equals_single_process(tmp_path):
    # 5 classes x 3 test images = 15 samples: shards of 8 and 7
    cfg = dict(num_classes=5, train_per_class=2, test_per_class=3, size=32, seed=1)
    one = _validate("synthetic_fgvc", cfg, 1, tmp_path, TINY)
    two = _validate("synthetic_fgvc", cfg, 2, tmp_path, TINY)
    assert one.keys() == two.keys() and "val/top1" in one
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-7), k


def test_ddp_reid_eval_equals_single_process(tmp_path):
    cfg = dict(num_train_ids=4, num_test_ids=5, num_cameras=2, images_per_camera=2,
               height=32, width=32, seed=1)
    one = _validate("synthetic_reid", cfg, 1, tmp_path, {**TINY, "task": "reid"})
    two = _validate("synthetic_reid", cfg, 2, tmp_path, {**TINY, "task": "reid"})
    assert "val/mAP" in one
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-6), k


@pytest.mark.slow
def test_ddp_training_two_processes_writes_run_folder(tmp_path):
    """`finegrain train` under DDP (2 CPU processes, gloo): trains, checkpoints, evaluates."""
    import json

    from finegrain.engine import train
    cfg = dict(num_classes=4, train_per_class=8, test_per_class=3, size=32, seed=0)
    run = tmp_path / "run"
    train(["--run-dir", str(run), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
           "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
           "--model.model", model_arg("vit_tiny_patch16_224", TINY),
           "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp_path / "cache"),
           "--data.dataset_kwargs", json.dumps({"config": cfg}),
           "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"])
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2 * (32 // (4 * 2))  # each rank takes every other batch
    hist = json.load(open(run / "metrics.json"))["history"]
    assert len(hist) == 2 and 0 <= hist[-1]["top1"] <= 1
