"""The one LightningDataModule: a registered dataset, its task's transforms and samplers.

Training batches come from a resumable batch sampler (``finegrain.data.samplers``,
:attr:`FinegrainDataModule.train_batch_sampler`); :class:`finegrain.engine.resume.ExactResume`
gives it the position of a mid-epoch checkpoint, and a resumed run skips exactly the batches
trained. Evaluation shards samples across DDP ranks without padding (the module gathers them
back in dataset order).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.holdout import holdout
from ..data.registry import build_dataset, get_dataset_class
from ..data.samplers import PKBatchSampler, RandomBatchSampler, SeededDataset, ShardSampler
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from ..choices import check_choice, refusal
from ..errors import InputError

__all__ = ["Sampler", "ResizeMode", "OnError", "Interpolation", "TrainCrop", "QueryGallery",
           "FinegrainDataModule"]

Sampler = Literal["random", "pk"]
"""``data.sampler``: the training batch samplers."""

ResizeMode = Literal["square", "shorter"]
"""``data.resize_mode``: how ``resize_size`` resizes."""

OnError = Literal["raise", "skip"]
"""``data.on_error``: what a corrupt / missing image does."""

Interpolation = Literal["bilinear", "bicubic"]
"""``data.interpolation``: the resize filter (None: the weights')."""

TrainCrop = Literal["random_resized", "resize_crop"]
"""``data.train_crop``: the training crop (None: the task's)."""


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "camid": torch.tensor([it["camid"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "query": torch.tensor([bool(it.get("query", False)) for it in items])}


class QueryGallery(Dataset):
    """The query split then the gallery split as one evaluation set: item ``i`` carries its
    position ``index = i`` in this set (not in its split, where the query and gallery
    numbering overlap) and ``query`` (True for the queries), so the evaluation tells queries
    from gallery by the flag, in any order and across DDP ranks.

    Args:
        query: the query split's dataset.
        gallery: the gallery split's dataset.
    """

    def __init__(self, query: Dataset, gallery: Dataset):
        self.datasets = (query, gallery)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, index: int) -> dict:
        q, g = self.datasets
        is_query = index < len(q)
        item = dict(q[index] if is_query else g[index - len(q)])
        item.update(index=index, query=is_query)
        return item


class FinegrainDataModule(pl.LightningDataModule):
    """Data of one run.

    Args:
        dataset: registry name (``cub200``, ``market1501``, ``synthetic_fgvc`` ...).
        root: dataset root (for ``synthetic_*`` the cache folder; None = default cache).
        img_size: model input size, int or [H, W] (Re-ID: [256, 128]); linked to the
            model's ``img_size`` (``model.img_size``).
        resize_size: resize before the crop (classification 550 for 448; DML 256 for 224).
        batch_size: training batch per process (P x K for ``sampler: pk``).
        eval_batch_size: evaluation batch (default: ``batch_size``).
        sampler: ``random`` or ``pk`` (P identities x K instances; Re-ID and DML).
        num_instances: K of the P x K sampler.
        num_workers: DataLoader worker processes (decoding + augmentation).
        val_split: what training evaluates, and so what chooses ``best.ckpt``: ``holdout``
            (the default: ``val_fraction`` of the training split held out, seeded by
            ``holdout_seed``; images per class for classification, whole classes for DML,
            whole identities for Re-ID, see :mod:`finegrain.data.holdout`), ``test`` (the
            test protocol: query + gallery where the dataset has them; the checkpoint is
            then chosen on the test split), another split of the dataset (``val``), or
            ``none``. Retrieval sets have no training-time evaluation.
        val_fraction: share held out by ``val_split: holdout``.
        holdout_seed: seed of the held-out draw (not the training seed: runs of different
            seeds hold out the same images).
        mean: normalisation mean (None: the weights' own, set by ``finegrain train`` from
            ``model.pretrained``; ImageNet's without weights).
        std: normalisation std (as ``mean``).
        interpolation: resize interpolation (None: the weights', else bilinear).
        crop_pct: classification / DML eval crop share when ``resize_size`` is not set
            (None: the weights', else 224/256).
        train_crop: ``random_resized`` or ``resize_crop`` (resize to ``resize_size``, random
            crop); None: the task's default (DML: random-resized crop 224 + flip, evaluated
            with the shorter side at 256 + centre crop 224, the standard DML pipeline;
            classification: resize-crop when ``resize_size`` is set).
        crop_scale: area range of the random-resized training crop (None: (0.08, 1), for
            retrieval (0.25, 1)).
        random_erasing: probability (None: 0.5 for Re-ID, 0 otherwise).
        color_jitter: colour jitter strength for training (0 = off).
        rotation: training random rotation in degrees (0 = off).
        resize_mode: ``square`` or ``shorter`` (keep the aspect ratio) for ``resize_size``.
        augment: False trains on the evaluation transform (no random crop, flip, erasing,
            jitter or rotation; retrieval: a plain resize to ``img_size``): every epoch sees
            the same pixels (overfitting checks, debugging).
        on_error: ``raise`` on a corrupt / missing image (names it) or ``skip`` and count it.
        seed: seed of the sample order and the augmentations.
        dataset_kwargs: extra reader arguments (e.g. ``config`` of a ``synthetic_*`` set,
            ``train_only`` of MSMT17).
    """

    def __init__(self, dataset: str, root: str | None = None,
                 img_size: int | list[int] = 224, resize_size: int | list[int] | None = None,
                 batch_size: int = 32, eval_batch_size: int | None = None,
                 sampler: Sampler = "random", num_instances: int = 4, num_workers: int = 4,
                 val_split: str | None = None, val_fraction: float = 0.1,
                 holdout_seed: int = 0,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None,
                 interpolation: Interpolation | None = None,
                 crop_pct: float | None = None,
                 train_crop: TrainCrop | None = None,
                 crop_scale: tuple[float, float] | None = None,
                 random_erasing: float | None = None, color_jitter: float = 0.0,
                 rotation: float = 0.0, resize_mode: ResizeMode = "square", augment: bool = True,
                 on_error: OnError = "raise", seed: int = 0,
                 dataset_kwargs: dict[str, Any] | None = None):
        super().__init__()
        check_choice("data.sampler", sampler, Sampler)
        check_choice("data.resize_mode", resize_mode, ResizeMode)
        check_choice("data.on_error", on_error, OnError)
        for option, value, kind in (("data.interpolation", interpolation, Interpolation),
                                    ("data.train_crop", train_crop, TrainCrop)):
            if value is not None:
                check_choice(option, value, kind)
        self.save_hyperparameters()
        cls = get_dataset_class(dataset)
        self.task = cls.task
        # the splits depend on the dataset: checked here, before anything is read
        protocol = [s for s in ("test", "holdout", "none") if s not in cls.splits]
        if val_split is not None and val_split not in (*cls.splits, *protocol):
            raise InputError(refusal(f"data.val_split (of {dataset})", val_split,
                                     [*cls.splits, *protocol]))
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        self._train = None
        self._val = None
        self._train_sampler = None
        self._holdout = None

    # ---- datasets ---------------------------------------------------------------------
    def _build(self, split: str, train: bool):
        hp = self.hparams
        if train and not hp.augment:
            # the evaluation transform at a fixed size (retrieval evaluates at the longest
            # side, of varying shape: a plain resize, as `finegrain predict` does)
            task = "reid" if self.task == "retrieval" else self.task
            tf = build_transform(task, False, hp.img_size, hp.resize_size, self.mean,
                                 self.std, resize_mode=hp.resize_mode,
                                 interpolation=hp.interpolation, crop_pct=hp.crop_pct)
        else:
            tf = build_transform(self.task, train, hp.img_size, hp.resize_size,
                                 self.mean, self.std, hp.random_erasing,
                                 hp.color_jitter, hp.rotation if train else 0.0,
                                 hp.resize_mode, interpolation=hp.interpolation,
                                 crop_pct=hp.crop_pct, train_crop=hp.train_crop,
                                 crop_scale=hp.get("crop_scale"))
        return build_dataset(hp.dataset, hp.root, split, transform=tf, on_error=hp.on_error,
                             **(hp.dataset_kwargs or {}))

    @property
    def val_mode(self) -> str:
        """What training evaluates: ``holdout``, ``test``, a split name, or ``none``."""
        split = self.hparams.val_split or "holdout"
        if self.task == "retrieval" and self.hparams.val_split is None:
            return "none"  # retrieval is evaluated by `finegrain retrieval eval`
        return split

    @property
    def selected_on(self) -> str:
        """Which data chooses ``best.ckpt``, in words (printed and saved with results)."""
        mode = self.val_mode
        if mode == "holdout":
            what = {"classification": "images", "dml": "classes",
                    "reid": "identities"}.get(self.task, "images")
            return (f"held-out {100 * self.hparams.val_fraction:g}% of the training {what} "
                    f"(seed {self.hparams.holdout_seed})")
        if mode == "none":
            return "none (last checkpoint)"
        return f"the {mode} split" + (" (the test protocol)" if mode == "test" else "")

    def _split_train(self, ds, part: str):
        """The reader ``ds`` of the training split narrowed to the held-out draw's ``part``
        (``train``: relabelled 0..n-1; ``val``: raw labels)."""
        h = self._holdout
        if h is None:
            h = self._holdout = holdout(self.task, ds.labels, self.hparams.val_fraction,
                                        self.hparams.holdout_seed)
        out = copy.copy(ds)
        rows = h.train if part == "train" else h.val
        if part == "train":
            out.samples = [dataclasses.replace(ds.samples[i], label=h.relabel[ds.samples[i].label])
                           for i in rows]
            if self.task != "classification":
                kept = sorted(h.relabel, key=h.relabel.get)
                out.classes = [ds.classes[c] for c in kept]
        else:
            out.samples = [ds.samples[i] for i in rows]
        return out

    @property
    def train_set(self):
        if self._train is None:
            ds = self._build("train", True)
            self._train = self._split_train(ds, "train") if self.val_mode == "holdout" else ds
        return self._train

    @property
    def num_classes(self) -> int:
        """Training classes / identities (linked to ``model.num_classes``)."""
        return self.train_set.num_classes

    @property
    def val_set(self):
        if self._val is None:
            mode = self.val_mode
            if mode == "none":
                return None
            cls = get_dataset_class(self.hparams.dataset)
            if mode == "holdout":
                if self.task not in ("classification", "dml", "reid"):
                    raise InputError(f"data.val_split holdout: no held-out evaluation for "
                                     f"{self.task} sets; use none")
                self.train_set  # draws the held-out part
                val = self._split_train(self._build("train", False), "val")
                if self.task == "reid":
                    q = self._holdout.query
                    qs, gs = copy.copy(val), copy.copy(val)
                    qs.samples = [s for s, f in zip(val.samples, q) if f]
                    gs.samples = [s for s, f in zip(val.samples, q) if not f]
                    val = QueryGallery(qs, gs)
                self._val = val
            elif mode == "test" and self.task in ("reid", "dml") and "query" in cls.splits:
                self._val = QueryGallery(self._build("query", False),
                                         self._build("gallery", False))
            else:
                self._val = self._build(mode, False)
        return self._val

    def test_set(self):
        """The test protocol's evaluation set (query + gallery where the dataset has them),
        whatever ``val_split`` chose the checkpoint on; None for retrieval sets."""
        if self.task == "retrieval":
            return None
        if self.val_mode == "test":
            return self.val_set
        cls = get_dataset_class(self.hparams.dataset)
        if self.task in ("reid", "dml") and "query" in cls.splits:
            return QueryGallery(self._build("query", False), self._build("gallery", False))
        return self._build("test", False)

    def eval_dataloader(self, ds) -> DataLoader:
        """An evaluation loader over ``ds``, sharded across DDP ranks without padding."""
        rank, world = self._rank()
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          sampler=ShardSampler(len(ds), rank, world),
                          num_workers=self.hparams.num_workers, collate_fn=_collate,
                          generator=torch.Generator().manual_seed(0))

    def meta(self) -> dict[str, Any]:
        """The data fields of the checkpoint's record (:class:`finegrain.meta.ModelMeta`, set by
        ``FinegrainModule.set_data_meta``)."""
        hp = self.hparams
        return {"dataset": hp.dataset, "dataset_kwargs": dict(hp.dataset_kwargs or {}),
                "task": self.task, "class_names": list(self.train_set.classes),
                "img_size": hp.img_size, "resize_size": hp.resize_size,
                "resize_mode": hp.resize_mode, "mean": list(self.mean),
                "std": list(self.std), "interpolation": hp.interpolation or "bilinear",
                "crop_pct": hp.crop_pct, "selected_on": self.selected_on}

    # ---- loaders ----------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _batch_sampler(self):
        hp = self.hparams
        rank, world = self._rank()
        if hp.sampler == "pk":
            bs = PKBatchSampler(self.train_set.labels, hp.batch_size, hp.num_instances,
                                hp.seed, rank, world)
        elif hp.sampler == "random":
            bs = RandomBatchSampler(len(self.train_set), hp.batch_size, hp.seed, rank, world)
        else:
            check_choice("data.sampler", hp.sampler, Sampler)
        return bs

    @property
    def train_batch_sampler(self):
        """The resumable batch sampler of training on this rank, one for the whole fit (built
        before any DataLoader, so a resume can set its position first)."""
        rank, world = self._rank()
        bs = self._train_sampler
        if bs is None or (bs.rank, bs.world_size) != (rank, world):
            self._train_sampler = bs = self._batch_sampler()
        return bs

    def steps_per_epoch(self) -> int:
        """Training batches per epoch on this rank, without building a DataLoader."""
        return len(self.train_batch_sampler)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            SeededDataset(self.train_set), batch_sampler=self.train_batch_sampler,
            num_workers=hp.num_workers, collate_fn=_collate,
            persistent_workers=hp.num_workers > 0,
            generator=torch.Generator().manual_seed(hp.seed))

    def val_dataloader(self) -> DataLoader | list:
        ds = self.val_set
        return [] if ds is None else self.eval_dataloader(ds)
