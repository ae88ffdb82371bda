"""The one LightningDataModule: a registered dataset, its task's transforms and samplers.

Training batches come from a resumable batch sampler (``finegrain.data.samplers``,
:attr:`FinegrainDataModule.train_batch_sampler`); :class:`finegrain.engine.resume.ExactResume`
gives it the position of a mid-epoch checkpoint, and a resumed run skips exactly the batches
trained. Evaluation shards samples across DDP ranks without padding (the module gathers them
back in dataset order).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.registry import build_dataset, get_dataset_class
from ..data.samplers import PKBatchSampler, RandomBatchSampler, SeededDataset, ShardSampler
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from ..errors import InputError


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
        val_split: split evaluated during training (default: ``test`` for classification and
            DML, query + gallery for Re-ID; ``none`` turns validation off).
        mean: normalisation mean.
        std: normalisation std.
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
                 sampler: str = "random", num_instances: int = 4, num_workers: int = 4,
                 val_split: str | None = None,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD,
                 random_erasing: float | None = None, color_jitter: float = 0.0,
                 rotation: float = 0.0, resize_mode: str = "square", augment: bool = True,
                 on_error: str = "raise", seed: int = 0,
                 dataset_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.task = get_dataset_class(dataset).task
        self._train = None
        self._val = None
        self._train_sampler = None

    # ---- datasets ---------------------------------------------------------------------
    def _build(self, split: str, train: bool):
        hp = self.hparams
        if train and not hp.augment:
            # the evaluation transform at a fixed size (retrieval evaluates at the longest
            # side, of varying shape: a plain resize, as `finegrain predict` does)
            task = "reid" if self.task == "retrieval" else self.task
            tf = build_transform(task, False, hp.img_size, hp.resize_size, tuple(hp.mean),
                                 tuple(hp.std), resize_mode=hp.resize_mode)
        else:
            tf = build_transform(self.task, train, hp.img_size, hp.resize_size,
                                 tuple(hp.mean), tuple(hp.std), hp.random_erasing,
                                 hp.color_jitter, hp.rotation if train else 0.0,
                                 hp.resize_mode)
        return build_dataset(hp.dataset, hp.root, split, transform=tf, on_error=hp.on_error,
                             **(hp.dataset_kwargs or {}))

    @property
    def train_set(self):
        if self._train is None:
            self._train = self._build("train", True)
        return self._train

    @property
    def num_classes(self) -> int:
        """Training classes / identities (linked to ``model.num_classes``)."""
        return self.train_set.num_classes

    @property
    def val_set(self):
        if self._val is None:
            split = self.hparams.val_split
            if split == "none" or (split is None and self.task == "retrieval"):
                return None  # retrieval is evaluated by `finegrain retrieval eval`
            cls = get_dataset_class(self.hparams.dataset)
            if split is None and self.task in ("reid", "dml") and "query" in cls.splits:
                self._val = QueryGallery(self._build("query", False),
                                         self._build("gallery", False))
            else:
                self._val = self._build(split or "test", False)
        return self._val

    def meta(self) -> dict[str, Any]:
        """The data fields of the checkpoint's record (:class:`finegrain.meta.ModelMeta`, set by
        ``FinegrainModule.set_data_meta``)."""
        hp = self.hparams
        return {"dataset": hp.dataset, "dataset_kwargs": dict(hp.dataset_kwargs or {}),
                "task": self.task, "class_names": list(self.train_set.classes),
                "img_size": hp.img_size, "resize_size": hp.resize_size,
                "resize_mode": hp.resize_mode, "mean": list(hp.mean),
                "std": list(hp.std)}

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
            raise InputError(f"data.sampler {hp.sampler!r}: choose random or pk")
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
        if ds is None:
            return []
        rank, world = self._rank()
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          sampler=ShardSampler(len(ds), rank, world),
                          num_workers=self.hparams.num_workers, collate_fn=_collate,
                          generator=torch.Generator().manual_seed(0))
