"""A validation set held out of the training split, so that choosing a checkpoint never looks
at the test split.

The part held out is seeded (``seed``, independent of the training seed, so paired runs of
different seeds see the same split) and task-aware:

- classification: ``fraction`` of each class's images (at least one of a class with two or
  more), labels unchanged;
- DML: ``fraction`` of the classes, whole (the test classes of DML are unseen, and so are
  these); the training classes are relabelled 0..n-1;
- Re-ID: ``fraction`` of the identities, whole; one image of each (in seeded order) is a
  query and the others the gallery, evaluated with the usual removal of same-identity,
  same-camera matches; the training identities are relabelled 0..n-1.

Functions here take labels (and cameras) and return indices: the data module applies them to
two readers of the training split, one with the training and one with the evaluation
transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["Holdout", "holdout"]


@dataclass(frozen=True)
class Holdout:
    """Indices into the training split: ``train`` (kept for training), ``val`` (held out) and
    ``query`` (a bool per ``val`` index: a Re-ID query), with ``relabel`` mapping each kept
    label to its new contiguous label."""

    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    relabel: dict[int, int]


def _draw(items: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    n = len(items)
    k = min(n - 1, max(1, int(round(fraction * n)))) if n > 1 else 0
    return np.sort(rng.permutation(items)[:k])


def holdout(task: str, labels, fraction: float = 0.1, seed: int = 0) -> Holdout:
    """The held-out part of a training split (module docstring).

    Args:
        task: ``classification``, ``dml`` or ``reid``.
        labels: the training split's labels (one per image).
        fraction: share of the images (classification) or of the classes / identities.
        seed: the draw's seed.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"data.val_fraction {fraction}: give a share between 0 and 1 "
                         f"(0.1 holds out 10% of the training split)")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    classes = np.unique(labels)
    if task == "classification":
        val = np.sort(np.concatenate([_draw(idx[labels == c], fraction, rng) for c in classes]))
        train = np.setdiff1d(idx, val)
        return Holdout(train, val, np.zeros(len(val), bool), {int(c): int(c) for c in classes})
    if task not in ("dml", "reid"):
        raise InputError(f"no held-out validation for task {task!r}")
    if len(classes) < 2:
        raise InputError(f"the training split has {len(classes)} class(es): too few to hold "
                         f"some out; set data.val_split none or a split of the dataset")
    held = _draw(classes, fraction, rng)
    is_val = np.isin(labels, held)
    train, val = idx[~is_val], idx[is_val]
    kept = [int(c) for c in classes if c not in set(held.tolist())]
    relabel = {c: i for i, c in enumerate(kept)}
    query = np.zeros(len(val), bool)
    if task == "reid":
        seen: set[int] = set()
        for j in rng.permutation(len(val)):  # one query per identity, in seeded order
            if int(labels[val[j]]) not in seen:
                seen.add(int(labels[val[j]]))
                query[j] = True
    return Holdout(train, val, query, relabel)
