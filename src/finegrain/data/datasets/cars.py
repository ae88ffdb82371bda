"""Stanford Cars (Cars196), read from the original devkit ``.mat`` files or from the common
CSV re-distribution.

Devkit layout (``car_devkit.tgz`` + ``cars_train.tgz`` + ``cars_test.tgz`` +
``cars_test_annos_withlabels.mat``)::

    stanford_cars/
        devkit/cars_meta.mat                    class_names (1, 196) cell
        devkit/cars_train_annos.mat             annotations (1, 8144) struct:
                                                bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
        cars_test_annos_withlabels.mat          annotations (1, 8041), same fields
        cars_train/00001.jpg ...
        cars_test/00001.jpg ...

The ``.mat`` files may also sit directly in the root or all in ``devkit/``; the image folders
may be nested once (``cars_train/cars_train/``, as in the Kaggle copy of the devkit).

CSV layout (Kaggle "Stanford Car Dataset by classes folder"), no header rows::

    stanford_cars/
        names.csv            one class name per line, line k = class k
        anno_train.csv       "fname,x1,y1,x2,y2,class"    class in 1..196
        anno_test.csv        same
        car_data/car_data/train/<class name>/00001.jpg ...
        car_data/car_data/test/<class name>/00001.jpg ...

(``car_data/train/...`` is accepted too; images are found by file name inside the split
folder, so class-folder spellings such as ``Ram C-V Cargo Van Minivan 2012`` do not matter.)
Class ``k`` (1-based in both layouts) becomes label ``k - 1``. Boxes are 1-based inclusive in
the devkit and converted to 0-based ``(x1 - 1, y1 - 1, x2, y2)``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..registry import register_dataset
from ._parsing import find_first, to_float, to_int
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["CARS_NUM_CLASSES", "CarsRecord", "detect_cars_layout", "read_cars", "StanfordCars"]

CARS_NUM_CLASSES = 196


@dataclass
class CarsRecord:
    """One annotated image (``label`` 0-based, ``bbox`` 0-based x1, y1, x2, y2)."""

    path: str
    label: int
    is_train: bool
    bbox: tuple[float, float, float, float]


def detect_cars_layout(root: str) -> str:
    """``"csv"`` when ``anno_train.csv`` is in the root, ``"devkit"`` when the devkit's
    ``cars_meta.mat`` is found; otherwise a :class:`DatasetError` describing both layouts."""
    if os.path.exists(os.path.join(root, "anno_train.csv")):
        return "csv"
    if any(os.path.exists(os.path.join(root, d, "cars_meta.mat")) for d in ("devkit", "")):
        return "devkit"
    raise DatasetError(f"{root}: neither the Stanford Cars devkit (devkit/cars_meta.mat, "
                       f"devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
                       f"cars_train/, cars_test/) nor the CSV layout (names.csv, anno_train.csv, "
                       f"anno_test.csv, car_data/car_data/{{train,test}}/) was found; is the "
                       f"root the extracted dataset folder?")


def _mat_field(rec, field: str, path: str, i: int):
    try:
        return np.ravel(rec[field])[0]
    except (ValueError, IndexError, KeyError):
        raise DatasetError(f"{path}: annotation {i + 1} has no field {field!r}; expected the "
                           f"devkit struct (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname). "
                           f"Is this cars_test_annos.mat (no labels) instead of "
                           f"cars_test_annos_withlabels.mat?") from None


def _read_mat_annotations(path: str, image_dir: str, is_train: bool,
                          num_classes: int) -> list[CarsRecord]:
    """Parse a devkit ``annotations`` struct array."""
    import scipy.io

    try:
        ann = scipy.io.loadmat(path)["annotations"]
    except KeyError:
        raise DatasetError(f"{path}: no 'annotations' variable; not a Stanford Cars devkit "
                           f"annotation file, re-download it") from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot read ({e}); re-download it") from None
    out = []
    for i, rec in enumerate(np.ravel(ann)):
        fname = str(_mat_field(rec, "fname", path, i))
        cls = int(_mat_field(rec, "class", path, i))
        if not 1 <= cls <= num_classes:
            raise DatasetError(f"{path}: annotation {i + 1} ({fname}) has class {cls} outside "
                               f"1..{num_classes}; re-download the file")
        x1, y1, x2, y2 = (float(_mat_field(rec, k, path, i))
                          for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        out.append(CarsRecord(os.path.join(image_dir, fname), cls - 1, is_train,
                              (x1 - 1, y1 - 1, x2, y2)))
    return out


def _image_dir(root: str, name: str) -> str:
    nested = os.path.join(root, name, name)
    return nested if os.path.isdir(nested) else check_file(os.path.join(root, name),
                                                           f"the Stanford Cars {name}/ folder")


def _read_devkit(root: str) -> tuple[list[CarsRecord], list[str]]:
    import scipy.io

    meta = find_first(root, ["devkit/cars_meta.mat", "cars_meta.mat"],
                      "the Stanford Cars devkit class names cars_meta.mat")
    f_train = find_first(root, ["devkit/cars_train_annos.mat", "cars_train_annos.mat"],
                         "the Stanford Cars devkit cars_train_annos.mat")
    f_test = find_first(root, ["cars_test_annos_withlabels.mat",
                               "devkit/cars_test_annos_withlabels.mat"],
                        "cars_test_annos_withlabels.mat (the test labels, released separately "
                        "from the devkit: put it in the root)")
    try:
        names = scipy.io.loadmat(meta)["class_names"]
    except Exception as e:
        raise DatasetError(f"{meta}: cannot read class_names ({e}); re-download the "
                           f"devkit") from None
    classes = [str(np.ravel(n)[0]) for n in np.ravel(names)]
    records = (_read_mat_annotations(f_train, _image_dir(root, "cars_train"), True, len(classes))
               + _read_mat_annotations(f_test, _image_dir(root, "cars_test"), False,
                                       len(classes)))
    return records, classes


def _read_csv(root: str) -> tuple[list[CarsRecord], list[str]]:
    f_names = check_file(os.path.join(root, "names.csv"), "the class names, one per line")
    with open(f_names, encoding="utf-8", newline="") as f:
        classes = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    records = []
    for split, is_train in (("train", True), ("test", False)):
        f_anno = check_file(os.path.join(root, f"anno_{split}.csv"),
                            "rows 'fname,x1,y1,x2,y2,class' without header")
        img_dir = find_first(root, [f"car_data/car_data/{split}", f"car_data/{split}", split],
                             f"the {split} image folder (car_data/car_data/{split}/<class>/)")
        index = {f: os.path.join(d, f) for d, _, files in os.walk(img_dir) for f in files}
        with open(f_anno, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 6:
                    raise DatasetError(f"{f_anno} line {n}: expected 'fname,x1,y1,x2,y2,class', "
                                       f"got {','.join(row)!r}; re-download the file")
                fname = row[0].strip()
                cls = to_int(row[5].strip(), f_anno, n, "class")
                if not 1 <= cls <= len(classes):
                    raise DatasetError(f"{f_anno} line {n}: class {cls} outside "
                                       f"1..{len(classes)} (names.csv has {len(classes)} "
                                       f"names); re-download the files")
                if fname not in index:
                    raise DatasetError(f"{f_anno} line {n}: image {fname} not found under "
                                       f"{img_dir}; is the CSV from the same download as the "
                                       f"car_data/ folder?")
                x1, y1, x2, y2 = (to_float(row[k].strip(), f_anno, n, key) for k, key in
                                  zip(range(1, 5), ("x1", "y1", "x2", "y2")))
                records.append(CarsRecord(index[fname], cls - 1, is_train,
                                          (x1 - 1, y1 - 1, x2, y2)))
    return records, classes


def read_cars(root: str, layout: Literal["auto", "devkit", "csv"] = "auto"
              ) -> tuple[list[CarsRecord], list[str]]:
    """All Stanford Cars annotations (train then test) and the class names."""
    layout = detect_cars_layout(root) if layout == "auto" else layout
    if layout == "devkit":
        return _read_devkit(root)
    if layout == "csv":
        return _read_csv(root)
    raise DatasetError(f"unknown Stanford Cars layout {layout!r}; choose auto, devkit or csv")


@register_dataset("cars196")
class StanfordCars(ImageDataset):
    """Stanford Cars: fine-grained classification of 196 car make / model / year classes.

    Reference: Krause et al., "3D Object Representations for Fine-Grained Categorization",
    3dRR workshop at ICCV 2013.
    URL: https://ai.stanford.edu/~jkrause/cars/car_dataset.html
    Statistics: 16,185 images, 196 classes; train 8,144 / test 8,041.

    Args:
        root: folder of the devkit layout or of the CSV re-distribution (module docstring).
        split: ``train`` or ``test``.
        layout: ``auto`` (CSV when ``anno_train.csv`` exists, else devkit), ``devkit``,
            ``csv``.
        use_bbox: crop to the annotated box (default off, as in the common protocol; the box
            is always kept in ``Sample.extra["bbox"]``).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "classification"
    splits = ("train", "test")

    def __init__(self, root: str, split: str = "train",
                 layout: Literal["auto", "devkit", "csv"] = "auto", use_bbox: bool = False,
                 **kwargs):
        self.layout = layout
        self.use_bbox = use_bbox
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        records, classes = read_cars(self.root, self.layout)
        want = self.split == "train"
        samples = [Sample(r.path, r.label, bbox=r.bbox if self.use_bbox else None,
                          extra={"bbox": r.bbox}) for r in records if r.is_train == want]
        return samples, classes
