"""The one dataset shape every reader produces.

A reader parses a published on-disk layout into a list of :class:`Sample` (path, label, camera,
bounding box) plus ``classes`` (names, index = label). Decoding (``torchvision.io``) and the
transform happen in ``__getitem__``, so readers never touch pixels. A corrupt or missing image
fails with its path, or, with ``on_error="skip"``, is replaced by the next readable one and
counted in ``self.skipped``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch.utils.data import Dataset

from ...errors import InputError

__all__ = ["TASKS", "DatasetError", "Sample", "read_image", "ImageDataset", "check_file",
           "read_lines"]

TASKS = ("classification", "reid", "retrieval", "dml")


class DatasetError(InputError):
    """A dataset on disk is missing, malformed or inconsistent; the message names the file
    and the fix."""


@dataclass
class Sample:
    """One image. ``label`` is the class / identity index (0-based, contiguous for training
    splits; raw pid for Re-ID query / gallery), ``camid`` the camera (-1 when none),
    ``bbox`` (x1, y1, x2, y2) in pixels when the protocol crops to it."""

    path: str
    label: int
    camid: int = -1
    bbox: tuple[float, float, float, float] | None = None
    extra: dict = field(default_factory=dict)


def read_image(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) tensor with ``torchvision.io``.

    Raises:
        DatasetError: the file is missing or cannot be decoded (the message names it).
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    if not os.path.isfile(path):
        raise DatasetError(f"image not found: {path}; is the dataset root the folder that "
                           f"holds the published layout?")
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError with little context
        raise DatasetError(f"cannot decode image {path}: {e}; the file is corrupt or not an "
                           f"image: re-extract or replace it") from None


class ImageDataset(Dataset):
    """Base of every reader.

    Args:
        root: dataset root (the folder of the published layout).
        split: ``train``, ``val``, ``test``, ``query`` or ``gallery`` (as the dataset has them).
        transform: callable on a uint8 (3, H, W) tensor (and ``bbox`` keyword-free).
        on_error: ``"raise"`` (default) fails on a corrupt / missing image with its path;
            ``"skip"`` replaces it by the next readable image and counts it in ``skipped``.

    Subclasses set ``task`` and implement :meth:`load` returning ``(samples, classes)``.
    """

    task: str = "classification"
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None,
                 on_error: Literal["raise", "skip"] = "raise"):
        if split not in self.splits:
            raise DatasetError(f"{type(self).__name__}: unknown split {split!r}; "
                               f"choose one of {self.splits}")
        if root is None:
            raise DatasetError(f"{type(self).__name__}: no dataset root given; pass the folder "
                               f"that holds its layout (--data.root DIR, --root DIR)")
        if not os.path.isdir(root):
            raise DatasetError(f"dataset root {root!r} does not exist or is not a folder; "
                               f"pass the folder that holds the {type(self).__name__} layout")
        self.root = root
        self.split = split
        self.transform = transform
        self.on_error = on_error
        self.skipped = 0
        self.samples, self.classes = self.load()
        if not self.samples:
            raise DatasetError(f"{type(self).__name__} at {root}: split {split!r} is empty; "
                               f"check the list files of the layout")

    def load(self) -> tuple[list[Sample], list[str]]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """Decoded uint8 image of ``index``, cropped to its bbox when it has one."""
        return self.load_image_and_full_size(index)[0]

    def load_image_and_full_size(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image cropped to its bbox as load_image, longest side of the full image)``:
        retrieval scales a query crop by its full image's factor (cirtorch / DELG)."""
        s = self.samples[index]
        img = read_image(s.path)
        full = int(max(img.shape[-2:]))
        if s.bbox is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in s.bbox)  # PIL's crop rounding
            img = img[:, max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
        return img, full

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                img, full = self.load_image_and_full_size(i) if self._full_size_transform(i) \
                    else (self.load_image(i), None)
                break
            except DatasetError as e:
                if self.on_error != "skip":
                    raise DatasetError(f"{e}; or skip and count such files: on_error='skip' "
                                       f"(finegrain train --data.on_error skip, finegrain "
                                       f"embed --on-error skip)") from None
                self.skipped += 1  # per process: DataLoader workers count their own
                warnings.warn(f"skipped: {e}", stacklevel=2)
        else:
            raise DatasetError(f"no readable image in {self.root} split {self.split}")
        if full is not None:  # a crop, scaled by its full image's factor (retrieval eval)
            img = self.transform(img, full_size=full)
        elif self.transform is not None:
            img = self.transform(img)
        s = self.samples[i]
        return {"image": img, "label": s.label, "camid": s.camid, "index": index}

    def _full_size_transform(self, index: int) -> bool:
        """Whether sample ``index`` is a crop and the transform scales crops by their full
        image (``takes_full_size``: the retrieval eval transform)."""
        return self.samples[index].bbox is not None and \
            getattr(self.transform, "takes_full_size", False)

    def stats(self) -> dict:
        """Counts shown by ``finegrain data check``: images, classes (ids), cameras."""
        out = {"images": len(self.samples), "classes": len(set(self.labels))}
        cams = {s.camid for s in self.samples if s.camid >= 0}
        if cams:
            out["cameras"] = len(cams)
        return out


def check_file(path: str, what: str) -> str:
    """Return ``path`` or raise a :class:`DatasetError` naming it and ``what`` it should be."""
    if not os.path.exists(path):
        raise DatasetError(f"missing {path}: expected {what}; is the root the folder of the "
                           f"published layout?")
    return path


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a list file (checked to exist first)."""
    with open(check_file(path, what), encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]
