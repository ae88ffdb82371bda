"""Google Landmarks Dataset v2 (GLDv2) training set, full or clean.

Layout (``train/*.tar`` extracted, metadata CSVs beside)::

    gldv2/
        train.csv          header "id,url,landmark_id"            (GLDv2 full)
        train_clean.csv    header "landmark_id,images"            (GLDv2-clean; images =
                                                                    space-separated ids)
        train/a/b/c/abc1234567890def.jpg                           (id[0]/id[1]/id[2]/id.jpg)

Landmark ids are remapped to contiguous labels 0..C-1 (sorted id); ``classes[label]`` is the
landmark id as a string.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Literal

from ..registry import register_dataset
from ._parsing import to_int
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["gldv2_path", "GLDv2"]

_ID = re.compile(r"^[0-9a-f]{16}$")


def gldv2_path(root: str, image_id: str) -> str:
    """``root/train/a/b/c/abc....jpg`` for image id ``abc...``."""
    return os.path.join(root, "train", image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def _check_id(image_id: str, path: str, line: int) -> str:
    if not _ID.match(image_id):
        raise DatasetError(f"{path} line {line}: image id {image_id!r} is not 16 hex digits; "
                           f"is this the GLDv2 metadata CSV?")
    return image_id


def _read_header(reader, path: str, expected: list[str]) -> None:
    header = [h.strip() for h in next(reader, [])]
    if header[:len(expected)] != expected:
        raise DatasetError(f"{path} line 1: header {','.join(header)!r}, expected "
                           f"{','.join(expected)!r}; download the file again from "
                           f"https://github.com/cvdfoundation/google-landmark")


@register_dataset("gldv2")
class GLDv2(ImageDataset):
    """Google Landmarks Dataset v2, training images (for training retrieval models).

    Reference: Weyand et al., "Google Landmarks Dataset v2 - A Large-Scale Benchmark for
    Instance-Level Recognition and Retrieval", CVPR 2020.
    URL: https://github.com/cvdfoundation/google-landmark
    Statistics: full 4,132,914 images / 203,094 landmarks; clean 1,580,470 images / 81,313
    landmarks. Only a ``train`` split.

    Args:
        root: folder with ``train.csv`` / ``train_clean.csv`` and ``train/``.
        split: ``train``.
        subset: ``clean`` (``train_clean.csv``, default; what DALG and most retrieval papers
            train on) or ``full`` (``train.csv``).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "retrieval"
    splits = ("train",)

    def __init__(self, root: str, split: str = "train",
                 subset: Literal["clean", "full"] = "clean", **kwargs):
        if subset not in ("clean", "full"):
            raise DatasetError(f"GLDv2 subset must be 'clean' or 'full', got {subset!r}")
        self.subset = subset
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        check_file(os.path.join(self.root, "train"), "the GLDv2 train/ image folder")
        pairs: list[tuple[str, int]] = []
        if self.subset == "clean":
            path = check_file(os.path.join(self.root, "train_clean.csv"),
                              "GLDv2-clean 'landmark_id,images' (space-separated image ids)")
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                _read_header(reader, path, ["landmark_id", "images"])
                for n, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) < 2:
                        raise DatasetError(f"{path} line {n}: expected 'landmark_id,images'; "
                                           f"download the file again")
                    lid = to_int(row[0], path, n, "landmark_id")
                    pairs += [(_check_id(i, path, n), lid) for i in row[1].split()]
        else:
            path = check_file(os.path.join(self.root, "train.csv"),
                              "GLDv2 'id,url,landmark_id'")
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                _read_header(reader, path, ["id", "url", "landmark_id"])
                for n, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) < 3:
                        raise DatasetError(f"{path} line {n}: expected 'id,url,landmark_id'; "
                                           f"download the file again")
                    pairs.append((_check_id(row[0], path, n),
                                  to_int(row[2], path, n, "landmark_id")))
        ids = sorted({lid for _, lid in pairs})
        label_of = {lid: i for i, lid in enumerate(ids)}
        samples = [Sample(gldv2_path(self.root, iid), label_of[lid],
                          extra={"id": iid, "landmark_id": lid}) for iid, lid in pairs]
        return samples, [str(lid) for lid in ids]
