"""MSMT17 person re-identification, read from its list files (V1 and V2 layouts).

Layouts::

    MSMT17_V1/                              MSMT17_V2/
        list_train.txt  "path pid"              list_train.txt
        list_val.txt                            list_val.txt
        list_query.txt                          list_query.txt
        list_gallery.txt                        list_gallery.txt
        train/0000/0000_000_01_0303morning_0015_0.jpg     mask_train_v2/0000/...
        test/0000/...                                      mask_test_v2/0000/...

List paths are relative to the train folder (``list_train``, ``list_val``) or the test folder
(``list_query``, ``list_gallery``). The version is detected from the folders present; the
first, middle and last entries of each list are checked to exist, so lists of one version
next to the images of the other fail with a message instead of at the first batch.
Camera = third field of the file name (``..._01_...`` -> camera 1 -> camid 0).
"""

from __future__ import annotations

import os

from ..registry import register_dataset
from ._parsing import read_rows, to_int
from .base import DatasetError, ImageDataset, Sample, check_file
from .market import reid_samples

__all__ = ["VERSIONS", "NUM_CAMERAS", "detect_msmt_version", "read_msmt_list", "MSMT17"]

VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
NUM_CAMERAS = 15


def detect_msmt_version(root: str) -> str:
    """``"MSMT17_V1"`` or ``"MSMT17_V2"`` from the image folders present in ``root``."""
    for version, (tr, te) in VERSIONS.items():
        if os.path.isdir(os.path.join(root, tr)) and os.path.isdir(os.path.join(root, te)):
            return version
    raise DatasetError(f"{root}: no MSMT17 image folders: expected train/ and test/ "
                       f"(MSMT17_V1) or mask_train_v2/ and mask_test_v2/ (MSMT17_V2) next to "
                       f"list_train.txt; is the root the extracted MSMT17_V1 / MSMT17_V2 folder?")


def _camid(rel: str, path: str, line: int) -> int:
    parts = os.path.basename(rel).split("_")
    try:
        cam = int(parts[2])
    except (IndexError, ValueError):
        raise DatasetError(f"{path} line {line}: cannot read the camera from {rel!r}; MSMT17 "
                           f"names look like 0000_000_01_0303morning_0015_0.jpg (third field = "
                           f"camera); is this the MSMT17 list?") from None
    if not 1 <= cam <= NUM_CAMERAS:
        raise DatasetError(f"{path} line {line}: camera {cam} in {rel!r} outside "
                           f"1..{NUM_CAMERAS}; is this the MSMT17 list?")
    return cam - 1


def read_msmt_list(root: str, list_name: str, image_dir: str, version: str
                   ) -> list[tuple[str, int, int]]:
    """Parse one ``list_*.txt`` into ``(path, pid, camid)`` and spot-check image paths."""
    path = os.path.join(root, list_name)
    rows = read_rows(path, "MSMT17 'relative/path.jpg pid' lines", 2)
    items = []
    for n, (rel, pid) in rows:
        items.append((os.path.join(root, image_dir, rel), to_int(pid, path, n, "pid"),
                      _camid(rel, path, n)))
    for k in sorted({0, len(rows) // 2, len(rows) - 1} if rows else set()):
        n, (rel, _) = rows[k]
        if not os.path.exists(items[k][0]):
            other = [v for v in VERSIONS if v != version][0]
            raise DatasetError(
                f"{path} line {n}: {os.path.join(image_dir, rel)} not found; the lists do not "
                f"match the image folders (detected {version}: {VERSIONS[version][0]}/, "
                f"{VERSIONS[version][1]}/; {other} uses {VERSIONS[other][0]}/, "
                f"{VERSIONS[other][1]}/). Use the list_*.txt files shipped in the same archive "
                f"as the images, or re-extract it")
    return items


@register_dataset("msmt17")
class MSMT17(ImageDataset):
    """MSMT17 person re-identification (V1 or V2 images).

    Reference: Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person
    Re-Identification", CVPR 2018.
    URL: https://www.pkuvmc.com/dataset.html
    Statistics: list_train 30,248 + list_val 2,373 = 32,621 images / 1,041 ids (our
    ``train``, as TransReID and DCAL); query 11,659; gallery 82,161; 3,060 test ids;
    15 cameras.

    Args:
        root: the ``MSMT17_V1`` or ``MSMT17_V2`` folder.
        split: ``train``, ``query`` or ``gallery``.
        train_only: ``train`` reads ``list_train.txt`` only (30,248 images) instead of
            ``list_train.txt`` + ``list_val.txt``.
        **kwargs: ``transform``, ``on_error``.

    Attributes:
        version: ``"MSMT17_V1"`` or ``"MSMT17_V2"`` (detected).
    """

    task = "reid"
    splits = ("train", "query", "gallery")

    def __init__(self, root: str, split: str = "train", train_only: bool = False, **kwargs):
        self.train_only = train_only
        self.version = ""
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
            check_file(os.path.join(self.root, name), "an MSMT17 list 'relative/path.jpg pid'")
        self.version = detect_msmt_version(self.root)
        train_dir, test_dir = VERSIONS[self.version]
        lists = {"train": [("list_train.txt", train_dir)]
                 + ([] if self.train_only else [("list_val.txt", train_dir)]),
                 "query": [("list_query.txt", test_dir)],
                 "gallery": [("list_gallery.txt", test_dir)]}[self.split]
        items = []
        for list_name, image_dir in lists:
            items += read_msmt_list(self.root, list_name, image_dir, self.version)
        return reid_samples(items, relabel_ids=self.split == "train")
