"""Every recipe parses with ``finegrain train``'s own parser: its model is a typed
``class_path`` / ``init_args`` of ``finegrain.models`` (every key a constructor argument), its
optimizer a ``torch.optim`` class."""

import warnings
from pathlib import Path

import pytest

from finegrain.engine.datamodule import FinegrainDataModule
from finegrain.engine.module import FinegrainModule
from finegrain.engine.run import FinegrainCLI

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*/*.yaml"))


class _Parsed(Exception):
    pass


class _ParseOnly(FinegrainCLI):
    def before_instantiate_classes(self):
        raise _Parsed(self)


@pytest.fixture(scope="module")
def parser():
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    with pytest.raises(_Parsed) as e:
        _ParseOnly(FinegrainModule, FinegrainDataModule, args=["fit", "--config",
                                                               str(RECIPES[0])],
                   auto_configure_optimizers=False, save_config_callback=None)
    return e.value.args[0].parser


def test_every_recipe_parses(parser):
    assert len(RECIPES) == 56
    for path in RECIPES:
        cfg = parser.parse_args(["fit", "--config", str(path)]).fit
        assert cfg.model.model.class_path.startswith("finegrain.models."), path.name
        assert cfg.model.optimizer.class_path in ("torch.optim.AdamW", "torch.optim.SGD")
        init = cfg.model.model.init_args
        if "img_size" in init:  # linked from the data (TASN has no img_size)
            size = init.img_size
            size = list(size) if isinstance(size, (list, tuple)) else size
            assert size == cfg.data.img_size, path.name
