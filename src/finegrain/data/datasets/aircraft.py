"""FGVC-Aircraft 2013b, variant level (100 classes), read from the dataset's list files.

Layout (the extracted ``fgvc-aircraft-2013b.tar.gz``)::

    fgvc-aircraft-2013b/
        data/variants.txt                        one variant name per line (100)
        data/images_variant_train.txt            "image_id variant name"  (3,334)
        data/images_variant_val.txt              (3,333)
        data/images_variant_trainval.txt         (6,667)
        data/images_variant_test.txt             (3,333)
        data/images/1025794.jpg ...

Variant names contain spaces and slashes (``Cessna 172``, ``F/A-18``): everything after the
first space is the name. Label = line index of the name in ``variants.txt``.
"""

from __future__ import annotations

import os

import torch

from ..registry import register_dataset
from ._parsing import read_lines_numbered
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["BANNER_HEIGHT", "FGVCAircraft"]

#: Height of the copyright banner at the bottom of every FGVC-Aircraft image.
BANNER_HEIGHT = 20


@register_dataset("aircraft")
class FGVCAircraft(ImageDataset):
    """FGVC-Aircraft: fine-grained classification of 100 aircraft variants.

    Reference: Maji et al., "Fine-Grained Visual Classification of Aircraft",
    arXiv:1306.5151, 2013.
    URL: https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/
    Statistics: 10,000 images, 100 variants; trainval 6,667 (train 3,334 + val 3,333) /
    test 3,333.

    Our ``train`` split is the published ``trainval`` list (the standard protocol);
    ``val`` is the published ``val`` list (a subset of ``trainval``, for model selection only:
    train on ``images_variant_train.txt`` with ``train_list="train"``).

    Args:
        root: the ``fgvc-aircraft-2013b`` folder (holding ``data/``), or ``data/`` itself.
        split: ``train``, ``val`` or ``test``.
        train_list: which published list ``train`` reads: ``trainval`` (default) or ``train``.
        crop_banner: remove the bottom 20-pixel copyright banner when decoding (some papers
            do; default off).
        **kwargs: ``transform``, ``on_error``.
    """

    task = "classification"
    splits = ("train", "val", "test")

    def __init__(self, root: str, split: str = "train", train_list: str = "trainval",
                 crop_banner: bool = False, **kwargs):
        if train_list not in ("trainval", "train"):
            raise DatasetError(f"train_list must be 'trainval' or 'train', got {train_list!r}")
        self.train_list = train_list
        self.crop_banner = crop_banner
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        data = os.path.join(self.root, "data")
        if not os.path.isdir(data) and os.path.exists(os.path.join(self.root, "variants.txt")):
            data = self.root
        f_variants = os.path.join(data, "variants.txt")
        classes = [name for _, name in read_lines_numbered(f_variants,
                                                           "the 100 variant names")]
        index = {name: i for i, name in enumerate(classes)}
        image_dir = check_file(os.path.join(data, "images"), "the FGVC-Aircraft images/ folder")
        which = {"train": self.train_list, "val": "val", "test": "test"}[self.split]
        f_list = os.path.join(data, f"images_variant_{which}.txt")
        samples = []
        for n, line in read_lines_numbered(f_list, "'image_id variant name' lines"):
            parts = line.split(" ", 1)
            if len(parts) != 2:
                raise DatasetError(f"{f_list} line {n}: expected 'image_id variant', got "
                                   f"{line!r}; re-extract fgvc-aircraft-2013b.tar.gz")
            image_id, variant = parts[0], parts[1].strip()
            if variant not in index:
                raise DatasetError(f"{f_list} line {n}: variant {variant!r} is not in "
                                   f"{f_variants}; are the lists from the same release "
                                   f"(2013b)?")
            samples.append(Sample(os.path.join(image_dir, image_id + ".jpg"), index[variant],
                                  extra={"image_id": image_id}))
        return samples, classes

    def load_image(self, index: int) -> torch.Tensor:
        img = super().load_image(index)
        if self.crop_banner and img.shape[1] > BANNER_HEIGHT:
            img = img[:, :-BANNER_HEIGHT, :]
        return img
