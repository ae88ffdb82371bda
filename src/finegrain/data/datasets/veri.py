"""VeRi-776 vehicle re-identification.

Layout (the extracted ``VeRi.zip``)::

    VeRi/
        image_train/0001_c001_00016450_0.jpg ...
        image_query/
        image_test/
        name_train.txt   name_query.txt   name_test.txt     one file name per line

File name ``0002_c002_00030600_0.jpg``: vehicle id 0002, camera 002 (-> camid 1), frame.
The ``name_*.txt`` lists define each split when present; without them the folder is listed.
``train`` ids are relabelled 0..N-1; ``query`` / ``gallery`` (= ``image_test``) keep raw ids.
"""

from __future__ import annotations

import os
import re

from ..registry import register_dataset
from ._parsing import list_images, read_lines_numbered
from .base import DatasetError, ImageDataset, Sample, check_file
from .market import reid_samples

__all__ = ["NUM_CAMERAS", "VeRi776"]

_SPLITS = {"train": ("image_train", "name_train.txt"), "query": ("image_query", "name_query.txt"),
           "gallery": ("image_test", "name_test.txt")}
_PATTERN = re.compile(r"(\d+)_c(\d+)_")
NUM_CAMERAS = 20


@register_dataset("veri776")
class VeRi776(ImageDataset):
    """VeRi-776 vehicle re-identification.

    Reference: Liu et al., "A Deep Learning-Based Approach to Progressive Vehicle
    Re-identification for Urban Surveillance", ECCV 2016.
    URL: https://vehiclereid.github.io/VeRi/
    Statistics: 776 vehicles, 20 cameras; train 37,778 images / 576 ids; query 1,678 /
    200 ids; gallery 11,579 / 200 ids.

    Args:
        root: the ``VeRi`` folder (holding ``image_train/``, ``image_query/``,
            ``image_test/``).
        split: ``train``, ``query`` or ``gallery``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "reid"
    splits = ("train", "query", "gallery")

    def load(self) -> tuple[list[Sample], list[str]]:
        for folder, _ in _SPLITS.values():
            check_file(os.path.join(self.root, folder), f"the VeRi-776 {folder}/ folder")
        folder, list_name = _SPLITS[self.split]
        folder = os.path.join(self.root, folder)
        list_path = os.path.join(self.root, list_name)
        if os.path.exists(list_path):
            names = read_lines_numbered(list_path, "VeRi file names")
        else:
            list_path = folder
            names = list(enumerate(list_images(folder), start=1))
        items = []
        for n, name in names:
            m = _PATTERN.match(name)
            where = f"{list_path} line {n}" if list_path != folder else os.path.join(folder,
                                                                                    name)
            if m is None:
                raise DatasetError(f"{where}: {name!r} does not follow the VeRi grammar "
                                   f"'<vehicle id>_c<camera>_<frame>_<n>.jpg'; remove files "
                                   f"that are not part of the dataset")
            cam = int(m.group(2))
            if not 1 <= cam <= NUM_CAMERAS:
                raise DatasetError(f"{where}: camera c{cam:03d} outside 1..{NUM_CAMERAS}; is "
                                   f"this VeRi-776?")
            items.append((os.path.join(folder, name), int(m.group(1)), cam - 1))
        return reid_samples(items, relabel_ids=self.split == "train")
