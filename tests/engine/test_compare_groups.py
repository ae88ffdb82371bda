"""``finegrain compare --group-by recipe`` pools only runs of one resolved configuration (the
seed aside), and refuses a seed counted twice."""

from __future__ import annotations

import json

import pytest
import yaml

from finegrain.engine.report import compare_runs
from finegrain.errors import InputError


def _run(tmp, name, seed, top1, **data):
    run = tmp / name
    run.mkdir()
    cfg = {"seed_everything": seed, "run_dir": str(run),
           "data": {"dataset": "cub200", "img_size": 448, "seed": seed, **data},
           "model": {"optimizer": {"init_args": {"lr": 1e-4}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps({
        "task": "classification", "primary": "top1", "recipe": "/r/cub_deit_tiny.yaml",
        "best": {"top1": top1 + 0.1, "epoch": 3}, "test": {"checkpoint": "best.ckpt",
                                                          "top1": top1}}))
    return str(run)


def test_runs_of_other_sizes_or_datasets_are_not_pooled(tmp_path):
    runs = [_run(tmp_path, "a0", 0, 0.80), _run(tmp_path, "a1", 1, 0.82),
            _run(tmp_path, "b0", 0, 0.50, img_size=224),
            _run(tmp_path, "c0", 0, 0.60, dataset="cars196")]
    res = compare_runs(runs, group_by="recipe")
    rows = {r["group"]: r for r in res["rows"]}
    assert set(rows) == {"cub_deit_tiny", "cub_deit_tiny [data.img_size=224]",
                         "cub_deit_tiny [data.dataset=cars196]"}
    assert rows["cub_deit_tiny"]["n"] == 2 and rows["cub_deit_tiny"]["seeds"] == [0, 1]
    assert rows["cub_deit_tiny"]["mean"] == pytest.approx(0.81)  # the test numbers
    assert rows["cub_deit_tiny"]["evaluated_on"] == ["test"]


def test_a_seed_counted_twice_is_refused(tmp_path):
    runs = [_run(tmp_path, "a0", 0, 0.80), _run(tmp_path, "copy", 0, 0.80),
            _run(tmp_path, "a1", 1, 0.82)]
    with pytest.raises(InputError, match=r"same seed 0 and configuration"):
        compare_runs(runs, group_by="recipe")
