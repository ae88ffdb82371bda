"""finegrain: attention-based fine-grained recognition and retrieval (DCAL, TASN, DALG,
cross-image attention DML) on one data / training / evaluation / search pipeline."""

__version__ = "0.1.0"

from .meta import ModelMeta, read_meta  # noqa: E402
from .models import create_model, list_models, load_model  # noqa: E402

__all__ = ["create_model", "list_models", "load_model", "open_model", "ModelMeta", "read_meta",
           "load", "init_model", "Searcher", "predict", "evaluate_checkpoint", "explain",
           "__version__"]


def __getattr__(name: str):
    """``finegrain.load``, ``finegrain.init_model`` and ``finegrain.Searcher``
    (:mod:`finegrain.api`), ``predict``, ``evaluate_checkpoint`` and ``explain``
    (:mod:`finegrain.inference`), ``open_model`` (:mod:`finegrain.loading`), imported on
    use."""
    if name in ("load", "init_model", "Searcher"):
        from . import api
        return getattr(api, name)
    if name in ("predict", "evaluate_checkpoint", "explain"):
        from . import inference
        return getattr(inference, name)
    if name == "open_model":
        from .loading import open_model
        return open_model
    raise AttributeError(f"module 'finegrain' has no attribute {name!r}")
