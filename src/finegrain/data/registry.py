"""Dataset registry: ``build_dataset(name, root, split)`` with the names of DESIGN.md."""

from __future__ import annotations

import difflib
from typing import Callable

from .datasets.base import DatasetError, ImageDataset

__all__ = ["PUBLISHED_CLASSES", "register_dataset", "list_datasets", "get_dataset_class",
           "build_dataset"]

_DATASETS: dict[str, type[ImageDataset] | Callable[..., ImageDataset]] = {}


PUBLISHED_CLASSES = {"cub200": 200, "cars196": 196, "aircraft": 100, "nabirds": 555,
                     "inat2017": 5089, "market1501": 751, "dukemtmcreid": 702, "msmt17": 1041,
                     "veri776": 576, "gldv2": 81313, "cub200_dml": 100, "cars196_dml": 98,
                     "sop": 11318, "inshop": 3997}
"""Training classes of the published splits (sizing a model before the data is at hand)."""


def register_dataset(name: str):
    """Class decorator: register a reader under ``name``."""
    def wrap(cls):
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = cls
        return cls
    return wrap


def list_datasets() -> list[str]:
    _import_all()
    return sorted(_DATASETS)


def get_dataset_class(name: str):
    _import_all()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=5, cutoff=0.4)
        raise DatasetError(f"unknown dataset {name!r}; closest names: {', '.join(close) or '-'}"
                           f" (all: {', '.join(sorted(_DATASETS))})")
    return _DATASETS[name]


def build_dataset(name: str, root: str | None, split: str, **kwargs) -> ImageDataset:
    """Build a registered dataset reader.

    Args:
        name: registry name (``cub200``, ``market1501``, ``synthetic_fgvc`` ...).
        root: dataset root; for ``synthetic_*`` the cache folder (``None``: default cache).
        split: split name (``train``, ``test``, ``query``, ``gallery``, ``val``).
        **kwargs: reader options (``transform``, ``on_error`` ...).
    """
    return get_dataset_class(name)(root, split, **kwargs)


def _import_all() -> None:
    import importlib
    import pkgutil

    from . import datasets
    for m in pkgutil.iter_modules(datasets.__path__):
        importlib.import_module(f"{datasets.__name__}.{m.name}")
    for mod in ("synthetic", "synthetic_landmarks"):
        importlib.import_module(f"finegrain.data.{mod}")
