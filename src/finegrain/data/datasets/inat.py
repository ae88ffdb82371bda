"""iNaturalist 2017, read from its COCO-style json annotation files.

Layout (``train_val_images.tar.gz`` + ``train_val2017.zip`` extracted in one folder)::

    inat2017/
        train2017.json     {"images": [{"id", "file_name", ...}],
                            "annotations": [{"image_id", "category_id", ...}],
                            "categories": [{"id", "name", "supercategory"}]}
        val2017.json       same keys
        train_val_images/Plantae/Abies concolor/<hash>.jpg ...   (file_name is relative
                                                                  to the root)

The competition's test set has no public labels, so our ``test`` split is ``val2017.json``.
Labels: category ids sorted, index = label (the 2017 ids are already 0..5088).
"""

from __future__ import annotations

import json
import os

from ..registry import register_dataset
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["read_coco_classification", "INat2017"]


def read_coco_classification(path: str) -> tuple[list[tuple[str, int]], dict[int, str]]:
    """Parse a COCO-style classification json.

    Returns:
        ``([(file_name, category_id)], {category_id: name})``, images in file order.

    Raises:
        DatasetError: not json, a key is missing, or an image has no / several annotations.
    """
    try:
        with open(check_file(path, "the COCO-style annotation json"), encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid json (line {e.lineno}: {e.msg}); the download "
                           f"is truncated, extract train_val2017.zip again") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: no {key!r} key; expected the COCO-style iNaturalist "
                               f"file with images, annotations and categories")
    try:
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        label: dict[int, int] = {}
        for a in data["annotations"]:
            iid = int(a["image_id"])
            if iid in label:
                raise DatasetError(f"{path}: image id {iid} has more than one annotation; "
                                   f"this reader expects one category per image")
            cid = int(a["category_id"])
            if cid not in cats:
                raise DatasetError(f"{path}: annotation for image {iid} has category_id {cid} "
                                   f"that is not in 'categories'; re-download the file")
            label[iid] = cid
        out = []
        for im in data["images"]:
            iid = int(im["id"])
            if iid not in label:
                raise DatasetError(f"{path}: image id {iid} ({im.get('file_name')}) has no "
                                   f"annotation; re-download the file")
            out.append((str(im["file_name"]), label[iid]))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: malformed entry ({type(e).__name__}: {e}); expected "
                           f"images[id, file_name], annotations[image_id, category_id], "
                           f"categories[id, name]") from None
    return out, cats


@register_dataset("inat2017")
class INat2017(ImageDataset):
    """iNaturalist 2017: species classification, 5,089 classes, long-tailed.

    Reference: Van Horn et al., "The iNaturalist Species Classification and Detection
    Dataset", CVPR 2018.
    URL: https://github.com/visipedia/inat_comp/tree/master/2017
    Statistics: train 579,184 / val (our ``test``) 95,986 images, 5,089 classes.

    Args:
        root: folder with ``train2017.json``, ``val2017.json`` and ``train_val_images/``.
        split: ``train`` or ``test`` (= ``val2017.json``).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "classification"
    splits = ("train", "test")

    def load(self) -> tuple[list[Sample], list[str]]:
        f_train = os.path.join(self.root, "train2017.json")
        f_val = os.path.join(self.root, "val2017.json")
        check_file(f_train, "the iNat2017 training annotations (train_val2017.zip)")
        check_file(f_val, "the iNat2017 validation annotations (train_val2017.zip)")
        items, cats = read_coco_classification(f_train if self.split == "train" else f_val)
        ids = sorted(cats)
        label_of = {c: i for i, c in enumerate(ids)}
        samples = [Sample(os.path.join(self.root, fn), label_of[c], extra={"category_id": c})
                   for fn, c in items]
        return samples, [cats[c] for c in ids]
