"""One name per task: the models say ``task="classification"`` as the datasets and the
checkpoint meta do; ``"fgvc"`` (the older name, stored in checkpoints' ``model_config`` before
2026-11-30) still builds the same model, and an unknown task names the accepted values."""

import pytest
import torch
import yaml

from finegrain.models import create_model
from finegrain.models.registry import model_config, model_from_meta
from finegrain.models.tiny import tiny_input_size, tiny_kwargs

NAMES = ["dcal_deit_tiny_patch16_224", "vit_tiny_patch16_224", "resnet18"]


def _build(name: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=4, task=task, **tiny_kwargs(name))


def _losses(model: torch.nn.Module, name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, *tiny_input_size(name), generator=g)
    torch.manual_seed(2)  # PWCA's pairs, dropout
    out = model.train()(images, targets=torch.tensor([0, 0, 1, 1]))
    return {k: v.detach() for k, v in out["losses"].items()}


@pytest.mark.parametrize("name", NAMES)
def test_fgvc_is_classification(name):
    old, new = _build(name, "fgvc"), _build(name, "classification")
    assert old.task == new.task == "classification"
    so, sn = old.state_dict(), new.state_dict()
    assert so.keys() == sn.keys() and all(torch.equal(so[k], sn[k]) for k in so)
    lo, ln = _losses(old, name), _losses(new, name)
    assert lo.keys() == ln.keys() and all(torch.equal(lo[k], ln[k]) for k in lo)


def test_a_checkpoint_config_saying_fgvc_loads_as_classification():
    name = "dcal_deit_tiny_patch16_224"
    config = model_config(name, num_classes=4, task="fgvc", **tiny_kwargs(name))
    torch.manual_seed(0)
    model = model_from_meta({"model_config": yaml.safe_dump(config), "model_name": name})
    ref = _build(name, "classification")
    assert model.task == "classification"
    sa, sb = model.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,accepted", [("dcal_deit_tiny_patch16_224", ("classification",
                                                                           "reid")),
                                           ("vit_tiny_patch16_224", ("classification", "reid",
                                                                     "dml"))])
def test_an_unknown_task_names_the_accepted_ones(name, accepted):
    with pytest.raises(ValueError) as e:
        _build(name, "classifcation")
    msg = str(e.value)
    assert "'classifcation'" in msg and all(f"'{a}'" in msg for a in accepted)
    assert "'fgvc'" in msg  # the older name, still accepted
