"""The one model record (finegrain.meta.ModelMeta): written by training, export and read
back by one validating reader; schema 1 (the untyped dicts before 2026-11-30) still loads."""

import json

import pytest
import torch

from finegrain.errors import InputError
from finegrain.meta import SCHEMA_VERSION, ModelMeta, read_meta
from finegrain.models import create_model, load_model
from finegrain.models.registry import config_meta, with_model_args
from finegrain.models.tiny import tiny_kwargs

NAME = "vit_tiny_patch16_224"


def _record(**changes) -> dict:
    kw = {**tiny_kwargs(NAME), "num_classes": 3}
    model = create_model(NAME, **kw)
    return {**config_meta(model.finegrain_config), "task": "classification",
            "dataset": "synthetic_fgvc", "class_names": ["a", "b", "c"], "img_size": 32,
            "mean": [0.5] * 3, "std": [0.25] * 3, **changes}


def test_round_trip_through_json_is_exact():
    meta = read_meta(_record(img_size=[32, 16], resize_size=40), "x")
    again = read_meta(json.loads(json.dumps(meta.to_dict())), "y")
    assert again == meta and again.schema == SCHEMA_VERSION
    assert again.img_size == (32, 16) and again.class_names == ("a", "b", "c")
    assert isinstance(meta.to_dict()["img_size"], list)  # plain data: torch weights_only-safe


def test_schema_1_is_upgraded_and_its_num_query_dropped():
    old = _record(num_query=48)  # as written before the record had a schema
    meta = read_meta(old, "old.ckpt")
    assert meta.schema == SCHEMA_VERSION and "num_query" not in meta.to_dict()
    with pytest.raises(InputError, match="new.json: unknown key.*num_query"):
        read_meta({**old, "schema": SCHEMA_VERSION}, "new.json")  # not in the current schema


@pytest.mark.parametrize("change, message", [
    ({"schema": SCHEMA_VERSION + 1}, "written by a newer finegrain.*upgrade"),
    ({"schema": SCHEMA_VERSION, "img_sise": 32}, "unknown key.*img_sise"),
    ({"task": "fgvcx"}, "task 'fgvcx' is not one of"),
    ({"img_size": "32"}, "img_size '32' is not a positive int"),
    ({"img_size": [32, 0]}, "img_size"),
    ({"mean": [0.5, 0.5]}, "mean .* is not three numbers"),
    ({"class_names": "abc"}, "class_names is a str"),
    ({"model_name": "", "model_config": None}, "the model record names no model"),
])
def test_a_damaged_record_is_refused_naming_the_file(change, message):
    with pytest.raises(InputError, match="run/model.json: " + message):
        read_meta(_record(**change), "run/model.json")


def test_a_damaged_model_json_beside_weights_names_the_file(tmp_path):
    model = create_model(NAME, **{**tiny_kwargs(NAME), "num_classes": 3})
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    (tmp_path / "model.json").write_text(json.dumps(_record(task="detection")))
    with pytest.raises(InputError, match=f"{tmp_path / 'model.json'}: task 'detection'"):
        load_model(str(tmp_path / "weights.safetensors"))
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="model.json is not valid JSON"):
        load_model(str(tmp_path / "weights.safetensors"))


def test_schema_1_checkpoint_loads_and_rewrites_as_schema_2(tmp_path):
    kw = {**tiny_kwargs(NAME), "num_classes": 3}
    torch.manual_seed(0)
    model = create_model(NAME, **kw)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": _record(num_query=0)}, path)
    loaded, meta = load_model(str(path))
    assert meta.model_name == NAME and meta.class_names == ("a", "b", "c")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model.eval()(x)["logits"])


def test_with_model_args_changes_both_model_descriptions():
    import yaml
    meta = with_model_args(read_meta(_record(), "x"), drop_path_rate=0.25)
    assert meta.model_kwargs["drop_path_rate"] == 0.25
    assert yaml.safe_load(meta.model_config)["init_args"]["drop_path_rate"] == 0.25
    assert load_model_from(meta).backbone.blocks[-1].drop_path1.drop_prob == 0.25


def load_model_from(meta):
    from finegrain.models.registry import model_from_meta
    return model_from_meta(meta)


def test_replace_validates():
    meta = read_meta(_record(), "x")
    assert meta.replace(task="reid").task == "reid" and meta.task == "classification"
    with pytest.raises(InputError, match="task"):
        meta.replace(task="nope")
    assert isinstance(ModelMeta().to_dict(), dict)
