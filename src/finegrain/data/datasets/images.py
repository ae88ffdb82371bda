"""Unlabelled images (``images``): a gallery of photos that is not a published dataset.

``root`` is one of::

    photos/                  every image below the folder (recursively, sorted)
    'photos/**/*.jpg'        a glob (``**`` recursive); the folder is the part before the
                             first wildcard
    photos/list.txt          one image a line, relative to the list's folder (or absolute),
                             optionally followed by an integer label: ``shoes/1.jpg 17``

Image names (descriptor files, index results) are the paths relative to that folder; labels
are -1 unless the list gives them. Every split name reads the same images (``finegrain embed
--images DIR`` writes split ``gallery``).
"""

from __future__ import annotations

import glob
import os

from ..registry import register_dataset
from ._parsing import IMAGE_EXTENSIONS
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["resolve_images", "Images"]

_WILDCARDS = "*?["


def resolve_images(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """``(folder, [(image path, label)])`` of a folder, a glob or a list file (module
    docstring); raises :class:`DatasetError` naming the spec and the fix."""
    spec = os.fspath(spec)
    if any(c in spec for c in _WILDCARDS):
        head = spec[:min(spec.index(c) for c in _WILDCARDS if c in spec)]
        folder = head if head.endswith(os.sep) else os.path.dirname(head)
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        return folder or ".", [(p, -1) for p in files]
    if os.path.isdir(spec):
        out = []
        for d, subdirs, names in os.walk(spec):
            subdirs.sort()
            out += [(os.path.join(d, f), -1) for f in sorted(names)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        return spec, out
    check_file(spec, "an image folder, a glob ('photos/*.jpg') or a list file (one image a "
                     "line)")
    folder = os.path.dirname(os.path.abspath(spec))
    out = []
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, label = line, -1
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label = parts[0], int(parts[1])
            full = path if os.path.isabs(path) else os.path.join(folder, path)
            if not os.path.isfile(full):
                raise DatasetError(f"{spec} line {n}: image {full} not found; paths are "
                                   f"relative to the list's folder {folder}")
            out.append((full, label))
    return folder, out


@register_dataset("images")
class Images(ImageDataset):
    """Unlabelled images of a folder, a glob or a list file (module docstring).

    Args:
        root: the folder, glob or list file.
        split: any of ``splits`` (all read the same images).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "retrieval"
    splits = ("gallery", "query", "train", "test", "all")

    def __init__(self, root: str, split: str = "gallery", **kwargs):
        if root is None:
            raise DatasetError("images: no folder, glob or list file given (--images)")
        self.spec = os.fspath(root)
        folder, self._files = resolve_images(self.spec)
        if not self._files:
            raise DatasetError(f"{self.spec}: no image found (extensions "
                               f"{' '.join(IMAGE_EXTENSIONS)}); check the folder or the glob")
        super().__init__(folder, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        return [Sample(p, label) for p, label in self._files], []
