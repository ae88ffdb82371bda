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

The ranking is read once, in blocks of contiguous rows, keeping only the positions of images
some query labels; all three settings are scored from that single pass, with no Python loop over
the ranking: ROxford5k + 1M distractors (1,001,001 x 70 ranks) takes well under a second.
:func:`evaluate_positions` scores the same from the ranked positions of the labelled images
alone (what ``finegrain.retrieval.search.blockwise_knn`` counts without building the ranking).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["compute_map", "evaluate", "evaluate_positions", "query_aps", "load_gnd",
           "setting_gnd", "SETTINGS", "RestrictedUnpickler"]

SETTINGS = ("easy", "medium", "hard")

# Globals a ground-truth pickle may reference: numpy arrays / scalars and plain builtin
# containers, nothing executable. The one restricted unpickler of finegrain (the dataset reader
# of the Revisited ground truth uses it too).
_SAFE_BUILTINS = frozenset({"list", "dict", "tuple", "set", "frozenset", "int", "float", "str",
                            "bytes", "bytearray", "bool", "complex", "slice", "range"})
_SAFE_NUMPY = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays / scalars and builtin containers, so a
    tampered ground-truth file cannot run code (``latin1``: Python 2 pickles load too)."""

    def __init__(self, file: Any, path: str | Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_NUMPY:
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
        raise FileNotFoundError(
            f"{path}: ground-truth file not found (expected e.g. gnd_roxford5k.pkl)"
        )
    with path.open("rb") as f:
        try:
            cfg = RestrictedUnpickler(f, path).load()
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


_ROWS = 1 << 15  # ranking rows read at a time


def _table(groups: Sequence[Sequence[np.ndarray]], nq: int
           ) -> tuple[int, np.ndarray, np.ndarray]:
    """``(hi, compact, table)``: the largest labelled index, labelled index -> row of
    ``table`` (else -1), and ``table`` (n_labelled, n_q) uint8 with bit g set when the image is
    in group g of that query."""
    labelled = [idx for query_groups in groups for idx in query_groups]
    union = np.unique(np.concatenate(labelled)) if labelled else np.empty(0, dtype=np.int64)
    if union.size and union[0] < 0:
        raise ValueError("ground-truth indices must be >= 0")
    hi = int(union[-1]) if union.size else -1
    compact = np.full(hi + 1, -1, dtype=np.int32)
    compact[union] = np.arange(union.size, dtype=np.int32)
    table = np.zeros((union.size, nq), dtype=np.uint8)
    for q, query_groups in enumerate(groups):
        for g, idx in enumerate(query_groups):
            table[compact[idx], q] |= 1 << g
    return hi, compact, table


def _scan(
    ranks: np.ndarray,
    groups: Sequence[Sequence[np.ndarray]],
    settings: Sequence[tuple[int, int]],
    kappas: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AP and precision at kappas of every query under every setting, in one pass over ranks.

    The ranking is read in blocks of contiguous rows (all queries at once); only positions
    holding an image that some query labels are kept, then each query's handful of labelled
    positions is scored (:func:`_score`).

    Args:
        ranks: (n_db, n_q) ranking.
        groups: per query, index arrays; group g is tagged with bit ``1 << g``.
        settings: (ok_bits, junk_bits) per setting: positives are the union of the groups in
            ok_bits (counted with multiplicity for n_pos, as ``len(ok)`` in revisitop), junk
            the union of those in junk_bits.
        kappas: (K,) the k of mP@k.

    Returns:
        aps (S, n_q) and prs (S, n_q, K), ``nan`` for queries without positives.
    """
    n_db, nq = ranks.shape
    hi, compact, table = _table(groups, nq)
    found_pos, found_q, found_code = [], [], []
    unsigned = np.dtype(f"u{ranks.dtype.itemsize}")  # negative indices wrap to huge values
    for a in range(0, n_db, _ROWS):
        block = np.ascontiguousarray(ranks[a : a + _ROWS]).reshape(-1).view(unsigned)  # row-major
        flat = np.flatnonzero(block <= hi) if hi >= 0 else np.empty(0, dtype=np.int64)
        c = compact[block[flat]]  # distractors (index > hi) never reach this gather
        flat, c = flat[c >= 0], c[c >= 0]
        rows, cols = np.divmod(flat, nq)
        code = table[c, cols]
        hit = code != 0
        found_pos.append(rows[hit] + a)
        found_q.append(cols[hit])
        found_code.append(code[hit])
    return _score(*(np.concatenate(x) for x in (found_pos, found_q, found_code)), groups,
                  settings, kappas)


def _score(
    found_pos: np.ndarray,
    found_q: np.ndarray,
    found_code: np.ndarray,
    groups: Sequence[Sequence[np.ndarray]],
    settings: Sequence[tuple[int, int]],
    kappas: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AP and precisions from the ranked positions (0-based), queries and group bits of the
    labelled images found in the ranking (see :func:`_scan`)."""
    nq = len(groups)
    order = np.lexsort((found_pos, found_q))  # by query, ranked position ascending within
    found_pos, found_code = found_pos[order], found_code[order]
    bounds = np.searchsorted(found_q[order], np.arange(nq + 1))

    aps = np.full((len(settings), nq), np.nan)
    prs = np.full((len(settings), nq, len(kappas)), np.nan)
    for i in range(nq):
        where = found_pos[bounds[i] : bounds[i + 1]]  # ranked positions of labelled images
        codes = found_code[bounds[i] : bounds[i + 1]]
        for s, (ok_bits, junk_bits) in enumerate(settings):
            n_ok = sum(idx.size for g, idx in enumerate(groups[i]) if ok_bits >> g & 1)
            if n_ok == 0:  # no positive images: excluded from the averages
                continue
            pos = where[(codes & ok_bits) != 0]  # sorted 0-based positions
            junk = where[(codes & junk_bits) != 0]
            pos = pos - np.searchsorted(junk, pos, side="left")  # junk ranked before each
            j = np.arange(pos.size, dtype=np.float64)
            precision_0 = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
            precision_1 = (j + 1) / (pos + 1)
            aps[s, i] = float(((precision_0 + precision_1) / 2.0 / n_ok).sum())
            prs[s, i] = 0.0
            if pos.size:
                pos1 = pos + 1  # 1-based
                kq = np.minimum(pos1.max(), kappas)  # (K,)
                prs[s, i] = np.searchsorted(pos1, kq, side="right") / kq
    return aps, prs


def _check_ranks(
    ranks: np.ndarray, nq: int, kappas: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_db, n_q), got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.shape[1] != nq:
        raise ValueError(
            f"ranks has {ranks.shape[1]} query columns but gnd has {nq} entries; ranks must be "
            "(n_db, n_q), e.g. np.argsort(-scores, axis=0) for scores of shape (n_db, n_q)"
        )
    return ranks, _kappas(kappas)


def _kappas(kappas: Sequence[int]) -> np.ndarray:
    k = np.asarray(kappas, dtype=np.int64).reshape(-1)
    if (k < 1).any():
        raise ValueError(f"kappas must be >= 1, got {k.tolist()}")
    return k


def _means(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError(
            "no query has a positive image: mAP is undefined (check the gnd 'ok' lists)"
        )
    return float(aps[valid].mean()), prs[valid].mean(axis=0)


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
        aps and prs and are left out of mAP and mpr. A query none of whose positives is in a
        truncated ranking gets AP 0 and precisions 0. All values are fractions in [0, 1].

    Raises:
        ValueError: on shape mismatches, or when no query has a positive.
    """
    ranks, k = _check_ranks(ranks, len(gnd), kappas)
    groups = [
        (
            _index_array(g["ok"]),
            _index_array(g["junk"]) if "junk" in g else np.empty(0, dtype=np.int64),
        )
        for g in gnd
    ]
    aps, prs = _scan(ranks, groups, [(0b01, 0b10)], k)
    m_ap, mpr = _means(aps[0], prs[0])
    return m_ap, aps[0], mpr, prs[0]


def setting_gnd(gnd_raw: Sequence[Mapping[str, Any]], setting: str) -> list[dict[str, np.ndarray]]:
    """The ``ok`` / ``junk`` lists of one protocol setting, for :func:`compute_map`.

    Args:
        gnd_raw: the raw gnd dicts (``easy``, ``hard``, ``junk``).
        setting: ``"easy"``, ``"medium"`` or ``"hard"``.

    Returns:
        One ``{"ok": (n_ok,) int64, "junk": (n_junk,) int64}`` dict per query.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
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


_BITS = {"easy": (0b001, 0b100 | 0b010), "medium": (0b001 | 0b010, 0b100),
         "hard": (0b010, 0b100 | 0b001)}  # (ok, junk) bits of groups (easy, hard, junk)


def _raw_groups(gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]
                ) -> list[tuple[np.ndarray, ...]]:
    """Per query ``(easy, hard, junk)`` index arrays of the raw gnd list (or load_gnd dict)."""
    if isinstance(gnd_raw, Mapping):
        if "gnd" not in gnd_raw:
            raise ValueError(
                "gnd_raw must be the gnd list or the dict from load_gnd (with a 'gnd' key)"
            )
        gnd_raw = gnd_raw["gnd"]
    for i, g in enumerate(gnd_raw):
        missing = {"easy", "hard", "junk"} - set(g)
        if missing:
            raise ValueError(
                f"gnd entry {i} lacks {sorted(missing)}; expected the raw revisitop gnd dicts"
            )
    return [tuple(_index_array(g[key]) for key in ("easy", "hard", "junk")) for g in gnd_raw]


def _metrics(aps: np.ndarray, prs: np.ndarray, k: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for s, setting in enumerate(SETTINGS):
        m_ap, mpr = _means(aps[s], prs[s])
        out[setting] = {"mAP": m_ap, **{f"mP@{int(kk)}": float(p) for kk, p in zip(k, mpr)}}
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
    groups = _raw_groups(gnd_raw)
    ranks, k = _check_ranks(ranks, len(groups), kappas)
    aps, prs = _scan(ranks, groups, [_BITS[s] for s in SETTINGS], k)
    return _metrics(aps, prs, k)


def _positions_scan(positions: Sequence[tuple[np.ndarray, np.ndarray]],
                    groups: Sequence[Sequence[np.ndarray]], settings: Sequence[tuple[int, int]],
                    kappas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_scan` from each query's (image indices, ranked positions) instead of ranks."""
    nq = len(groups)
    if len(positions) != nq:
        raise ValueError(f"positions has {len(positions)} queries but gnd has {nq} entries")
    hi, compact, table = _table(groups, nq)
    found_pos, found_q, found_code = [], [], []
    for i, (idx, pos) in enumerate(positions):
        idx, pos = _index_array(idx), _index_array(pos)
        if idx.shape != pos.shape:
            raise ValueError(f"query {i}: {idx.size} image indices but {pos.size} positions")
        keep = (idx >= 0) & (idx <= hi)
        c = compact[idx[keep]]
        code = np.where(c >= 0, table[np.maximum(c, 0), i], 0)
        found_pos.append(pos[keep][code != 0])
        found_q.append(np.full(int((code != 0).sum()), i, dtype=np.int64))
        found_code.append(code[code != 0])
    if not nq:
        raise ValueError("no query")
    return _score(*(np.concatenate(x) for x in (found_pos, found_q, found_code)), groups,
                  settings, kappas)


def evaluate_positions(
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """:func:`evaluate` from the ranked positions of the labelled images instead of a ranking.

    What a 1M-image ranking would be read for (the rank of every easy, hard and junk image),
    without the (n_db, n_q) array: ``finegrain.retrieval.search.blockwise_knn`` counts them.

    Args:
        positions: per query ``(indices, positions)``: database indices and their 0-based
            positions in the query's complete ranking; labelled images left out count as not
            retrieved.
        gnd_raw: as :func:`evaluate`.
        kappas: the k of mP@k.

    Returns:
        The same dict as :func:`evaluate` (identical values for the same ranking).
    """
    groups = _raw_groups(gnd_raw)
    k = _kappas(kappas)
    aps, prs = _positions_scan(positions, groups, [_BITS[s] for s in SETTINGS], k)
    return _metrics(aps, prs, k)


def query_aps(
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    setting: str = "medium",
) -> np.ndarray:
    """(n_q,) per-query AP in one setting from ranked positions (see
    :func:`evaluate_positions`); ``nan`` for queries without positives."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    aps, _ = _positions_scan(positions, _raw_groups(gnd_raw), [_BITS[setting]],
                             np.array([1], dtype=np.int64))
    return aps[0]
