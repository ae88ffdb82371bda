"""Models as typed configs: a registered name resolves to ``class_path`` / ``init_args`` that
build the same model (same init, bit for bit; the demo's recipes included), checkpoints store
that config as YAML text and rebuild from it (only classes of ``finegrain.models``), and
checkpoints of the earlier format (``model_name`` / ``model_kwargs`` alone) still load."""

import copy
import inspect

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from finegrain import demo
from finegrain.errors import InputError
from finegrain.meta import SCHEMA_VERSION
from finegrain.models import create_model, load_model
from finegrain.models.registry import (FinegrainModel, config_meta, list_models, model_config,
                                       model_from_meta, registry_name, resolve_class)
from finegrain.models.tiny import tiny_kwargs

NAME = "dcal_vit_tiny_r_s16_p8_224"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _cli_build(config: dict, **linked) -> torch.nn.Module:
    """The model as ``finegrain train`` builds it: jsonargparse instantiates ``model.model``
    with the linked ``num_classes`` / ``img_size`` (when the class takes them)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FinegrainModel, "model")
    config = copy.deepcopy(config)
    params = inspect.signature(resolve_class(config["class_path"])).parameters
    config["init_args"].update({k: v for k, v in linked.items() if k in params})
    cfg = parser.parse_object({"model": config})
    return parser.instantiate(cfg).model


def test_every_registered_name_is_its_class_with_the_backbone_of_its_name():
    for name in list_models():
        config = model_config(name)
        assert config["class_path"].startswith("finegrain.models.")
        assert name.endswith(config["init_args"]["backbone"]), name
        assert registry_name(config) == (name, {k: v for k, v in config["init_args"].items()
                                                if k != "backbone"})


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "dcal_deit_tiny_patch16_224",
                                  "tasn_resnet18", "dalg_deit_tiny_patch16_224",
                                  "cross_image_resnet18"])
def test_config_builds_the_registered_model_bit_identically(name):
    kw = tiny_kwargs(name)
    torch.manual_seed(0)
    ref = create_model(name, num_classes=5, **kw)
    torch.manual_seed(0)
    built = _cli_build(model_config(name, **kw), num_classes=5)
    assert type(built) is type(ref) and _same(built, ref)


def test_demo_recipes_build_the_models_of_before():
    """Each demo arm's ``model.model`` (with data.img_size linked) builds, init for init, what
    ``create_model(name, **kwargs)`` of the arm's registered name built before."""
    arms = [r for e in demo.demo_entries() for r in e.arms.values()]
    arms += list(demo.pretrain_recipes().values())
    first = demo.demo_entries()[0].arms["method"]["model"]["model"]
    vit_kw = {k: v for k, v in demo._VIT_KW.items() if k != "img_size"}
    assert registry_name(first) == (demo._DCAL, {**vit_kw, "task": "classification", "glca": True,
                                                 "pwca": True})
    seen = []
    for r in arms:
        config, size = r["model"]["model"], r["data"]["img_size"]
        if (config, size) in seen:
            continue
        seen.append((config, size))
        name, kwargs = registry_name(config)
        old = dict(kwargs)
        if "img_size" in inspect.signature(resolve_class(config["class_path"])).parameters:
            old["img_size"] = size  # before: in the demo's model_kwargs, or from data.img_size
        torch.manual_seed(0)
        ref = create_model(name, num_classes=6, **old)
        torch.manual_seed(0)
        built = _cli_build(config, num_classes=6, img_size=size)
        assert _same(built, ref), name


def _checkpoint(tmp_path, meta: dict, model: torch.nn.Module) -> str:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta, "global_step": 3}, path)
    return str(path)


def _data_meta():
    return {"class_names": [str(i) for i in range(5)], "img_size": 32, "task": "classification",
            "dataset": "synthetic_fgvc", "mean": [0.5] * 3, "std": [0.25] * 3}


def test_checkpoint_of_the_earlier_format_still_loads(tmp_path):
    """A checkpoint written before model configs: ``finegrain_meta`` with ``model_name`` /
    ``model_kwargs`` only."""
    kw = {**tiny_kwargs(NAME), "glca": False, "pwca": False, "num_classes": 5}
    torch.manual_seed(1)
    trained = create_model(NAME, **kw)
    path = _checkpoint(tmp_path, {"model_name": NAME, "model_kwargs": kw, **_data_meta()},
                       trained)
    model, meta = load_model(path)
    assert meta.model_config is None and meta.schema == SCHEMA_VERSION and not model.training
    assert type(model).__name__ == "DCAL" and not model.glca and _same(model, trained)


def test_checkpoint_rebuilds_from_its_model_config(tmp_path):
    kw = {**tiny_kwargs(NAME), "pwca": False, "num_classes": 5}
    torch.manual_seed(1)
    trained = create_model(NAME, **kw)
    meta = {**config_meta(trained.finegrain_config), **_data_meta()}
    assert meta["model_name"] == NAME and meta["model_kwargs"]["pwca"] is False
    # the config wins over the derived name / kwargs (which only older readers use)
    meta["model_kwargs"] = {"num_classes": 1}
    model, _ = load_model(_checkpoint(tmp_path, meta, trained))
    assert _same(model, trained) and not model.pwca and model.glca
    assert torch.load(tmp_path / "old.ckpt", weights_only=True)["finegrain_meta"] == meta


@pytest.mark.parametrize("class_path", ["os.system", "torch.nn.Linear",
                                        "finegrain.models.registry.FinegrainModel",
                                        "finegrain.models.dcal.GlobalLocalCrossAttention",
                                        "finegrain.models.dcal.DCALL",
                                        "finegrain.modelsx.Evil"])
def test_model_config_names_only_finegrain_model_classes(tmp_path, class_path):
    meta = {"model_config": yaml.safe_dump({"class_path": class_path, "init_args": {}}),
            "model_name": NAME, "model_kwargs": {}}
    with pytest.raises(InputError, match="class_path"):
        model_from_meta(meta)


def test_weight_paths_are_not_part_of_the_stored_config():
    config = model_config("tasn_resnet18", attention_pretrained="/weights/r18.pth")
    meta = config_meta(config)
    assert "attention_pretrained" not in yaml.safe_load(meta["model_config"])["init_args"]
    assert "attention_pretrained" not in meta["model_kwargs"]
