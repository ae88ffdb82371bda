"""One way to open a model (``finegrain.loading``): a checkpoint or an export folder -> one
frozen ``LoadedModel``, the same hash for both, and one strictness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finegrain.errors import InputError, MissingFileError
from finegrain.loading import IN_MEMORY, checkpoint_hash, in_memory, open_model

from .deploy.helpers import DALG, write_checkpoint


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    from finegrain.export import export
    tmp = tmp_path_factory.mktemp("loading")
    ck = write_checkpoint(tmp / "m.ckpt", DALG, "retrieval")
    export(ck, str(tmp / "pt2"), "exported", num_images=2)
    return ck, str(tmp / "pt2")


def test_a_checkpoint_and_its_export_open_alike(opened):
    ck, folder = opened
    a, b = open_model(ck), open_model(folder)
    assert not a.exported and b.exported and b.runtime == "torch"
    assert a.checkpoint_hash == b.checkpoint_hash == checkpoint_hash(ck)
    assert a.meta.model_name == b.meta.model_name == DALG and not a.model.training
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b.model(x)["embedding"], a.model(x)["embedding"],
                                   rtol=0, atol=1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.meta = None  # one record per opened model


def test_what_cannot_be_opened_is_one_paragraph(opened, tmp_path):
    ck, folder = opened
    with pytest.raises(InputError, match="--runtime onnx runs an export folder"):
        open_model(ck, "onnx")
    with pytest.raises(InputError, match="is an export folder: its model is fixed"):
        open_model(folder, sa_only=True)
    with pytest.raises(MissingFileError):
        open_model(tmp_path / "nothing.ckpt")


def test_a_model_object_has_its_records_hash_or_none(opened):
    ck, _ = opened
    loaded = open_model(ck)
    assert in_memory(loaded.model).checkpoint_hash == IN_MEMORY
    assert in_memory(loaded.model, loaded.meta.to_dict(), ck).checkpoint_hash == \
        checkpoint_hash(ck)
