"""NABirds (North American Birds), read from the dataset's own list files.

Layout (the extracted ``nabirds.tar.gz``)::

    nabirds/
        images.txt               "image_uuid relative/path.jpg"
        image_class_labels.txt   "image_uuid class_id"
        train_test_split.txt     "image_uuid is_training_image"   1 = train
        classes.txt              "class_id name"   (1,011 nodes of the taxonomy)
        bounding_boxes.txt       "image_uuid x y width height" (optional)
        images/0817/0000139e21dc4d0cbfe14cae3c85c829.jpg ...

``classes.txt`` lists every node of the hierarchy; images are labelled with 555 leaf classes
whose ids are not contiguous. Labels are remapped to 0..C-1 over the class ids that
``image_class_labels.txt`` uses (sorted by id, over both splits, so train and test share it).
"""

from __future__ import annotations

import os

from ..registry import register_dataset
from ._parsing import read_rows, to_float, to_int
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["NABirds"]


@register_dataset("nabirds")
class NABirds(ImageDataset):
    """NABirds: fine-grained classification of 555 North American bird categories.

    Reference: Van Horn et al., "Building a bird recognition app and large scale dataset with
    citizen scientists: The fine print in fine-grained dataset collection", CVPR 2015.
    URL: https://dl.allaboutbirds.org/nabirds
    Statistics: 48,562 images, 555 classes; train 23,929 / test 24,633.

    Args:
        root: the ``nabirds`` folder (holding ``images.txt``).
        split: ``train`` or ``test``.
        use_bbox: crop to ``bounding_boxes.txt`` (default off; the box is always kept in
            ``Sample.extra["bbox"]`` when the file exists).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "classification"
    splits = ("train", "test")

    def __init__(self, root: str, split: str = "train", use_bbox: bool = False, **kwargs):
        self.use_bbox = use_bbox
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        fix = "re-extract nabirds.tar.gz"
        root = self.root
        f_images = os.path.join(root, "images.txt")
        f_labels = os.path.join(root, "image_class_labels.txt")
        f_split = os.path.join(root, "train_test_split.txt")
        f_classes = os.path.join(root, "classes.txt")
        f_boxes = os.path.join(root, "bounding_boxes.txt")
        for p, what in [(f_images, "the NABirds image list 'uuid path'"),
                        (f_labels, "the NABirds labels 'uuid class_id'"),
                        (f_split, "the NABirds split 'uuid is_training_image'"),
                        (f_classes, "the NABirds class names 'class_id name'")]:
            check_file(p, what)
        if self.use_bbox:
            check_file(f_boxes, "the boxes 'uuid x y width height' (use_bbox=True needs it)")

        names = {to_int(cid, f_classes, n, "class_id"): name
                 for n, (cid, name) in read_rows(f_classes, "'class_id name'", 2, maxsplit=1)}
        raw: dict[str, int] = {}
        for n, (uid, cid) in read_rows(f_labels, "'uuid class_id'", 2):
            c = to_int(cid, f_labels, n, "class_id")
            if c not in names:
                raise DatasetError(f"{f_labels} line {n}: class_id {c} is not in {f_classes}; "
                                   f"{fix}")
            raw[uid] = c
        used = sorted(set(raw.values()))
        label_of = {c: i for i, c in enumerate(used)}
        classes = [names[c] for c in used]

        is_train: dict[str, bool] = {}
        for n, (uid, flag) in read_rows(f_split, "'uuid is_training_image'", 2):
            v = to_int(flag, f_split, n, "is_training_image")
            if v not in (0, 1):
                raise DatasetError(f"{f_split} line {n}: is_training_image must be 0 or 1, got "
                                   f"{v}; {fix}")
            is_train[uid] = v == 1

        boxes = {}
        if os.path.exists(f_boxes):
            for n, (uid, x, y, w, h) in read_rows(f_boxes, "'uuid x y width height'", 5):
                x, y, w, h = (to_float(v, f_boxes, n, k) for v, k in
                              zip((x, y, w, h), ("x", "y", "width", "height")))
                boxes[uid] = (x, y, x + w, y + h)

        want = self.split == "train"
        image_dir = os.path.join(root, "images")
        samples = []
        for n, (uid, rel) in read_rows(f_images, "'uuid path'", 2, maxsplit=1):
            for table, f in ((raw, f_labels), (is_train, f_split)):
                if uid not in table:
                    raise DatasetError(f"{f_images} line {n}: image {uid} has no line in {f}; "
                                       f"{fix}")
            if is_train[uid] != want:
                continue
            box = boxes.get(uid)
            samples.append(Sample(os.path.join(image_dir, rel), label_of[raw[uid]],
                                  bbox=box if self.use_bbox else None,
                                  extra={"image_id": uid, "class_id": raw[uid], "bbox": box}))
        return samples, classes
