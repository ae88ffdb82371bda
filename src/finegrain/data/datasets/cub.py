"""CUB-200-2011 (Caltech-UCSD Birds), read from the dataset's own list files.

Layout (the extracted ``CUB_200_2011.tgz``)::

    CUB_200_2011/
        images.txt                 "image_id relative/path.jpg"
        image_class_labels.txt     "image_id class_id"        class_id in 1..200
        train_test_split.txt       "image_id is_training"     1 = train, 0 = test
        classes.txt                "class_id name"
        bounding_boxes.txt         "image_id x y width height" (optional)
        images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..registry import register_dataset
from ._parsing import read_rows, to_float, to_int
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["CUB_NUM_CLASSES", "CUBRecord", "read_cub", "CUB200"]

CUB_NUM_CLASSES = 200


@dataclass
class CUBRecord:
    """One row of the joined CUB list files (``label`` 0-based)."""

    image_id: int
    path: str
    label: int
    is_train: bool
    bbox: tuple[float, float, float, float] | None


def read_cub(root: str) -> tuple[list[CUBRecord], list[str]]:
    """Parse and join the CUB list files.

    Returns:
        ``(records, classes)``: one record per line of ``images.txt`` in file order; class
        names in label order (``classes.txt``).

    Raises:
        DatasetError: a file is missing, a line is malformed, a label is outside 1..200, or an
            image id appears in ``images.txt`` but not in another list (names file and line).
    """
    fix = "re-extract CUB_200_2011.tgz"
    f_images = os.path.join(root, "images.txt")
    f_labels = os.path.join(root, "image_class_labels.txt")
    f_split = os.path.join(root, "train_test_split.txt")
    f_classes = os.path.join(root, "classes.txt")
    f_boxes = os.path.join(root, "bounding_boxes.txt")
    for p, what in [(f_images, "the CUB image list 'image_id path'"),
                    (f_labels, "the CUB labels 'image_id class_id'"),
                    (f_split, "the CUB split 'image_id is_training'"),
                    (f_classes, "the CUB class names 'class_id name'")]:
        check_file(p, what)
    check_file(os.path.join(root, "images"), "the CUB images/ folder")

    classes: list[str] = []
    for n, (cid, name) in read_rows(f_classes, "'class_id name'", 2, maxsplit=1):
        if to_int(cid, f_classes, n, "class_id") != len(classes) + 1:
            raise DatasetError(f"{f_classes} line {n}: class ids must run 1, 2, ... in order; "
                               f"got {cid}; {fix}")
        classes.append(name)

    labels: dict[int, int] = {}
    for n, (iid, cid) in read_rows(f_labels, "'image_id class_id'", 2):
        c = to_int(cid, f_labels, n, "class_id")
        if not 1 <= c <= len(classes):
            raise DatasetError(f"{f_labels} line {n}: class_id {c} outside 1..{len(classes)} "
                               f"(classes.txt); {fix}")
        labels[to_int(iid, f_labels, n, "image_id")] = c - 1

    is_train: dict[int, bool] = {}
    for n, (iid, flag) in read_rows(f_split, "'image_id is_training'", 2):
        v = to_int(flag, f_split, n, "is_training")
        if v not in (0, 1):
            raise DatasetError(f"{f_split} line {n}: is_training must be 0 or 1, got {v}; {fix}")
        is_train[to_int(iid, f_split, n, "image_id")] = v == 1

    boxes: dict[int, tuple[float, float, float, float]] = {}
    if os.path.exists(f_boxes):
        for n, (iid, x, y, w, h) in read_rows(f_boxes, "'image_id x y width height'", 5):
            x, y, w, h = (to_float(v, f_boxes, n, k) for v, k in
                          zip((x, y, w, h), ("x", "y", "width", "height")))
            boxes[to_int(iid, f_boxes, n, "image_id")] = (x, y, x + w, y + h)

    records = []
    for n, (iid, rel) in read_rows(f_images, "'image_id path'", 2, maxsplit=1):
        i = to_int(iid, f_images, n, "image_id")
        for table, f in ((labels, f_labels), (is_train, f_split)):
            if i not in table:
                raise DatasetError(f"{f_images} line {n}: image_id {i} has no line in {f}; "
                                   f"{fix}")
        records.append(CUBRecord(i, os.path.join(root, "images", rel), labels[i], is_train[i],
                                 boxes.get(i)))
    return records, classes


@register_dataset("cub200")
class CUB200(ImageDataset):
    """CUB-200-2011, fine-grained classification of 200 bird species.

    Reference: Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", CNS-TR-2011-001.
    URL: https://www.vision.caltech.edu/datasets/cub_200_2011/
    Statistics: 11,788 images, 200 classes; train 5,994 / test 5,794 (``train_test_split.txt``).

    Args:
        root: the ``CUB_200_2011`` folder (holding ``images.txt``).
        split: ``train`` or ``test``.
        use_bbox: crop every image to its ``bounding_boxes.txt`` box (the common protocol
            does not: default off). The box is always kept in ``Sample.extra["bbox"]``.
        **kwargs: ``transform``, ``on_error`` (see :class:`ImageDataset`).
    """

    task = "classification"
    splits = ("train", "test")

    def __init__(self, root: str, split: str = "train", use_bbox: bool = False, **kwargs):
        self.use_bbox = use_bbox
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        records, classes = read_cub(self.root)
        if self.use_bbox and not os.path.exists(os.path.join(self.root, "bounding_boxes.txt")):
            raise DatasetError(f"missing {os.path.join(self.root, 'bounding_boxes.txt')}: "
                               f"use_bbox=True needs it; re-extract CUB_200_2011.tgz or pass "
                               f"use_bbox=False")
        want = self.split == "train"
        samples = [Sample(r.path, r.label, bbox=r.bbox if self.use_bbox else None,
                          extra={"image_id": r.image_id, "bbox": r.bbox})
                   for r in records if r.is_train == want]
        return samples, classes
