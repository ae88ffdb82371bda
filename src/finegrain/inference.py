"""The Python calls behind ``finegrain predict``, ``eval`` and ``explain``: top-k classes of
images, a checkpoint's metrics on its dataset, attention pictures. ``finegrain.cli`` only
parses their arguments and prints their results; ``finegrain.predict``,
``finegrain.evaluate_checkpoint`` and ``finegrain.explain`` are these functions."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import InputError, nonfinite_outputs
from .meta import ModelMeta, read_meta

if TYPE_CHECKING:
    from .loading import LoadedModel

__all__ = ["eval_transform", "evaluate_checkpoint", "explain", "explain_paths", "load_images",
           "predict", "reid_distances", "reid_metrics"]


# ---- predict ----------------------------------------------------------------------------
def eval_transform(meta: ModelMeta | dict):
    """The evaluation transform of a checkpoint's record (uint8 (3, H, W) -> normalised
    (3, h, w)): its task's protocol at its image size."""
    from .data.transforms import build_transform
    meta = read_meta(meta, "eval_transform", require_model=False)
    task = "reid" if meta.task == "retrieval" else meta.task  # retrieval: a plain resize
    return build_transform(task, False, meta.img_size, meta.resize_size, meta.mean, meta.std,
                           resize_mode=meta.resize_mode, interpolation=meta.interpolation,
                           crop_pct=meta.crop_pct)


def load_images(paths: list[str], meta: ModelMeta | dict):
    """(B, 3, h, w): the image files ``paths`` through :func:`eval_transform`."""
    import torch
    from .data.datasets.base import read_image
    tf = eval_transform(meta)
    return torch.stack([tf(read_image(p)) for p in paths])


def predict(checkpoint: str, images: list[str], topk: int = 5,
            runtime: str = "torch") -> list[dict]:
    """Top-k class names and probabilities for each image (``softmax(logits)``).
    ``checkpoint``: a finegrain checkpoint or an export folder (``finegrain export``), run by
    ``runtime``: ``"torch"`` (the checkpoint, or the folder's ``torch.export`` program) or
    ``"onnx"`` (the folder's ``model.onnx`` on ONNX Runtime)."""
    import torch
    from .loading import open_model
    loaded = open_model(checkpoint, runtime)
    model, meta = loaded.model, loaded.meta
    task = meta.task
    if task != "classification":
        raise InputError(f"{checkpoint} is a {task} model: its classes are the training "
                         f"identities, not answers about new images; compare images by their "
                         f"embeddings instead (`finegrain embed`, then `finegrain index search`)")
    names = meta.class_names
    with torch.no_grad():
        probs = model(load_images(images, meta))["logits"].float().softmax(-1)
    bad = int((~torch.isfinite(probs).all(1)).sum())
    if bad:
        raise nonfinite_outputs(checkpoint, bad, len(images), "probabilities")
    k = min(topk, probs.shape[1])
    p, i = probs.topk(k, dim=1)
    return [{"image": img, "top": [{"class": names[c] if c < len(names) else str(c), "index": c,
                                    "prob": float(q)} for q, c in zip(p[b], i[b].tolist())]}
            for b, img in enumerate(images)]


# ---- eval -------------------------------------------------------------------------------
def evaluate_checkpoint(checkpoint: str, overrides: dict | None = None,
                        devices: int | str = 1, accelerator: str = "auto",
                        progress: bool = True, model_overrides: dict | None = None,
                        rerank: bool = False, aqe: int = 0, visrank: int = 0,
                        visrank_out: str | None = None, visrank_queries: int = 8,
                        info: dict | None = None) -> dict:
    """Evaluate a checkpoint on its dataset's evaluation split (same code path as training,
    DDP-exact); returns the metrics (fractions in [0, 1]). ``overrides``:
    ``FinegrainDataModule`` arguments (``root`` ...); ``model_overrides``: inference-time
    model arguments (DCAL ``sa_only``, ``glca_selection``) that leave the weights unchanged.
    Re-ID only: ``aqe`` (alpha-QE with the top ``aqe`` gallery matches, then) ``rerank``
    (k-reciprocal, ``evaluation.reid.re_rank``); ``visrank``: write the top-``visrank``
    ranked gallery of ``visrank_queries`` queries to ``visrank_out`` (the path is returned
    under ``"visrank"``). ``info``, when given, receives the dataset, root, split and task
    evaluated. Another ``dataset`` in ``overrides`` drops the training dataset's
    ``dataset_kwargs`` (pass its own under ``dataset_kwargs``)."""
    import lightning.pytorch as pl
    from .engine import FinegrainDataModule, FinegrainModule
    from .engine.datamodule import QueryGallery
    from .engine.run import quiet_lightning
    from .loading import open_model
    quiet_lightning()
    loaded = open_model(checkpoint, **(model_overrides or {}))  # whole, or refused
    if loaded.exported:
        raise InputError(f"{checkpoint} is an export folder; evaluate the checkpoint it came "
                         f"from (export.json 'checkpoint')")
    meta = loaded.meta
    if meta.task == "retrieval":
        raise InputError(f"{checkpoint} is a retrieval model: evaluate it with `finegrain "
                         f"retrieval eval {checkpoint} --dataset NAME --root DIR`")
    if (rerank or aqe or visrank) and meta.task != "reid":
        raise InputError(f"--rerank, --aqe and --visrank are for Re-ID checkpoints; "
                         f"{checkpoint} is a {meta.task} model")
    module = FinegrainModule(loaded.model)
    module.set_data_meta(meta)
    data = {"dataset": meta.dataset, "img_size": meta.img_size,
            "resize_size": meta.resize_size, "mean": meta.mean, "resize_mode": meta.resize_mode,
            "std": meta.std, "interpolation": meta.interpolation, "crop_pct": meta.crop_pct,
            "val_split": "test", "num_workers": 2, "batch_size": 64,
            "dataset_kwargs": meta.dataset_kwargs}
    overrides = dict(overrides or {})
    if overrides.get("dataset", meta.dataset) != meta.dataset:
        # another dataset: the training set's reader arguments are not its arguments
        data["dataset_kwargs"] = None
    data.update(overrides)
    dm = FinegrainDataModule(**data)
    if dm.val_set is None:
        raise InputError(f"dataset {dm.hparams.dataset} has no evaluation split for training-"
                         f"time evaluation; use `finegrain retrieval eval`")
    if info is not None:
        hp = dm.hparams
        info.update(dataset=hp.dataset, root=hp.root, task=dm.task,
                    selected_on=meta.selected_on or "not recorded (before finegrain recorded "
                                                    "it, the test split by default)",
                    split=("query+gallery" if isinstance(dm.val_set, QueryGallery)
                           else dm.val_mode))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, devices=devices,
                         accelerator=accelerator, use_distributed_sampler=False,
                         enable_model_summary=False, enable_progress_bar=progress)
    trainer.validate(module, datamodule=dm, verbose=False)
    if module.nonfinite_outputs:
        raise nonfinite_outputs(checkpoint, module.nonfinite_outputs, len(dm.val_set))
    res = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in module.last_metrics.items()}
    if (rerank or aqe or visrank) and trainer.is_global_zero:
        out = getattr(module, "last_outputs", None)
        dist = reid_distances(out, aqe, rerank)
        if rerank or aqe:
            res = reid_metrics(dist, out)
        if visrank:
            from .visualize import save_visrank
            q_set, g_set = dm.val_set.datasets  # outputs in dataset order: queries first
            q, g = out["query"], ~out["query"]
            res["visrank"] = save_visrank(
                dist, [s.path for s in q_set.samples], [s.path for s in g_set.samples],
                out["label"][q], out["label"][g], out["camid"][q], out["camid"][g],
                visrank_out or "visrank.png", topk=visrank, num_queries=visrank_queries)
    return res


def reid_distances(out: dict, aqe: int = 0, rerank: bool = False):
    """(Q, G) cosine distances of a Re-ID evaluation pass (queries: the samples whose
    ``query`` flag is set), after alpha-QE with the top ``aqe`` gallery matches
    (``retrieval.postprocess.alpha_query_expansion``, as fast-reid's ``aqe``) and
    k-reciprocal re-ranking (``evaluation.reid.re_rank``)."""
    import numpy as np
    from .evaluation.reid import compute_distance, re_rank
    e = out["embedding"].astype(np.float32)
    q, g = e[out["query"]], e[~out["query"]]
    dist = compute_distance(q, g, "cosine").numpy()
    if aqe:
        from .retrieval.postprocess import alpha_query_expansion
        top = np.argsort(dist, axis=1, kind="stable")[:, :aqe]  # (Q, n)
        q = alpha_query_expansion(q, g[top], n=aqe)
        dist = compute_distance(q, g, "cosine").numpy()
    if rerank:
        dist = re_rank(dist, compute_distance(q, q, "cosine").numpy(),
                       compute_distance(g, g, "cosine").numpy())
    return dist


def reid_metrics(dist, out: dict) -> dict:
    """The training-time Re-ID metric keys (mAP, mINP, R1, R5, R10) of a (Q, G) distance
    matrix of ``out``'s queries (``query`` flag) against the rest."""
    from .evaluation.reid import evaluate
    y, c, q = out["label"], out["camid"], out["query"]
    res = evaluate(dist, y[q], y[~q], c[q], c[~q])
    cmc = res.pop("cmc")
    res.update({f"R{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)})
    return {k: float(v) for k, v in res.items()}


# ---- explain ----------------------------------------------------------------------------
_PICTURE_EXT = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def explain_paths(out: str, images: bool, pair: bool) -> tuple[str | None, str | None]:
    """Where ``explain`` writes: ``out`` is a picture file (``.png`` ...) or a folder; with
    both images and a pair, the pair's picture is ``<out stem>_pair<ext>`` (file) or
    ``explain_pair.png`` (folder). Returns (images' picture, pair's picture)."""
    stem, ext = os.path.splitext(out)
    if ext.lower() in _PICTURE_EXT and not os.path.isdir(out):
        return (out if images else None,
                (f"{stem}_pair{ext}" if images else out) if pair else None)
    return (os.path.join(out, "explain.png") if images else None,
            os.path.join(out, "explain_pair.png") if pair else None)


def _captions(model, x, meta: ModelMeta) -> tuple:
    """(captions, embeddings): the predicted class and its probability of each image
    (classifiers, else None), and the embeddings (models that retrieve, else None)."""
    import torch
    with torch.no_grad():
        out = model(x)
    emb = out.get("embedding")
    if meta.task != "classification" or "logits" not in out:
        return None, emb
    names = meta.class_names
    p, i = out["logits"].float().softmax(-1).max(-1)
    return [f"{names[int(c)] if int(c) < len(names) else int(c)}: {100 * float(q):.1f}%"
            for q, c in zip(p, i)], emb


def explain(checkpoint: str, images: list[str], out: str, pair: list[str] | None = None,
            loaded: LoadedModel | None = None) -> list[str]:
    """Write the model's attention pictures (``model.explain``, drawn by
    :func:`finegrain.visualize.save_explain`): one picture of ``images`` (a row each, with the
    predicted class and its probability) and, with ``pair = [A, B]``, one of where A attends
    in B (each map over the image it belongs to, with their cosine similarity where the model
    embeds; models with ``pairwise_explain`` only). ``out``: a picture file or a folder
    (:func:`explain_paths`). Returns the paths written. ``loaded``: ``checkpoint`` already
    opened (:class:`finegrain.loading.LoadedModel`)."""
    import torch
    from .loading import open_model
    from .visualize import save_explain
    loaded = loaded if loaded is not None else open_model(checkpoint)
    model, meta = loaded.model, loaded.meta
    if not hasattr(model, "explain"):
        raise InputError(f"{meta.model_name} has no attention to explain (plain baseline); "
                         f"use a DCAL, TASN, DALG or cross-image checkpoint")
    if pair and len(pair) != 2:
        raise InputError("--pair takes two images: A B")
    if not images and not pair:
        raise InputError("explain: give one or more images, or --pair A B")
    if pair and not getattr(model, "pairwise_explain", False):
        raise InputError(f"{meta.model_name or type(model).__name__} has no pair-wise "
                         f"attention map, so --pair has nothing to draw: explain its images "
                         f"without --pair (DCAL and cross-image checkpoints draw pairs)")
    img_path, pair_path = explain_paths(out, bool(images), bool(pair))
    written = []
    if images:
        x = load_images(images, meta)
        caps, _ = _captions(model, x, meta)
        with torch.no_grad():
            maps = model.explain(x)
        written.append(save_explain(x, maps, img_path, meta.mean, meta.std,
                                    titles=[os.path.basename(p) for p in images],
                                    captions=caps))
    if pair:
        x, px = load_images([pair[0]], meta), load_images([pair[1]], meta)
        caps, emb = _captions(model, torch.cat([x, px]), meta)
        top = None
        if emb is not None:
            sim = float(torch.nn.functional.cosine_similarity(emb[:1].float(), emb[1:].float()))
            top = f"{os.path.basename(pair[0])} vs {os.path.basename(pair[1])}: " \
                  f"cosine similarity {sim:.3f}"
        elif caps:
            top = f"{os.path.basename(pair[1])}: {caps[1]}"
        with torch.no_grad():
            maps = model.explain(x, pair=px)
        written.append(save_explain(x, maps, pair_path, meta.mean, meta.std,
                                    titles=[os.path.basename(pair[0])], pair_images=px,
                                    captions=caps[:1] if caps else None, suptitle=top))
    return written
