"""Deep-metric-learning splits of CUB-200-2011 and Stanford Cars (zero-shot: train and test
classes are disjoint).

Following the DML convention (Oh Song et al. 2016), all images of a dataset are pooled,
ignoring its classification train / test split, and split by class:

- ``cub200_dml``: classes 1-100 -> ``train`` (5,864 images), 101-200 -> ``test`` (5,924).
- ``cars196_dml``: classes 1-98 -> ``train`` (8,054), 99-196 -> ``test`` (8,131).

Both splits are relabelled to 0..C-1 (test class 101 -> label 0); ``classes[label]`` keeps the
real class name, and ``Sample.extra["class_index"]`` the 0-based index in the full dataset. A
test label therefore says nothing about a train label: only equality within a split matters.
The split point is half the number of classes in ``classes.txt`` / the class-name file
(100 and 98 for the real datasets), so generated datasets in the same layouts with fewer
classes split the same way. The files read are those of :mod:`.cub` and :mod:`.cars`
(same layouts, same errors).
"""

from __future__ import annotations

from typing import Literal

from ..registry import register_dataset
from .base import ImageDataset, Sample
from .cars import read_cars
from .cub import read_cub

__all__ = ["CUB200DML", "Cars196DML"]


def _split_by_class(records, classes: list[str], split: str
                    ) -> tuple[list[Sample], list[str]]:
    """First half of the classes (in class-id order) -> train, second half -> test."""
    num_train = len(classes) // 2  # 100 for CUB, 98 for Cars
    lo, hi = (0, num_train) if split == "train" else (num_train, len(classes))
    samples = [Sample(r.path, r.label - lo, extra={"class_index": r.label, "bbox": r.bbox})
               for r in records if lo <= r.label < hi]
    return samples, classes[lo:hi]


@register_dataset("cub200_dml")
class CUB200DML(ImageDataset):
    """CUB-200-2011, DML split: classes 1-100 train, 101-200 test, all images pooled.

    Reference: Wah et al., CNS-TR-2011-001; split of Oh Song et al., "Deep Metric Learning
    via Lifted Structured Feature Embedding", CVPR 2016.
    URL: https://www.vision.caltech.edu/datasets/cub_200_2011/
    Statistics: train 5,864 images / 100 classes; test 5,924 / 100 classes.

    Args:
        root: the ``CUB_200_2011`` folder.
        split: ``train`` or ``test``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "dml"
    splits = ("train", "test")

    def load(self) -> tuple[list[Sample], list[str]]:
        records, classes = read_cub(self.root)
        return _split_by_class(records, classes, self.split)


@register_dataset("cars196_dml")
class Cars196DML(ImageDataset):
    """Stanford Cars, DML split: classes 1-98 train, 99-196 test, all images pooled.

    Reference: Krause et al., 3dRR 2013; split of Oh Song et al., CVPR 2016.
    URL: https://ai.stanford.edu/~jkrause/cars/car_dataset.html
    Statistics: train 8,054 images / 98 classes; test 8,131 / 98 classes.

    Args:
        root: the Stanford Cars folder, devkit or CSV layout (see :mod:`.cars`).
        split: ``train`` or ``test``.
        layout: ``auto``, ``devkit`` or ``csv``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "dml"
    splits = ("train", "test")

    def __init__(self, root: str, split: str = "train",
                 layout: Literal["auto", "devkit", "csv"] = "auto", **kwargs):
        self.layout = layout
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        records, classes = read_cars(self.root, self.layout)
        return _split_by_class(records, classes, self.split)
