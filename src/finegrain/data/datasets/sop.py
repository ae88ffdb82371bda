"""Product retrieval for deep metric learning: Stanford Online Products and DeepFashion
In-Shop Clothes Retrieval.

SOP layout (``Stanford_Online_Products.zip``)::

    Stanford_Online_Products/
        Ebay_train.txt     header "image_id class_id super_class_id path"
        Ebay_test.txt      same
        bicycle_final/111085122871_0.JPG ...

In-Shop layout (the "In-shop Clothes Retrieval Benchmark" of DeepFashion)::

    InShop/
        Eval/list_eval_partition.txt    line 1: number of images; line 2: header
                                        "image_name item_id evaluation_status";
                                        then "img/WOMEN/Dresses/id_00000002/02_1_front.jpg
                                        id_00000002 train|query|gallery"
        Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...

(``list_eval_partition.txt`` may also sit in the root, and ``img/`` directly in the root.)
"""

from __future__ import annotations

import os

from ..registry import register_dataset
from ._parsing import find_first, read_rows, relabel, to_int
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["StanfordOnlineProducts", "InShop"]


@register_dataset("sop")
class StanfordOnlineProducts(ImageDataset):
    """Stanford Online Products (Ebay), DML split.

    Reference: Oh Song et al., "Deep Metric Learning via Lifted Structured Feature
    Embedding", CVPR 2016.
    URL: https://cvgl.stanford.edu/projects/lifted_struct/
    Statistics: 120,053 images, 22,634 products; train 59,551 / 11,318 classes; test 60,502
    / 11,316 classes (Recall@1, 10, 100, 1000; every test image queries the others).

    Labels are the ``class_id`` relabelled to 0..C-1 within the split (sorted);
    ``classes[label]`` is the original ``class_id``; ``Sample.extra["super_class_id"]`` keeps
    the category (bicycle, chair ...).

    Args:
        root: the ``Stanford_Online_Products`` folder.
        split: ``train`` (``Ebay_train.txt``) or ``test`` (``Ebay_test.txt``).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "dml"
    splits = ("train", "test")

    def load(self) -> tuple[list[Sample], list[str]]:
        f_train = os.path.join(self.root, "Ebay_train.txt")
        f_test = os.path.join(self.root, "Ebay_test.txt")
        for p in (f_train, f_test):
            check_file(p, "the SOP list 'image_id class_id super_class_id path' (with header)")
        path = f_train if self.split == "train" else f_test
        rows = read_rows(path, "'image_id class_id super_class_id path'", 4, maxsplit=3)
        if rows and rows[0][1][0] == "image_id":
            rows = rows[1:]
        items = []
        for n, (_, cid, sid, rel) in rows:
            items.append((os.path.join(self.root, rel), to_int(cid, path, n, "class_id"),
                          to_int(sid, path, n, "super_class_id")))
        mapping = relabel(c for _, c, _ in items)
        samples = [Sample(p, mapping[c], extra={"class_id": c, "super_class_id": s})
                   for p, c, s in items]
        return samples, [str(c) for c in mapping]


@register_dataset("inshop")
class InShop(ImageDataset):
    """DeepFashion In-Shop Clothes Retrieval.

    Reference: Liu et al., "DeepFashion: Powering Robust Clothes Recognition and Retrieval
    with Rich Annotations", CVPR 2016.
    URL: https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html
    Statistics: 52,712 images, 7,982 items; train 25,882 images / 3,997 items; query 14,218
    against gallery 12,612 (3,985 items); Recall@1, 10, 20, 30, 40, 50.

    Labels: ``train`` items relabelled 0..N-1; ``query`` and ``gallery`` share one mapping
    over the items of both (sorted ``item_id``), so equal labels mean the same item.
    ``classes[label]`` is the item id.

    Args:
        root: the In-Shop folder (holding ``Eval/`` and ``Img/``).
        split: ``train``, ``query`` or ``gallery``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "dml"
    splits = ("train", "query", "gallery")

    def load(self) -> tuple[list[Sample], list[str]]:
        path = find_first(self.root, ["Eval/list_eval_partition.txt", "list_eval_partition.txt"],
                          "the In-Shop list Eval/list_eval_partition.txt")
        img_root = os.path.join(self.root, "Img")
        if not os.path.isdir(os.path.join(img_root, "img")):
            img_root = self.root
        check_file(os.path.join(img_root, "img"), "the In-Shop images folder Img/img/")
        rows = read_rows(path, "'image_name item_id evaluation_status'", 1)
        fix = "download list_eval_partition.txt again"
        if len(rows) < 2 or rows[1][1][:3] != ["image_name", "item_id", "evaluation_status"]:
            raise DatasetError(f"{path}: expected the image count on line 1 and the header "
                               f"'image_name item_id evaluation_status' on line 2; {fix}")
        count = to_int(rows[0][1][0], path, rows[0][0], "image count")
        entries = rows[2:]
        if count != len(entries):
            raise DatasetError(f"{path} line 1: announces {count} images but lists "
                               f"{len(entries)}; the file is truncated, {fix}")
        items = []
        for n, fields in entries:
            if len(fields) != 3 or fields[2] not in ("train", "query", "gallery"):
                raise DatasetError(f"{path} line {n}: expected 'image_name item_id "
                                   f"train|query|gallery', got {' '.join(fields)!r}; {fix}")
            items.append((os.path.join(img_root, fields[0]), fields[1], fields[2]))
        scope = {"train": ("train",)}.get(self.split, ("query", "gallery"))
        mapping = relabel(item for _, item, status in items if status in scope)
        samples = [Sample(p, mapping[item], extra={"item_id": item})
                   for p, item, status in items if status == self.split]
        return samples, list(mapping)
