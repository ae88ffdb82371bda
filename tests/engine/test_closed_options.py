"""Every option with a closed set of values refuses a misspelt value: ``finegrain train`` at
parse time (one paragraph naming the option, the accepted values and the nearest one), and
the Python constructors with the same list (an InputError, also a ValueError)."""

import typing
from pathlib import Path

import pytest
import torch.nn as nn

from finegrain.choices import choice_values
from finegrain.cli import main
from finegrain.engine import datamodule, module
from finegrain.engine.datamodule import FinegrainDataModule
from finegrain.engine.module import FinegrainModule
from finegrain.errors import InputError
from finegrain.models import cross_image, dalg, dcal, tasn
from finegrain.models.classifier import ClassifierTask
from finegrain.models.registry import create_model
from finegrain.models.tiny import tiny_kwargs

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DCAL = RECIPES / "dcal" / "cub_deit_tiny.yaml"
TASN = RECIPES / "tasn" / "cub_resnet50_224.yaml"
DML = RECIPES / "dml" / "cub_resnet50.yaml"
DALG = RECIPES / "dalg" / "gldv2_vit_small.yaml"

# (recipe, option, misspelt value, its Literal, the nearest accepted value or None)
CASES = [
    (DCAL, "model.scheduler", "cosin", module.Scheduler, "cosine"),
    (DCAL, "model.nonfinite", "skpi", module.NonFinite, "skip"),
    (DCAL, "data.sampler", "pkk", datamodule.Sampler, "pk"),
    (DCAL, "data.resize_mode", "shortr", datamodule.ResizeMode, "shorter"),
    (DCAL, "data.on_error", "skp", datamodule.OnError, "skip"),
    (DCAL, "model.model.task", "clasification", dcal.DCALTask, "classification"),
    (DCAL, "model.model.glca_selection", "rolout", dcal.GlcaSelection, "rollout"),
    (TASN, "model.model.clip", "per-axes", tasn.ClipRule, "per_axis"),
    (TASN, "model.model.sampler_map", "uniforn", tasn.SamplerMap, "uniform"),
    (TASN, "model.model.test_head", "mastr", tasn.TestHead, "master"),
    (DML, "model.model.hierarchy", "mutal", cross_image.Hierarchy, "mutual"),
    (DML, "model.model.pool", "avgmx", cross_image.Pool, "avgmax"),
    (DML, "model.model.loss", "multi_similarty", cross_image.DMLLoss, "multi_similarity"),
    (DML, "model.model.cond_loss", "contrastiv", cross_image.PairLoss, "contrastive"),
    (DML, "model.model.miner", "ms", cross_image.Miner, None),
    (DALG, "model.model.local", "window", dalg.Local, "window_attention"),
    (DALG, "model.model.fusion", "orthogonl", dalg.Fusion, "orthogonal"),
    (DALG, "model.model.global_pool", "tokn", dalg.GlobalPool, "token"),
]


@pytest.mark.parametrize("recipe,option,bad,kind,near", CASES,
                         ids=[c[1] for c in CASES])
def test_the_cli_refuses_a_misspelt_value_at_parse_time(recipe, option, bad, kind, near,
                                                         capsys):
    rc = main(["train", "--config", str(recipe), f"--{option}", bad, "--print_config"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one paragraph, no usage dump
    assert f"--{option} '{bad}'" in err
    assert all(f"'{v}'" in err for v in typing.get_args(kind)), err
    if near:
        assert f"did you mean '{near}'" in err


def test_an_unknown_option_names_the_nearest(capsys):
    rc = main(["train", "--config", str(DCAL), "--model.schedular", "cosine", "--print_config"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--model.schedular" in err and "did you mean --model.scheduler?" in err


def test_the_alias_fgvc_still_parses(capsys):
    with pytest.raises(SystemExit) as e:  # --print_config exits 0
        main(["train", "--config", str(DCAL), "--model.model.task", "fgvc", "--print_config"])
    assert e.value.code in (0, None)
    assert "task: fgvc" in capsys.readouterr().out


@pytest.mark.parametrize("key,bad,kind", [("scheduler", "cosin", module.Scheduler),
                                          ("nonfinite", "skpi", module.NonFinite)])
def test_the_module_refuses(key, bad, kind):
    with pytest.raises(InputError) as e:
        FinegrainModule(nn.Linear(2, 2), **{key: bad})
    assert f"model.{key} '{bad}'" in str(e.value)
    assert all(f"'{v}'" in str(e.value) for v in choice_values(kind))


@pytest.mark.parametrize("key,bad,kind", [("sampler", "pkk", datamodule.Sampler),
                                          ("resize_mode", "shortr", datamodule.ResizeMode),
                                          ("on_error", "skp", datamodule.OnError)])
def test_the_datamodule_refuses(key, bad, kind):
    with pytest.raises(InputError) as e:
        FinegrainDataModule("synthetic_fgvc", **{key: bad})
    assert all(f"'{v}'" in str(e.value) for v in choice_values(kind))


def test_the_datamodule_refuses_a_split_the_dataset_lacks():
    with pytest.raises(InputError, match="data.val_split.*'tets'.*did you mean 'test'"):
        FinegrainDataModule("synthetic_fgvc", val_split="tets")
    FinegrainDataModule("synthetic_fgvc", val_split="none")


@pytest.mark.parametrize("name,key,bad,kind", [
    ("vit_tiny_patch16_224", "task", "clasification", ClassifierTask),
    ("dcal_deit_tiny_patch16_224", "glca_selection", "rolout", dcal.GlcaSelection),
    ("tasn_resnet18", "clip", "per-axes", tasn.ClipRule),
    ("tasn_resnet18", "sampler_map", "uniforn", tasn.SamplerMap),
    ("tasn_resnet18", "test_head", "mastr", tasn.TestHead),
    ("cross_image_resnet18", "hierarchy", "mutal", cross_image.Hierarchy),
    ("cross_image_resnet18", "pool", "avgmx", cross_image.Pool),
    ("cross_image_resnet18", "loss", "multi_similarty", cross_image.DMLLoss),
    ("cross_image_resnet18", "cond_loss", "contrastiv", cross_image.PairLoss),
    ("cross_image_resnet18", "miner", "ms", cross_image.Miner),
    ("dalg_deit_tiny_patch16_224", "local", "window", dalg.Local),
    ("dalg_deit_tiny_patch16_224", "fusion", "orthogonl", dalg.Fusion),
    ("dalg_deit_tiny_patch16_224", "global_pool", "tokn", dalg.GlobalPool),
])
def test_the_models_refuse(name, key, bad, kind):
    with pytest.raises(InputError) as e:
        create_model(name, num_classes=4, **{**tiny_kwargs(name), key: bad})
    msg = str(e.value)
    assert f"'{bad}'" in msg and key in msg
    assert all(f"'{v}'" in msg for v in choice_values(kind) if v not in ("fgvc",)), msg
