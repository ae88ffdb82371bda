"""The one training loop: Lightning module + data module + ``finegrain train``."""

from .datamodule import FinegrainDataModule
from .module import FinegrainModule, compute_metrics, primary_metric
from .run import train

__all__ = ["FinegrainDataModule", "FinegrainModule", "compute_metrics", "primary_metric", "train"]
