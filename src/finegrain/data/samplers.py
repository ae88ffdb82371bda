"""Batch samplers that are deterministic, shard across DDP ranks, and resume mid-epoch.

Each sampler yields batches of ``(index, sample_seed)`` pairs. The order is a pure function of
``(seed, epoch)``, the sample seed seeds that sample's augmentation (see
:class:`SeededDataset`), so a run resumed at batch ``b`` of epoch ``e`` sees exactly the
batches and augmentations an uninterrupted run sees: :meth:`state_dict` records
``(epoch, batches consumed)`` and :meth:`load_state_dict` skips them by index, without
decoding a single image.

- :class:`RandomBatchSampler`: shuffled batches (``drop_last``).
- :class:`PKBatchSampler`: P identities x K instances per batch (Re-ID, DML m-per-class);
  identities with fewer than K images are sampled with replacement.
- :class:`ShardSampler`: evaluation; rank r takes ``indices[r::world]``, no padding, so every
  sample is evaluated exactly once under DDP.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError

__all__ = ["RandomBatchSampler", "PKBatchSampler", "ShardSampler", "SeededDataset"]


class _Resumable(Sampler):
    """Shared epoch / skip / shard logic; subclasses implement :meth:`global_batches`."""

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.consumed = 0  # batches of this rank already yielded in ``epoch``
        self._skip = 0
        # Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``: that is us
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch: nothing of it consumed, nothing to skip
            self.consumed = self._skip = 0
        self.epoch = epoch

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self.global_batches(rng)
        n = len(batches) // self.world_size * self.world_size
        return batches[self.rank:n:self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._rank_batches()
        start, self._skip = self._skip, 0
        self.consumed = start
        for b, batch in enumerate(batches[start:], start):
            # one seed per (epoch, batch, slot): independent of rank count and of resume
            base = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + b * self.world_size
            self.consumed = b + 1  # counted when handed out: state_dict() after k batches = k
            yield [(int(i), int((base + self.rank) * 4099 + k) % (2 ** 63))
                   for k, i in enumerate(batch)]

    def __len__(self) -> int:
        return len(self._rank_batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._skip = self.consumed = int(state["consumed"])


class RandomBatchSampler(_Resumable):
    """Shuffled batches of ``batch_size`` per rank (``drop_last``: equal steps on all ranks)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if num_samples < batch_size:
            raise InputError(f"batch_size {batch_size} > {num_samples} training images; "
                             f"lower data.batch_size")
        self.num_samples, self.batch_size = num_samples, batch_size

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        perm = rng.permutation(self.num_samples)
        n = self.num_samples // self.batch_size
        return [perm[i * self.batch_size:(i + 1) * self.batch_size].tolist() for i in range(n)]


class PKBatchSampler(_Resumable):
    """P identities x K instances per batch (``batch_size = P * K``).

    An epoch walks every identity's shuffled images in chunks of K (padding a short identity
    by sampling with replacement, as torchreid's RandomIdentitySampler), then groups chunks of
    P distinct identities into batches. Every epoch has the same number of batches,
    ``floor(chunks / P)`` (a function of the labels only): when fewer than P identities still
    have chunks before that count is reached, the last batches take P distinct identities at
    random, K of their images each. (torchreid's sampler stops there instead, so its epochs
    vary in length; Lightning sizes its validation interval from the first epoch, so a shorter
    epoch would end without validation and a longer one validate mid-epoch.)
    """

    def __init__(self, labels: Sequence[int], batch_size: int, num_instances: int = 4,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if batch_size % num_instances:
            raise InputError(f"batch_size {batch_size} is not a multiple of num_instances "
                             f"{num_instances}")
        self.k, self.p = num_instances, batch_size // num_instances
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            self.by_label[int(y)].append(i)
        if len(self.by_label) < self.p:
            raise InputError(f"{len(self.by_label)} identities < P = {self.p} per batch; "
                             f"lower batch_size or num_instances")
        chunks = sum(max(1, len(idx) // self.k) for idx in self.by_label.values())
        self.num_batches = chunks // self.p

    def _draw(self, rng: np.random.Generator, y: int) -> list[int]:
        idx = np.array(self.by_label[y])
        return rng.choice(idx, self.k, replace=len(idx) < self.k).tolist()

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        chunks: dict[int, list[list[int]]] = {}
        for y, idx in sorted(self.by_label.items()):
            idx = np.array(idx)
            if len(idx) < self.k:
                idx = rng.choice(idx, self.k, replace=True)
            idx = rng.permutation(idx)
            chunks[y] = [idx[i:i + self.k].tolist() for i in range(0, len(idx) - self.k + 1,
                                                                      self.k)]
        batches: list[list[int]] = []
        avail = [y for y in chunks if chunks[y]]
        while len(avail) >= self.p and len(batches) < self.num_batches:
            chosen = rng.choice(avail, self.p, replace=False)
            batch: list[int] = []
            for y in chosen:
                batch += chunks[int(y)].pop()
            batches.append(batch)
            avail = [y for y in chunks if chunks[y]]
        ids = sorted(self.by_label)
        while len(batches) < self.num_batches:  # the identities left are fewer than P
            batches.append([i for y in rng.choice(ids, self.p, replace=False)
                            for i in self._draw(rng, int(y))])
        return batches


class ShardSampler(Sampler):
    """Evaluation indices of one rank: ``range(n)[rank::world]``, no padding, no duplicates."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(num_samples))[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` runs its transform under ``seed``.

    The global torch RNG of the calling process is forked, not consumed: augmentations are
    a function of the sample seed alone, identical in any worker and after a resume.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        return self.dataset[item]
