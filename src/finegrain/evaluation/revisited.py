"""Revisited Oxford / Paris landmark-retrieval metrics (Radenovic et al., CVPR 2018).

Exactly the conventions of the official ``revisitop`` evaluation (``python/evaluate.py``):

- ``ranks`` is ``(n_db, n_q)``: column ``i`` lists database indices, best first (e.g.
  ``np.argsort(-scores, axis=0)`` for ``scores`` of shape (n_db, n_q)); it may be truncated to
  the top rows, positives below the cut then count as not retrieved;
- junk images are removed from the ranking, then AP is the trapezoid rule
  ``sum_j (P0 + P1) / 2 / n_pos`` with ``P0 = j / r`` (1 when r = 0), ``P1 = (j + 1) / (r + 1)``,
  j and r 0-based (j-th positive at clean rank r), n_pos = ``len(ok)``;
- mP@k uses ``k' = min(k, rank of the last retrieved positive)`` (1-based);
- queries without positives get ``nan`` and are left out of the means.

Settings (:func:`evaluate`): Easy ok = easy, junk = junk + hard; Medium ok = easy + hard,
junk = junk; Hard ok = hard, junk = junk + easy.

Each query costs a few vectorised passes over its column (no Python loop over the ranking), so
ROxford5k + 1M distractors (1,001,001 x 70 ranks) takes about a second.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["compute_map", "evaluate", "load_gnd", "SETTINGS"]

SETTINGS = ("easy", "medium", "hard")

# Globals a ground-truth pickle may reference: numpy arrays / scalars, nothing executable.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "slice"),
}


class _GndUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs builtins and numpy arrays."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._path}: refuses to load global {module}.{name}; a revisitop ground-truth "
            "pickle holds only dicts, lists and numpy arrays. Use the official gnd_*.pkl file."
        )


def load_gnd(path: str | Path) -> dict[str, Any]:
    """Read a revisitop ground-truth pickle (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``) safely.

    Only builtins and numpy arrays are reconstructed, so a tampered file cannot run code.

    Args:
        path: the ``.pkl`` file.

    Returns:
        ``{"imlist": [str] (n_db,), "qimlist": [str] (n_q,), "gnd": [dict] (n_q,)}``; each gnd
        dict has ``bbx`` [x1, y1, x2, y2] and ``easy``, ``hard``, ``junk`` 0-based indices into
        ``imlist``.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a revisitop ground truth.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth file not found (expected e.g. gnd_roxford5k.pkl)")
    with path.open("rb") as f:
        try:
            cfg = _GndUnpickler(f, path).load()
        except pickle.UnpicklingError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a readable pickle ({exc})") from exc
    if not isinstance(cfg, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        keys = sorted(cfg) if isinstance(cfg, Mapping) else type(cfg).__name__
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd, got {keys}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    return dict(cfg)


def _index_array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).reshape(-1)


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision at k, identical to revisitop's ``compute_map``.

    Args:
        ranks: (n_db, n_q) integer array; column i holds database indices sorted for query i
            (best first). A truncated ranking (fewer rows than the database) is allowed.
        gnd: n_q dicts with ``ok`` (positive indices) and optionally ``junk`` (ignored indices).
        kappas: the k of mP@k.

    Returns:
        ``(mAP, aps, mpr, prs)``: mAP (float), aps (n_q,) per-query AP, mpr (len(kappas),) mean
        precision at each k, prs (n_q, len(kappas)). Queries without positives have ``nan`` in
        aps and prs and are left out of mAP and mpr. All values are fractions in [0, 1].

    Raises:
        ValueError: on shape mismatches, or when no query has a positive.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_db, n_q), got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    n_db, nq = ranks.shape
    if len(gnd) != nq:
        raise ValueError(
            f"ranks has {nq} query columns but gnd has {len(gnd)} entries; ranks must be "
            "(n_db, n_q), e.g. np.argsort(-scores, axis=0) for scores of shape (n_db, n_q)"
        )
    kappas = np.asarray(kappas, dtype=np.int64).reshape(-1)
    if (kappas < 1).any():
        raise ValueError(f"kappas must be >= 1, got {kappas.tolist()}")
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    size = int(ranks.max()) + 1 if ranks.size else 0
    for q in gnd:
        for key in ("ok", "junk"):
            if key in q and len(q[key]):
                size = max(size, int(np.max(q[key])) + 1)

    if ranks.size and int(ranks.min()) < 0:
        raise ValueError("ranks holds negative indices; expected 0-based database indices")
    label = np.zeros(size, dtype=np.uint8)  # bit 0: positive, bit 1: junk
    for i in range(nq):
        ok = _index_array(gnd[i]["ok"])
        if ok.size == 0:  # no positive images: excluded from the averages
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        junk = _index_array(gnd[i]["junk"]) if "junk" in gnd[i] else np.empty(0, dtype=np.int64)
        label[ok] |= 1
        label[junk] |= 2
        column = label[ranks[:, i]]  # (n_db,) labels in ranked order
        label[ok] = 0
        label[junk] = 0
        pos = np.flatnonzero(column & 1)  # sorted 0-based positions of positives
        junk_pos = np.flatnonzero(column & 2)

        pos = pos - np.searchsorted(junk_pos, pos, side="left")  # junk ranked before each
        j = np.arange(pos.size, dtype=np.float64)
        safe = np.maximum(pos, 1)
        precision_0 = np.where(pos == 0, 1.0, j / safe)
        precision_1 = (j + 1) / (pos + 1)
        aps[i] = float(((precision_0 + precision_1) / 2.0 / ok.size).sum())

        if pos.size:
            pos1 = pos + 1  # 1-based
            kq = np.minimum(pos1.max(), kappas)  # (K,)
            prs[i] = np.searchsorted(pos1, kq, side="right") / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive image: mAP is undefined (check the gnd 'ok' lists)")
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def _setting(gnd_raw: Sequence[Mapping[str, Any]], setting: str) -> list[dict[str, np.ndarray]]:
    """ok / junk lists of one protocol setting from the raw easy / hard / junk lists."""
    out = []
    for g in gnd_raw:
        easy, hard, junk = (_index_array(g[k]) for k in ("easy", "hard", "junk"))
        if setting == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif setting == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Easy / Medium / Hard mAP and mP@k of a ranking on ROxford5k / RParis6k (+1M).

    Args:
        ranks: (n_db, n_q) database indices sorted per query column (see :func:`compute_map`).
            With +1M distractors, their indices follow the database's (gnd stays valid).
        gnd_raw: the ``gnd`` list of the ground-truth file (dicts with ``easy``, ``hard``,
            ``junk``), or the whole dict returned by :func:`load_gnd`.
        kappas: the k of mP@k.

    Returns:
        ``{"easy" | "medium" | "hard": {"mAP": float, "mP@1": float, "mP@5": float,
        "mP@10": float}}``, fractions in [0, 1].
    """
    if isinstance(gnd_raw, Mapping):
        if "gnd" not in gnd_raw:
            raise ValueError("gnd_raw must be the gnd list or the dict from load_gnd (with a 'gnd' key)")
        gnd_raw = gnd_raw["gnd"]
    for i, g in enumerate(gnd_raw):
        missing = {"easy", "hard", "junk"} - set(g)
        if missing:
            raise ValueError(f"gnd entry {i} lacks {sorted(missing)}; expected the raw revisitop gnd dicts")
    out: dict[str, dict[str, float]] = {}
    for setting in SETTINGS:
        m_ap, _, mpr, _ = compute_map(ranks, _setting(gnd_raw, setting), kappas)
        out[setting] = {"mAP": m_ap, **{f"mP@{int(k)}": float(p) for k, p in zip(kappas, mpr)}}
    return out
