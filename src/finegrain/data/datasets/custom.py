"""Plain user formats: a class-per-folder tree (``imagefolder``) and a CSV of images with
identities and cameras (``reid_csv``).

``imagefolder`` (classification)::

    root/train/<class name>/*.jpg      root/val/<class>/...      root/test/<class>/...

Classes are the sub-folder names of ``train/`` (sorted; label = index), so every split uses
the same labels; a class folder in ``val/`` or ``test/`` that ``train/`` lacks is an error.
Images are found recursively below each class folder (``.jpg .jpeg .png .webp .gif``). When
the root has none of ``train/``, ``val/``, ``test/``, the root itself is the class-folder tree
and the only split is ``train``.

``reid_csv`` (re-identification / retrieval)::

    root/data.csv        header "path,label[,camid][,split]"
    root/<paths>         paths relative to the CSV's folder (absolute paths also work)

``label`` is the identity: integers are used as they are (raw pid for ``query`` /
``gallery``, relabelled 0..N-1 for ``train``); any non-integer label maps every distinct
string to an integer (sorted, over the whole file). ``split`` is ``train``, ``query`` or
``gallery``; without the column every row is ``train``. ``camid`` is an integer >= 0; without
it, query rows get camera 0 and gallery rows camera 1, so the same-camera rule of the Re-ID
protocol removes nothing (documented in docs/datasets.md).
"""

from __future__ import annotations

import csv
import os

from ..registry import register_dataset
from ._parsing import IMAGE_EXTENSIONS
from .base import DatasetError, ImageDataset, Sample, check_file
from .market import reid_samples

__all__ = ["ImageFolder", "ReIDCSV"]

_FOLDER_SPLITS = ("train", "val", "test")


def _images_below(folder: str) -> list[str]:
    out = []
    for d, subdirs, files in os.walk(folder):
        subdirs.sort()
        out += [os.path.join(d, f) for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def _class_dirs(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder)
                  if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


@register_dataset("imagefolder")
class ImageFolder(ImageDataset):
    """A class-per-folder classification tree (torchvision ``ImageFolder`` style).

    Args:
        root: folder holding ``train/`` (``val/``, ``test/``) class trees, or one class tree
            (then the only split is ``train``).
        split: ``train``, ``val`` or ``test``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "classification"
    splits = _FOLDER_SPLITS

    @classmethod
    def available_splits(cls, root: str) -> tuple[str, ...]:
        """The splits present under ``root``."""
        present = tuple(s for s in _FOLDER_SPLITS if os.path.isdir(os.path.join(root, s)))
        return present or ("train",)

    def load(self) -> tuple[list[Sample], list[str]]:
        present = [s for s in _FOLDER_SPLITS if os.path.isdir(os.path.join(self.root, s))]
        if present:
            if self.split not in present:
                raise DatasetError(f"{self.root}: no {self.split}/ folder (found "
                                   f"{', '.join(p + '/' for p in present)}); create "
                                   f"{os.path.join(self.root, self.split)}/<class>/*.jpg or "
                                   f"ask for another split")
            folder = os.path.join(self.root, self.split)
            ref = os.path.join(self.root, "train" if "train" in present else self.split)
        else:
            if self.split != "train":
                raise DatasetError(f"{self.root} has no train/ val/ test/ folders, so it is one "
                                   f"class tree read as split 'train'; for a {self.split!r} "
                                   f"split use root/train/<class>/ and "
                                   f"root/{self.split}/<class>/")
            folder = ref = self.root
        classes = _class_dirs(ref)
        if not classes:
            raise DatasetError(f"{ref}: no class sub-folders; expected {ref}/<class name>/*.jpg")
        index = {c: i for i, c in enumerate(classes)}
        samples = []
        for c in _class_dirs(folder):
            if c not in index:
                raise DatasetError(f"{os.path.join(folder, c)}: class {c!r} is not a folder of "
                                   f"{ref}; every split must use the classes of train/ (add or "
                                   f"rename the folder)")
            samples += [Sample(p, index[c]) for p in _images_below(os.path.join(folder, c))]
        return samples, classes


@register_dataset("reid_csv")
class ReIDCSV(ImageDataset):
    """Re-identification / retrieval images listed in a CSV (module docstring for the format).

    Args:
        root: the folder holding the CSV; image paths are relative to it.
        split: ``train``, ``query`` or ``gallery``.
        csv_file: CSV file name inside ``root`` (default ``data.csv``).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "reid"
    splits = ("train", "query", "gallery")

    def __init__(self, root: str, split: str = "train", csv_file: str = "data.csv", **kwargs):
        self.csv_file = csv_file
        super().__init__(root, split, **kwargs)

    @classmethod
    def available_splits(cls, root: str, csv_file: str = "data.csv") -> tuple[str, ...]:
        """The splits that have rows in the CSV."""
        rows, has_split, _ = cls._read(os.path.join(root, csv_file))
        found = {r["split"] for _, r in rows} if has_split else {"train"}
        return tuple(s for s in cls.splits if s in found)

    @staticmethod
    def _read(path: str) -> tuple[list[tuple[int, dict]], bool, bool]:
        check_file(path, "a CSV with header 'path,label[,camid][,split]'")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in (reader.fieldnames or [])]
            lacks = [c for c in ("path", "label") if c not in fields]
            if lacks:
                raise DatasetError(f"{path} line 1: header {','.join(fields)!r} lacks "
                                   f"{' and '.join(repr(c) for c in lacks)}; the first line "
                                   f"must be 'path,label[,camid][,split]'")
            reader.fieldnames = fields
            rows = []
            for row in reader:
                if not any((v or "").strip() for v in row.values()):
                    continue
                row = {k: (v or "").strip() for k, v in row.items() if k is not None}
                if "split" in fields and row.get("split") not in ("train", "query", "gallery"):
                    raise DatasetError(f"{path} line {reader.line_num}: split "
                                       f"{row.get('split')!r} must be train, query or gallery")
                if not row["path"] or not row["label"]:
                    raise DatasetError(f"{path} line {reader.line_num}: empty path or label; "
                                       f"fill or remove the row")
                rows.append((reader.line_num, row))
        return rows, "split" in fields, "camid" in fields

    def load(self) -> tuple[list[Sample], list[str]]:
        path = os.path.join(self.root, self.csv_file)
        rows, has_split, has_cam = self._read(path)
        if not has_split and self.split != "train":
            raise DatasetError(f"{path}: no 'split' column, so every row is 'train'; add a "
                               f"split column (train / query / gallery) to get {self.split!r}")
        numeric = True
        for _, r in rows:
            try:
                int(r["label"])
            except ValueError:
                numeric = False
                break
        names = sorted({r["label"] for _, r in rows})
        pid_of = ({n: int(n) for n in names} if numeric
                  else {n: i for i, n in enumerate(names)})
        base = os.path.dirname(os.path.abspath(path))
        items = []
        for n, r in rows:
            if r.get("split", "train") != self.split:
                continue
            pid = pid_of[r["label"]]
            if pid < 0:
                raise DatasetError(f"{path} line {n}: label {pid} is negative; drop junk rows "
                                   f"or give them a non-negative identity")
            if has_cam:
                try:
                    cam = int(r["camid"])
                except ValueError:
                    cam = -1
                if cam < 0:
                    raise DatasetError(f"{path} line {n}: camid {r['camid']!r} is not an "
                                       f"integer >= 0; fill the column or drop it")
            else:
                cam = {"query": 0, "gallery": 1}.get(self.split, -1)
            items.append((os.path.join(base, r["path"]), pid, cam))
        samples, classes = reid_samples(items, relabel_ids=self.split == "train")
        if not numeric:  # classes hold the user's label strings
            inverse = {v: k for k, v in pid_of.items()}
            classes = [inverse[int(c)] for c in classes]
        return samples, classes
