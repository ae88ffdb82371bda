"""Per-task transforms (``torchvision.transforms.v2`` on uint8 tensors), as DESIGN.md fixes:

- classification: train resize + random crop + flip (or random-resized crop when no resize
  size is given); eval resize + centre crop;
- reid: train plain resize + flip + pad/crop + random erasing; eval plain resize;
- retrieval: eval keeps the aspect ratio (longest side S); train random-resized crop;
- dml: train random-resized crop + flip; eval resize of the shorter side to 256 + centre crop
  224 (the DML convention, whatever ``resize_size`` says of the eval resize; classification
  resizes to a square, as TransFG / DCAL).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_CROPS", "longest_side_size", "LongestSide",
           "resize_to", "pil_bilinear", "RetrievalEval", "FixedSizeEval", "build_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_CROPS = ("random_resized", "resize_crop")


def _size(s: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def longest_side_size(h: int, w: int, size: int, full_size: int | None = None,
                      upscale: bool = False) -> tuple[int, int]:
    """Output ``(h, w)`` of the retrieval eval resize: the image is scaled by
    ``min(1, size / full_size)``, ``full_size`` being the longest side of the *full* image
    (default: ``max(h, w)``, i.e. the longest side becomes ``size``). An image (or the full
    image of a crop) smaller than ``size`` is never enlarged (cirtorch's PIL ``thumbnail``,
    DELG's ``min_image_size -1``); ``upscale=True`` enlarges it to ``size`` too.

    A query cropped to its ``bbx`` passes its full image's longest side, so the crop is scaled
    by the same factor as the database images (cirtorch ``ImagesFromList``:
    ``imresize(crop, imsize * max(crop.size) / imfullsize)``; DELG ``extract_features.py``:
    ``resize_factor = max(crop) / max(full)``), not enlarged until its own longest side is
    ``size``.
    """
    s = size / (max(h, w) if full_size is None else full_size)
    if not upscale:
        s = min(1.0, s)
    return max(1, round(h * s)), max(1, round(w * s))


class LongestSide(torch.nn.Module):
    """Resize so the longest side is ``size`` (at most: smaller images stay as they are unless
    ``upscale``), keeping the aspect ratio (retrieval eval); with ``full_size`` (a query crop)
    by the full image's factor (:func:`longest_side_size`)."""

    def __init__(self, size: int, upscale: bool = False):
        super().__init__()
        self.size = size
        self.upscale = upscale

    def forward(self, img: torch.Tensor, full_size: int | None = None) -> torch.Tensor:
        h, w = img.shape[-2:]
        return resize_to(img, longest_side_size(h, w, self.size, full_size, self.upscale))


def resize_to(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``img`` at ``size`` (h, w) for the retrieval transforms: as it is when it has that size,
    a uint8 (C, H, W) image through :func:`pil_bilinear`, anything else through torchvision's
    antialiased bilinear resize."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if img.dtype == torch.uint8 and img.ndim == 3:
        return pil_bilinear(img, size)
    return v2.functional.resize(img, list(size), antialias=True)


def _to_normalized(mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """uint8 -> float in [0, 1] -> (x - mean) / std."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def pil_bilinear(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, h, w) with Pillow's bilinear filter (antialiased: its support
    widens when reducing). The same pixels on every CPU and in a plain PIL client
    (``Image.resize((w, h), Image.BILINEAR)``); torch's uint8 kernel differs from it by one
    grey level here and there, and from itself between its AVX2 and default paths."""
    from PIL import Image
    arr = img.permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    out = torch.from_numpy(np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR)).copy())
    return out[None] if out.ndim == 2 else out.permute(2, 0, 1).contiguous()


class RetrievalEval(torch.nn.Module):
    """Retrieval eval transform: :class:`LongestSide` then float + normalisation.

    ``transform(img, full_size=M)`` scales a query crop by its full image's factor
    ``min(1, size / M)`` (cirtorch / DELG convention, :func:`longest_side_size`);
    ``transform(img)`` scales a whole image so its longest side is ``size``, or keeps it when
    it is smaller. ``upscale=True`` also enlarges smaller images (and crops of them) to
    ``size``: the behaviour of descriptor files without a ``preprocessing.upscale`` field.
    """

    takes_full_size = True

    def __init__(self, size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, upscale: bool = False):
        super().__init__()
        self.resize = LongestSide(size, upscale)
        self.normalize = _to_normalized(mean, std)

    def forward(self, img: torch.Tensor, full_size: int | None = None) -> torch.Tensor:
        return self.normalize(self.resize(img, full_size))


class FixedSizeEval(torch.nn.Module):
    """Retrieval eval transform of a model that takes one input size (H, W) only (a ViT
    without ``dynamic_img_size``): a plain resize to (H, W), as the Re-ID evaluation, with
    :func:`pil_bilinear`, then float + normalisation. A query crop (``full_size``) is resized
    the same way: the model cannot see it at another scale."""

    takes_full_size = True

    def __init__(self, size: tuple[int, int], mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.normalize = _to_normalized(mean, std)

    def forward(self, img: torch.Tensor, full_size: int | None = None) -> torch.Tensor:
        return self.normalize(resize_to(img, self.size))


def build_transform(task: str, train: bool, img_size: int | tuple[int, int],
                    resize_size: int | tuple[int, int] | None = None,
                    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                    random_erasing: float | None = None, color_jitter: float = 0.0,
                    rotation: float = 0.0, resize_mode: str = "square",
                    interpolation: str | None = None, crop_pct: float | None = None,
                    train_crop: str | None = None,
                    crop_scale: tuple[float, float] | None = None) -> v2.Compose:
    """The transform of ``task`` (classification | reid | retrieval | dml) for train or eval.

    Args:
        task: which protocol's transform.
        train: augmentation (True) or the evaluation transform (False).
        img_size: output size (int or (H, W)); for retrieval eval the longest side S.
        resize_size: classification: the resize before the crop (550 for a 448 crop;
            default ``img_size / crop_pct``); DML: the eval resize of the shorter side before
            the centre crop (training is a random-resized crop, the DML standard). Re-ID
            ignores it.
        mean, std: normalisation (the backbone's).
        random_erasing: probability (Re-ID default 0.5; 0 turns it off).
        color_jitter: brightness / contrast / saturation strength (0 = off).
        rotation: training random rotation range in degrees (TASN: 30; 0 = off).
        resize_mode: classification: ``square`` resizes to ``resize_size`` x ``resize_size``
            (TransFG / DCAL), ``shorter`` resizes the shorter side and keeps the aspect ratio
            (TASN). DML always resizes the shorter side.
        interpolation: ``bilinear`` (None) or ``bicubic``: the pretrained weights' own.
        crop_pct: eval crop share when ``resize_size`` is None (None: 224/256).
        train_crop: ``random_resized`` (RandomResizedCrop) or ``resize_crop`` (resize to
            ``resize_size``, random crop); None: the task's default (DML and retrieval
            random-resized; classification resize-crop when ``resize_size`` is given).
        crop_scale: the area range of the random-resized crop (None: torchvision's
            (0.08, 1), retrieval (0.25, 1): a landmark crop keeps a quarter of the image).
    """
    H, W = _size(img_size)
    interp = v2.InterpolationMode(interpolation or "bilinear")
    ops: list = []
    if task == "reid":
        ops = [v2.Resize((H, W), interpolation=interp, antialias=True)]
        if train:
            ops += [v2.RandomHorizontalFlip(), v2.Pad(10), v2.RandomCrop((H, W))]
    elif task == "retrieval" and not train:
        ops = [LongestSide(max(H, W))]
    else:
        share = crop_pct or 224 / 256
        rs = _size(resize_size) if resize_size is not None else \
            (round(H / share), round(W / share))
        if task == "dml" and resize_size is None and H == W:
            rs = rs[0]  # an int: torchvision resizes the shorter side
        if isinstance(resize_size, int) and (task == "dml" or resize_mode == "shorter"):
            rs = resize_size  # an int: torchvision resizes the shorter side
        if train_crop is None:
            train_crop = "random_resized" if resize_size is None or task == "dml" \
                else "resize_crop"
        if train and train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop {train_crop!r}: choose one of {TRAIN_CROPS}")
        if train and train_crop == "random_resized":
            # landmarks: keep at least a quarter of the image, or the building is often gone
            scale = tuple(crop_scale) if crop_scale is not None else \
                ((0.25, 1.0) if task == "retrieval" else (0.08, 1.0))
            ops = [v2.RandomResizedCrop((H, W), scale=scale, interpolation=interp,
                                        antialias=True),
                   v2.RandomHorizontalFlip()]
        elif train:
            ops = [v2.Resize(rs, interpolation=interp, antialias=True), v2.RandomCrop((H, W)),
                   v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(rs, interpolation=interp, antialias=True), v2.CenterCrop((H, W))]
    if train and rotation > 0:
        ops.insert(1 if task != "reid" else 2, v2.RandomRotation(rotation))
    if train and color_jitter > 0:
        ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    p = (0.5 if task == "reid" else 0.0) if random_erasing is None else random_erasing
    if train and p > 0:
        ops.append(v2.RandomErasing(p=p, value=0))
    return v2.Compose(ops)
