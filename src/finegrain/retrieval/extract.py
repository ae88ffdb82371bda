"""Descriptor extraction for any model whose output has an ``"embedding"``.

Retrieval preprocessing (DESIGN.md): the aspect ratio is kept, the longest side resized to
``img_size`` (S) -- an image smaller than S is not enlarged (cirtorch, DELG) unless
``upscale`` --, ImageNet-style normalisation with the checkpoint's mean / std. Queries
are cropped to their ``bbx`` by the reader and the crop is scaled by its **full image's**
factor ``S / max(full H, W)`` (cirtorch ``ImagesFromList``: ``imsize * max(crop) /
imfullsize``; DELG ``resize_factor = max(crop) / max(full)``), so a query is at the scale of
the database images (:func:`finegrain.data.transforms.longest_side_size`).

**Unreadable images.** With ``on_error="skip"`` on the dataset, an image that cannot be
decoded is left out: its row *and* its name are dropped together (``stats["skipped"]`` lists
the dataset indices; :func:`embed_dataset` drops the names / labels), so no descriptor lands
under another image's name.

**Batching without padding.** Images of a retrieval set have many sizes, and padding would
change a ViT's descriptor (extra tokens attend). So images are grouped by their exact resized
size: a bucket per (H, W) is filled until ``batch_size`` images share that size, then run as
one batch; whatever is left is run at the end. Revisited Oxford's database is mostly 1024 x 768
and 768 x 1024 photos, so most batches are full; the 70 cropped queries mostly run one by one.
``max_pending`` bounds the images held in unfinished buckets (the largest bucket is flushed
when it is exceeded). Results do not depend on the grouping.

**Multi-scale** (``scales=(0.7071, 1, 1.4142)``; DOLG's 5 scales ``0.3535 .. 1.4142``): the
S-resized image is resized again by each factor (bilinear, antialiased when shrinking; the
size is ``floor(s * H), floor(s * W)`` as cirtorch's ``extract_ms``), the L2-normalised
descriptors are summed and the sum re-normalised. ``(1.0,)`` -- single scale -- is the default
and DALG's setting.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..meta import ModelMeta, read_meta

__all__ = ["extract", "embed_batch", "embed_dataset", "model_mean_std", "model_name_of",
           "resolve_img_size", "sample_names", "extraction_dataset", "retrieval_transform",
           "search_transform", "fixed_input_size",
           "DEFAULT_IMG_SIZE", "PROTOCOL_IMG_SIZE"]

#: Retrieval ``img_size`` is the LONGEST side S of the resized image (aspect ratio kept), not
#: the (H, W) model input of training; S when neither the caller, the protocol nor the
#: checkpoint gives one.
DEFAULT_IMG_SIZE = 512
#: Longest side of the Revisited protocol's images (cirtorch ``--image-size`` 1024, DELG
#: ``max_image_size`` 1024: the originals' size); 512 is the common cheaper option.
PROTOCOL_IMG_SIZE = {"roxford5k": 1024, "rparis6k": 1024, "revisitop1m": 1024}
MULTI_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)  # DOLG / DELG 5-scale setting
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def retrieval_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                        upscale: bool = False):
    """uint8 (3, H, W) -> float (3, h, w) with ``max(h, w) == img_size`` (smaller images kept
    as they are unless ``upscale``), normalised; ``transform(crop, full_size=M)`` scales a
    query crop by ``min(1, img_size / M)`` instead
    (:class:`finegrain.data.transforms.RetrievalEval`)."""
    from ..data.transforms import RetrievalEval
    return RetrievalEval(int(img_size), tuple(mean), tuple(std), upscale=bool(upscale))


def search_transform(pre: dict):
    """The transform a descriptor file's (or an index's) ``preprocessing`` record names:
    ``longest_side`` (:func:`retrieval_transform`) or ``fixed`` (a model that takes one input
    size: a plain resize to ``img_size`` = [H, W], :class:`~finegrain.data.transforms.
    FixedSizeEval`)."""
    from ..data.transforms import FixedSizeEval
    if pre.get("resize") == "fixed":
        return FixedSizeEval(tuple(pre["img_size"]), tuple(pre["mean"]), tuple(pre["std"]))
    return retrieval_transform(int(pre["img_size"]), pre["mean"], pre["std"],
                               bool(pre.get("upscale")))


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """None when ``model`` takes any image size (CNNs, ViTs with ``dynamic_img_size`` and
    ``dynamic_img_pad``: the longest-side transform keeps photos whole, at their aspect
    ratio); else the one size (H, W) it takes: a patch embedding that asserts its input size
    (timm's ``strict_img_size``) or needs multiples of its patch, or an export folder whose
    height and width are fixed (``export.json``)."""
    from ..runtime import ExportedModel
    if isinstance(model, ExportedModel):
        return model.fixed_size
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if hasattr(m, "strict_img_size") and size is not None and \
                not getattr(m, "dynamic_img_pad", False):
            return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else \
                (int(size), int(size))
    return None


class _ExtractionItems(torch.utils.data.Dataset):
    """``{"index", "image"}`` items of a finegrain dataset for :func:`extract`: a crop (a
    sample with a ``bbox``) is passed with its full image's longest side to the transform;
    with ``on_error="skip"`` an unreadable image gives ``image`` None (dropped later, never
    replaced by its neighbour as ``ImageDataset.__getitem__`` does for training)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        from ..data import DatasetError
        ds = self.dataset
        sample = ds.samples[i]
        try:
            if sample.bbox is None:
                img, full = ds.load_image(i), None
            else:
                img, full = ds.load_image_and_full_size(i)
        except DatasetError as e:
            if getattr(ds, "on_error", "raise") != "skip":
                raise DatasetError(f"{e}; or leave such files out, name and row together: "
                                   f"finegrain embed --on-error skip (on_error='skip')"
                                   ) from None
            return {"index": i, "image": None, "error": str(e)}
        tf = ds.transform
        if full is not None:
            if not getattr(tf, "takes_full_size", False):
                raise InputError(f"{sample.path} is cropped to a bbox but the dataset's "
                                 f"transform cannot scale a crop by its full image "
                                 f"(cirtorch / DELG); build it with retrieval_transform(...)")
            return {"index": i, "image": tf(img, full_size=full)}
        return {"index": i, "image": tf(img) if tf is not None else img}


def resolve_img_size(img_size: int | None, meta: ModelMeta | None = None,
                     dataset: str | None = None) -> int:
    """The retrieval ``img_size``: the longest side S of the resized image (the aspect ratio
    is kept). ``img_size`` when given, else the protocol's size for
    ``dataset`` (:data:`PROTOCOL_IMG_SIZE`: 1024 for Revisited Oxford / Paris and R1M), else
    the checkpoint's training size (``meta.img_size``, the larger side of a pair; the GLDv2
    recipes train at 512), else :data:`DEFAULT_IMG_SIZE` (512)."""
    if img_size is not None:
        return int(img_size)
    if dataset in PROTOCOL_IMG_SIZE:
        return PROTOCOL_IMG_SIZE[dataset]
    size = meta.img_size if meta is not None else None
    if size is None:
        return DEFAULT_IMG_SIZE
    return int(max(size)) if isinstance(size, (list, tuple)) else int(size)


def model_name_of(model: nn.Module, meta: ModelMeta | None = None) -> str:
    """The name descriptors record for a model: its record's ``model_name``, else the
    registered name it was built under, else its class name."""
    return (meta.model_name if meta is not None else "") or \
        getattr(model, "finegrain_name", None) or type(model).__name__


def model_mean_std(model: nn.Module, meta: ModelMeta | None = None
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of a model: the checkpoint's record first, then the timm backbone's
    ``pretrained_cfg``, then ImageNet's."""
    if meta is not None:
        return meta.mean, meta.std
    cfg = getattr(getattr(model, "backbone", None), "pretrained_cfg", None) or {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return _IMAGENET


def sample_names(dataset) -> list[str]:
    """Image names of a dataset: ``Sample.extra["name"]`` when the reader sets it (Revisited:
    the gnd names), else the path relative to the dataset root."""
    names = []
    for s in dataset.samples:
        name = s.extra.get("name") if getattr(s, "extra", None) else None
        names.append(str(name) if name is not None else os.path.relpath(s.path, dataset.root))
    return names


def _rescale(x: torch.Tensor, s: float) -> torch.Tensor:
    if s == 1.0:
        return x
    H, W = x.shape[-2:]
    size = [max(1, math.floor(H * s)), max(1, math.floor(W * s))]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)


@torch.inference_mode()
def embed_batch(model: nn.Module, images: torch.Tensor, scales: Sequence[float],
                 amp: bool) -> torch.Tensor:
    """Multi-scale descriptor of a same-size batch (B, 3, H, W) -> (B, D) fp32, unit norm."""
    acc = None
    for s in scales:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(_rescale(images, s))
        if "embedding" not in out:
            raise InputError(f"{type(model).__name__} returns no 'embedding'; only models that "
                             f"retrieve (DALG, Re-ID / DML models) can be used for descriptors")
        e = F.normalize(out["embedding"].float(), dim=-1)
        acc = e if acc is None else acc + e
    return F.normalize(acc, dim=-1)


def extract(model: nn.Module, dataset, scales: Sequence[float] = (1.0,), batch_size: int = 16,
            device: str | torch.device = "cpu", num_workers: int = 0, amp: bool = False,
            max_pending: int | None = None, progress: bool = True, desc: str = "embed",
            stats: dict | None = None) -> np.ndarray:
    """Descriptors of every image of ``dataset``, in dataset order.

    Args:
        model: any model returning ``{"embedding": (B, D)}``; set to eval mode here.
        dataset: a finegrain dataset whose transform already gives normalised float images
            (:func:`retrieval_transform`); its items are ``{"image", "index", ...}``.
        scales: resize factors applied to the transformed image; descriptors are averaged and
            re-normalised. ``(1.0,)``: single scale.
        batch_size: images per forward pass among images of identical size.
        device: where the model runs.
        num_workers: DataLoader decode workers.
        amp: bfloat16 autocast (GPU).
        max_pending: most images waiting in unfinished size buckets (default ``8 * batch_size``).
        progress: show a tqdm bar (its rate is images/s).
        desc: bar label.
        stats: if given, filled with ``images``, ``seconds``, ``images_per_s``, ``batches``
            and ``skipped`` (dataset indices of unreadable images, ``on_error="skip"``).

    Returns:
        (N, D) float32 array, rows L2-normalised, in dataset order; the rows of skipped
        images are left out (N = ``len(dataset) - len(stats["skipped"])``).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not scales:
        raise InputError("scales is empty; use (1.0,) for single-scale extraction")
    model.eval()
    device = torch.device(device)
    max_pending = max_pending or 8 * batch_size
    loader = DataLoader(_ExtractionItems(dataset), batch_size=None, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    out: np.ndarray | None = None
    buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    pending = 0
    n_batches = 0
    bar = tqdm(total=len(dataset), unit="img", desc=desc, disable=not progress, leave=False)

    def flush(key: tuple[int, int]) -> None:
        nonlocal out, pending, n_batches
        items = buckets.pop(key)
        pending -= len(items)
        idx = [i for i, _ in items]
        x = torch.stack([img for _, img in items]).to(device, non_blocking=True)
        emb = embed_batch(model, x, scales, amp).cpu().numpy()
        if out is None:
            out = np.zeros((len(dataset), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
        n_batches += 1
        bar.update(len(idx))

    skipped: list[int] = []
    t0 = time.perf_counter()
    for item in loader:
        img = item["image"]
        if img is None:  # unreadable, on_error="skip": its row is dropped below
            warnings.warn(f"skipped: {item['error']}", stacklevel=2)
            skipped.append(int(item["index"]))
            bar.update(1)
            continue
        if not torch.is_tensor(img) or img.ndim != 3 or not img.is_floating_point():
            raise InputError("extract needs a dataset whose transform returns normalised float "
                             "(3, H, W) tensors; build it with retrieval_transform(...)")
        key = tuple(img.shape[-2:])
        buckets.setdefault(key, []).append((int(item["index"]), img))
        pending += 1
        if len(buckets[key]) >= batch_size:
            flush(key)
        elif pending > max_pending:
            flush(max(buckets, key=lambda k: len(buckets[k])))
    for key in list(buckets):
        flush(key)
    bar.close()
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(images=len(dataset), seconds=seconds, batches=n_batches,
                     images_per_s=len(dataset) / max(seconds, 1e-9), skipped=skipped)
    if out is None:
        raise InputError(f"no readable image among the {len(dataset)} of {desc}; check the "
                         f"dataset root")
    if skipped:
        out = np.delete(out, skipped, axis=0)
    return out


def embed_dataset(model: nn.Module, dataset_name: str, root: str | None, split: str,
                  img_size: int | None = None, scales: Sequence[float] = (1.0,),
                  meta: ModelMeta | None = None, on_error: str = "raise",
                  upscale: bool = False, **kwargs: Any
                  ) -> tuple[np.ndarray, list[str], list[int], dict, Any]:
    """Build ``dataset_name``/``split`` with the retrieval transform and extract it.

    ``img_size`` None: :func:`resolve_img_size` (1024 on Revisited, else the checkpoint's
    training size).
    ``on_error="skip"``: unreadable images are left out, row and name together.
    ``upscale``: also enlarge images smaller than ``img_size`` (default: never, as cirtorch
    and DELG).

    Returns:
        ``(vectors (N, D), names, labels, preprocessing, dataset)``; ``preprocessing`` is the
        dict stored in the descriptor JSON.
    """
    ds, preprocessing = extraction_dataset(model, dataset_name, root, split, img_size,
                                           scales, meta, on_error, upscale)
    stats = kwargs.pop("stats", None)
    stats = {} if stats is None else stats
    vectors = extract(model, ds, scales=scales, desc=f"{dataset_name}/{split}", stats=stats,
                      **kwargs)
    skip = set(stats["skipped"])
    names = [n for i, n in enumerate(sample_names(ds)) if i not in skip]
    labels = [int(v) for i, v in enumerate(ds.labels) if i not in skip]
    return vectors, names, labels, preprocessing, ds


def extraction_dataset(model: nn.Module, dataset_name: str, root: str | None, split: str,
                       img_size: int | None = None, scales: Sequence[float] = (1.0,),
                       meta: ModelMeta | None = None, on_error: str = "raise",
                       upscale: bool = False) -> tuple[Any, dict]:
    """``(dataset with the retrieval transform, preprocessing dict of the descriptor JSON)``
    of ``dataset_name``/``split`` (shared by :func:`embed_dataset` and the sharded
    extraction of :mod:`finegrain.retrieval.sharded`)."""
    from ..data import build_dataset
    if meta is not None:
        meta = read_meta(meta, "extraction meta", require_model=False)
    mean, std = model_mean_std(model, meta)
    img_size = resolve_img_size(img_size, meta, dataset_name)
    fixed = fixed_input_size(model)
    if fixed is None:
        preprocessing = {"resize": "longest_side", "img_size": int(img_size),
                         "upscale": bool(upscale)}
    else:  # the model takes one size: the whole photo squeezed to it, as Re-ID evaluates
        if [float(s) for s in scales] != [1.0]:
            raise InputError(f"scales {list(scales)}: this model takes {fixed[0]}x{fixed[1]} "
                             f"images only, so it cannot embed other scales; drop --scales")
        preprocessing = {"resize": "fixed", "img_size": list(fixed), "upscale": False}
    preprocessing.update({"scales": [float(s) for s in scales], "mean": list(mean),
                          "std": list(std)})
    ds = build_dataset(dataset_name, root, split, on_error=on_error,
                       transform=search_transform(preprocessing))
    cropped = bool(split == "query" and getattr(ds, "crop_queries", False))
    preprocessing["crop_query_bbx"] = cropped
    if cropped and fixed is None:  # the crop is scaled by its full image's factor
        preprocessing["crop_scale"] = "full_image"
    return ds, preprocessing
