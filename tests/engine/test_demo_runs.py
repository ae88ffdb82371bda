"""``finegrain demo``'s own runs (``make demo``): each trains through ``finegrain train`` into
a folder that the run claim accepts (the recipe and the log lie beside it: a run folder holding
other files is refused), a finished run is reused, and a changed recipe trains again into the
same folder."""

from __future__ import annotations

import os

from finegrain.demo import _finished, _train, _write_recipe
from finegrain.models.registry import model_config
from finegrain.models.tiny import tiny_kwargs

NAME = "vit_tiny_patch16_224"


def _recipe(tmp, epochs: int) -> dict:
    return {"trainer": {"max_epochs": epochs, "accelerator": "cpu",
                        "enable_progress_bar": False, "num_sanity_val_steps": 0,
                        "enable_model_summary": False},
            "model": {"model": model_config(NAME, **tiny_kwargs(NAME))},
            "data": {"dataset": "synthetic_fgvc", "root": str(tmp / "cache"),
                     "dataset_kwargs": {"config": {"num_classes": 4, "train_per_class": 4,
                                                   "test_per_class": 1, "size": 32,
                                                   "seed": 0}},
                     "val_split": "test", "img_size": 32, "batch_size": 8, "num_workers": 0}}


def test_demo_runs_train_reuse_and_retrain_in_their_folders(tmp_path):
    run = str(tmp_path / "demo" / "fgvc-method-seed0")
    first = _recipe(tmp_path, 1)
    seconds, err = _train(_write_recipe(first, run, 0), run, threads=1)
    assert err is None, err  # was: "--run-dir ... is not empty (recipe.yaml, train.log)"
    assert _finished(first, run, 0) and os.path.isfile(run + ".train.log")
    assert not {"recipe.yaml", "train.log"} & set(os.listdir(run))
    second = _recipe(tmp_path, 2)  # another recipe: the folder's run is replaced
    assert not _finished(second, run, 0)
    seconds, err = _train(_write_recipe(second, run, 0), run, threads=1)
    assert err is None, err
    assert _finished(second, run, 0) and not _finished(first, run, 0)
