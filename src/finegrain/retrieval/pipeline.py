"""Revisited landmark-retrieval evaluation of a checkpoint, end to end.

``retrieval_eval(ckpt, "roxford5k", root)``:

1. load the model (``finegrain.models.load_model``) and hash the checkpoint;
2. extract query descriptors (cropped to ``bbx``, the crop scaled by its full image's factor,
   cirtorch / DELG) and database descriptors with the retrieval preprocessing (longest side
   ``img_size``, 1024 on Revisited by default; ``scales``; :mod:`.extract`), or read
   descriptor files matched to the ground truth by image name
   (:func:`align_to_ground_truth`);
3. optionally append distractor descriptors (``finegrain embed ... revisitop1m``; checked to
   be of that set, disjoint by name from the ground truth's images and queries, and from the
   same checkpoint and preprocessing) after the database, so ``gnd`` indices
   stay valid; they stay memory-mapped;
4. rank the whole database exactly, a block of rows at a time
   (:func:`finegrain.retrieval.search.blockwise_knn`: a running top-100 plus the exact
   position of every labelled image in the complete ranking, scored by
   :func:`finegrain.evaluation.revisited.evaluate_positions`), optionally with
   alpha-QE and / or k-reciprocal re-ranking of the top ``rerank_k`` of the expanded query
   (:func:`.postprocess.postprocessed_search`, the code path of ``index search``);
5. score Easy / Medium / Hard mAP and mP@1, 5, 10 (``finegrain.evaluation.revisited``);
6. with ``out``: write ``retrieval.json`` (not ``metrics.json``: ``out`` may be a run folder),
   the descriptors (``query`` / ``gallery`` ``.npy`` +
   ``.json``) and ``top10.png``: a few queries (the best / worst by AP, or the first ones)
   with their top-10, framed green (positive), red (negative) or grey (junk) in the chosen
   setting.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch.nn as nn

from ..atomic import write_json
from ..errors import InputError
from ..meta import ModelMeta
from .descriptors import (Descriptors, check_compatible, load_descriptors, save_descriptors)
from .postprocess import PostprocessOptions, postprocessed_search

__all__ = ["retrieval_eval", "ExtractOptions", "PictureOptions", "PostprocessOptions",
           "rank_database", "rank_positions", "align_to_ground_truth", "check_distractors",
           "format_table", "plot_top_k"]

SETTINGS = ("easy", "medium", "hard")


def _setting_lists(g: dict, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, junk)`` database indices of one raw gnd entry in a protocol setting."""
    easy, hard, junk = (np.asarray(g[k], dtype=np.int64).reshape(-1) for k in
                        ("easy", "hard", "junk"))
    if setting == "easy":
        return easy, np.concatenate([junk, hard])
    if setting == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def align_to_ground_truth(d: Descriptors, names: Sequence[str], dataset: str,
                          split: str) -> np.ndarray:
    """Rows of a descriptor file in the ground truth's order (``qimlist`` / ``imlist``).

    Rows are matched by **image name**, never by count: a file in another order is reordered.
    Refused (``ValueError`` naming the file, the first mismatch and the fix): another dataset
    or split in the JSON metadata; query descriptors not cropped to ``bbx`` or with crops not
    scaled by their full image's factor (cirtorch / DELG; files from before that convention);
    an image of the ground truth without a descriptor, or a descriptor of another image.
    """
    meta = d.meta
    fix = (f"extract them with 'finegrain embed CKPT --dataset {dataset} --root ROOT "
           f"--split {split} --out NAME'")
    for key, want in (("dataset", dataset), ("split", split)):
        if meta.get(key) != want:
            raise InputError(f"{d.path}.json has {key} {meta.get(key)!r}, not {want!r}: these "
                             f"are not {dataset} {split} descriptors; {fix}")
    pre = meta.get("preprocessing", {})
    if pre.get("resize") == "fixed":
        raise InputError(f"{d.path}.json was embedded by a model that takes "
                         f"{pre.get('img_size')} images only, each image squeezed to it; the "
                         f"Revisited protocol keeps the aspect ratio (longest side 1024): use a "
                         f"model that takes any size (a CNN, or a ViT with dynamic_img_size)")
    if split == "query":
        if not pre.get("crop_query_bbx"):
            raise InputError(f"{d.path}.json: the queries were not cropped to their bbx "
                             f"(preprocessing.crop_query_bbx), which the Revisited protocol "
                             f"requires; {fix}")
        if pre.get("crop_scale") != "full_image":
            raise InputError(f"{d.path}.json: the query crops were not scaled by their full "
                             f"image's factor (preprocessing.crop_scale "
                             f"{pre.get('crop_scale')!r}, cirtorch / DELG convention: "
                             f"'full_image'); {fix}")
    row = {n: r for r, n in enumerate(d.names)}
    missing = next((n for n in names if n not in row), None)
    if missing is not None:
        raise InputError(f"{d.path}: {dataset} {split} image {missing!r} has no descriptor "
                         f"({len(d)} descriptors for {len(names)} images); {fix}")
    if len(d) != len(names):
        wanted = set(names)
        extra = next(n for n in d.names if n not in wanted)
        raise InputError(f"{d.path}: descriptor of {extra!r}, which is not a {dataset} "
                         f"{split} image ({len(d)} descriptors for {len(names)} images); {fix}")
    order = np.fromiter((row[n] for n in names), dtype=np.int64, count=len(names))
    if np.array_equal(order, np.arange(len(names))):
        return np.asarray(d.vectors)
    return np.asarray(d.vectors[order])  # a copy in ground-truth order


#: The +1M distractor set (Radenovic et al. 2018): its descriptor files say this dataset / split.
DISTRACTOR_SET = ("revisitop1m", "gallery")


def check_distractors(d: Descriptors, dataset: str, imlist: Sequence[str],
                      qimlist: Sequence[str]) -> None:
    """Refuse (``InputError`` naming the file and the fix) a distractor descriptor file that
    is not of the revisitop1m set (its JSON's ``dataset`` / ``split``), or that holds an image
    of the ground truth's database (``imlist``) or queries (``qimlist``): appended after the
    database, such a row would be a second, unlabelled copy of a positive and push the real
    one down (the gallery file given as distractors halves Medium mAP)."""
    want_ds, want_split = DISTRACTOR_SET
    fix = (f"pass descriptors of the R1M set: 'finegrain embed CKPT --dataset {want_ds} "
           f"--root R1M_ROOT --split {want_split} --out NAME'")
    got = (d.meta.get("dataset"), d.meta.get("split"))
    if got != DISTRACTOR_SET:
        raise InputError(f"--distractors {d.path}: its JSON says dataset {got[0]!r}, split "
                         f"{got[1]!r}, not the {want_ds} {want_split} distractor set; {fix}")
    truth = set(imlist) | set(qimlist)
    shared = next((n for n in d.names if n in truth), None)
    if shared is not None:
        count = sum(n in truth for n in d.names)
        raise InputError(f"--distractors {d.path}: {count} of its names are {dataset} images "
                         f"(first: {shared!r}); distractors must be disjoint from the ground "
                         f"truth's database and queries; {fix}")


def rank_positions(queries: np.ndarray, databases: Sequence[np.ndarray],
                   targets: Sequence[np.ndarray] | None, k: int = 100,
                   post: PostprocessOptions | None = None,
                   block_size: int = 32768) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Top of the ranking and exact ranked positions of chosen images, in bounded memory.

    The databases (gallery, then +1M distractors, rows numbered one after the other) are
    scored a block of rows at a time (:func:`.search.blockwise_knn`), never concatenated or
    copied, so memory-mapped descriptor files stay on disk. Search, alpha-QE and re-ranking
    are :func:`.postprocess.postprocessed_search` (the code path of ``finegrain index
    search``); re-ranking moves only images of the top ``rerank_k``, whose positions are
    updated.

    Args:
        queries: (nq, D) L2-normalised descriptors.
        databases: (n_j, D) L2-normalised descriptor arrays (may be memory-mapped).
        targets: per query, distinct database rows whose position in the complete ranking is
            wanted (Revisited: its easy, hard and junk images), or None.
        k: length of the returned top of the ranking (at least ``rerank_k`` is searched).
        post: alpha-QE and re-ranking (``None``: neither).
        block_size: database rows scored at a time (results do not depend on it).

    Returns:
        ``(top (nq, k) int64 database rows best first, positions)``: ``positions[i]``
        (aligned with ``targets[i]``) are 0-based positions in query i's complete ranking.
    """
    from .search import blockwise_knn, database_rows

    post = post or PostprocessOptions()
    parts = list(databases)
    n = sum(len(p) for p in parts)
    k_all = min(post.depth(k), n)
    last: dict[str, Any] = {"calls": 0}

    def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        final = last["calls"] == int(post.aqe)  # the alpha-QE expansion search comes first
        last["calls"] += 1
        scores, ids, pos = blockwise_knn(q, parts, kk, targets if final else None, block_size)
        last["positions"] = pos
        return scores, ids

    _, ids = postprocessed_search(np.asarray(queries, dtype=np.float32), search,
                                  lambda i: database_rows(parts, i), k_all, post)
    positions = last["positions"] if targets is not None else None
    if post.rerank and positions is not None:  # the shortlist was re-ordered: read positions
        head = min(post.rerank_k, n)
        for i, (t, pos) in enumerate(zip(targets, positions)):
            moved = np.flatnonzero(pos < head)
            if moved.size:
                pos[moved] = np.argmax(ids[i, :head][None, :] == np.asarray(t)[moved, None],
                                       axis=1)
    return ids[:, :k], positions


def rank_database(queries: np.ndarray, database: np.ndarray | Sequence[np.ndarray],
                  post: PostprocessOptions | None = None,
                  block_size: int = 32768) -> np.ndarray:
    """Complete ranking of the database for every query, in the revisitop layout.

    The search, alpha-QE and re-ranking are :func:`.postprocess.postprocessed_search`, the
    code path of ``finegrain index search`` (re-ranking uses the expanded query). The
    ranking is (n, nq): for +1M distractors use :func:`rank_positions`, which
    ``retrieval_eval`` uses (same order, bounded memory).

    Args:
        queries: (nq, D) L2-normalised descriptors.
        database: (n, D) L2-normalised descriptors (may be memory-mapped), or a list of such
            arrays searched as one.
        post: alpha-QE and / or k-reciprocal re-ranking of each query's first ``rerank_k``
            results (the rest keeps the first ranking's order); ``None``: neither.
        block_size: database rows scored at a time.

    Returns:
        (n, nq) int64: column i lists database indices for query i, best first.
    """
    parts = [database] if isinstance(database, np.ndarray) else list(database)
    n = sum(len(p) for p in parts)
    ids, _ = rank_positions(queries, parts, None, n, post, block_size=block_size)
    return np.ascontiguousarray(ids.T)


def format_table(metrics: dict[str, dict[str, float]], title: str = "") -> str:
    """The Easy / Medium / Hard table in percentages."""
    keys = list(next(iter(metrics.values())))
    lines = [title] if title else []
    lines.append(f"{'setting':<8}" + "".join(f"{k:>9}" for k in keys))
    for s in SETTINGS:
        if s in metrics:
            lines.append(f"{s:<8}" + "".join(f"{100 * metrics[s][k]:>9.2f}" for k in keys))
    return "\n".join(lines)


def plot_top_k(path: str, query_ds, gallery_ds, ranks: np.ndarray, gnd: Sequence[dict],
               query_idx: Sequence[int], aps: np.ndarray, setting: str = "medium",
               k: int = 10, n_db: int | None = None) -> str:
    """Draw each selected query with its top-``k`` (green positive, red negative, grey junk).

    Database indices ``>= n_db`` are distractors without an image at hand: drawn as a red
    placeholder. Returns ``path``.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_db = len(gallery_ds) if n_db is None else n_db
    rows = len(query_idx)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.8 * rows), squeeze=False)
    for r, qi in enumerate(query_idx):
        ok, junk = _setting_lists(gnd[qi], setting)
        ax = axes[r, 0]
        ax.imshow(query_ds.load_image(qi).permute(1, 2, 0).numpy())
        ax.set_title(f"query {qi}\nAP {100 * aps[qi]:.1f}", fontsize=7)
        for sp in ax.spines.values():
            sp.set_edgecolor("blue")
            sp.set_linewidth(3)
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= ranks.shape[0]:
                ax.axis("off")
                continue
            j = int(ranks[c, qi])
            colour = "green" if j in ok else ("grey" if j in junk else "red")
            if j < n_db:
                ax.imshow(gallery_ds.load_image(j).permute(1, 2, 0).numpy())
            else:
                ax.imshow(np.full((8, 8, 3), 0.85))
                ax.text(4, 4, "distractor", ha="center", va="center", fontsize=6)
            ax.set_title(f"{c + 1}", fontsize=7)
            for sp in ax.spines.values():
                sp.set_edgecolor(colour)
                sp.set_linewidth(4)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"top-{k} ({setting}): green positive, red negative, grey junk", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _select(aps: np.ndarray, how: str, n: int) -> list[int]:
    valid = np.flatnonzero(~np.isnan(aps))
    if how == "first":
        return valid[:n].tolist()
    order = valid[np.argsort(aps[valid], kind="stable")]
    return (order[::-1] if how == "best" else order)[:n].tolist()


@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`retrieval_eval` extracts descriptors (the flags ``retrieval eval`` shares
    with ``embed``).

    Args:
        scales: extraction scales (``(1.0,)``: DALG's single scale).
        img_size: longest side S (None: 1024 on Revisited Oxford / Paris, the protocol's
            size; else the checkpoint's training size ``meta["img_size"]``; 512 when
            unknown). Query crops are scaled by their full image's factor (cirtorch / DELG).
        batch_size: images per forward among images of identical size.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        num_workers: decode workers.
        amp: bfloat16 autocast (GPU).
        progress: show a progress bar.
        upscale: also enlarge images smaller than S (default: never, as cirtorch / DELG).
    """

    scales: Sequence[float] = (1.0,)
    img_size: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    num_workers: int = 0
    amp: bool = False
    progress: bool = True
    upscale: bool = False


@dataclass(frozen=True)
class PictureOptions:
    """Which queries :func:`retrieval_eval` draws with their top-10 in ``top10.png``.

    Args:
        which: ``"best"`` / ``"worst"`` by AP in ``setting``, the ``"first"`` ones, or
            ``"none"`` (no picture).
        queries: how many queries to draw.
        setting: setting of the colours and of the AP used to pick queries.
    """

    which: Literal["best", "worst", "first", "none"] = "worst"
    queries: int = 4
    setting: str = "medium"


def retrieval_eval(ckpt: str | nn.Module | None, dataset: str, root: str | None,
                   distractors: str | None = None, out: str | None = None,
                   extract: ExtractOptions | None = None,
                   post: PostprocessOptions | None = None,
                   picture: PictureOptions | None = None,
                   query_descriptors: str | None = None, gallery_descriptors: str | None = None,
                   meta: ModelMeta | dict | None = None,
                   block_size: int = 32768) -> dict[str, dict[str, float]]:
    """Evaluate a checkpoint on a Revisited dataset (see the module docstring).

    Args:
        ckpt: finegrain checkpoint path, an in-memory model (``meta`` may give its mean /
            std), or ``None`` when both descriptor files are given.
        dataset: ``roxford5k``, ``rparis6k`` or ``synthetic_landmarks``.
        root: dataset root (for ``synthetic_landmarks``: its cache folder, ``None`` default).
        distractors: ``NAME`` of R1M distractor descriptors (same checkpoint, preprocessing;
            dataset ``revisitop1m``, names disjoint from the ground truth's:
            :func:`check_distractors`).
        out: folder for ``retrieval.json``, descriptors and ``top10.png`` (None: nothing written).
        extract: extraction options (``None``: the defaults of :class:`ExtractOptions`).
        post: alpha-QE and k-reciprocal re-ranking of the top ``rerank_k`` (``None``:
            neither); written to ``retrieval.json`` as used.
        picture: the queries drawn in ``top10.png`` (``None``: the worst 4 in Medium).
        query_descriptors, gallery_descriptors: ``NAME`` of descriptor files to use instead of
            extracting (both, from ``finegrain embed``).
        meta: the model's record when ``ckpt`` is a model (:class:`~finegrain.meta.ModelMeta`
            or its fields: ``mean``, ``std``, ``model_name``); None: the model's own.
        block_size: database rows scored at a time (memory, not results; see
            :func:`rank_positions`).

    Returns:
        ``{"easy" | "medium" | "hard": {"mAP", "mP@1", "mP@5", "mP@10"}}`` (fractions).
    """
    from ..data import build_dataset
    from ..evaluation.revisited import evaluate_positions, query_aps
    from ..loading import in_memory, open_model
    from .extract import embed_dataset, model_name_of

    ex, post, pic = extract or ExtractOptions(), post or PostprocessOptions(), \
        picture or PictureOptions()
    t0 = time.perf_counter()
    qds = build_dataset(dataset, root, "query")
    gds = build_dataset(dataset, root, "gallery")
    gnd = qds.gnd
    if (query_descriptors is None) != (gallery_descriptors is None):
        raise InputError("pass both query_descriptors and gallery_descriptors, or neither")
    timing: dict[str, float] = {}
    if query_descriptors is not None:
        qd, gd = load_descriptors(query_descriptors), load_descriptors(gallery_descriptors)
        check_compatible(gd.meta, qd.meta, f"gallery {gd.path}", f"queries {qd.path}")
        qv = align_to_ground_truth(qd, qds.qimlist, dataset, "query")
        gv = align_to_ground_truth(gd, gds.imlist, dataset, "gallery")
        sig = gd.meta
    else:
        if ckpt is None:
            raise InputError("retrieval_eval needs a checkpoint (or both descriptor files)")
        loaded = in_memory(ckpt.to(ex.device).eval(), meta) if isinstance(ckpt, nn.Module) \
            else open_model(ckpt, device=ex.device)
        model, meta, ck_hash = loaded.model, loaded.meta, loaded.checkpoint_hash
        model_name = model_name_of(model, meta)
        opts = dict(batch_size=ex.batch_size, device=ex.device, num_workers=ex.num_workers,
                    amp=ex.amp, progress=ex.progress, upscale=ex.upscale)
        stats_q: dict = {}
        stats_g: dict = {}
        qv, qnames, qlabels, pre_q, _ = embed_dataset(model, dataset, root, "query",
                                                      ex.img_size, ex.scales, meta=meta,
                                                      stats=stats_q, **opts)
        gv, gnames, glabels, pre_g, _ = embed_dataset(model, dataset, root, "gallery",
                                                      ex.img_size, ex.scales, meta=meta,
                                                      stats=stats_g, **opts)
        timing.update(query_images_per_s=stats_q["images_per_s"],
                      gallery_images_per_s=stats_g["images_per_s"])
        sig = {"model_name": model_name, "checkpoint_hash": ck_hash,
               "dim": int(gv.shape[1]), "preprocessing": pre_g}
        if out is not None:
            common = dict(model_name=model_name, checkpoint_hash=ck_hash,
                          dataset=dataset, checkpoint=ckpt if isinstance(ckpt, str) else None)
            save_descriptors(os.path.join(out, "query"), qv, qnames, labels=qlabels,
                             preprocessing=pre_q, split="query", **common)
            save_descriptors(os.path.join(out, "gallery"), gv, gnames, labels=glabels,
                             preprocessing=pre_g, split="gallery", **common)
    databases = [gv]
    n_distractors = 0
    if distractors is not None:
        dd: Descriptors = load_descriptors(distractors)
        check_distractors(dd, dataset, gds.imlist, qds.qimlist)
        check_compatible(sig, dd.meta, f"the {dataset} descriptors", f"distractors {dd.path}")
        databases.append(dd.vectors)  # memory-mapped, scored in blocks: never loaded whole
        n_distractors = len(dd)
    t1 = time.perf_counter()
    labelled = [np.unique(np.concatenate(_setting_lists(g, "medium"))) for g in gnd]
    top, positions = rank_positions(qv, databases, labelled, k=100, post=post,
                                    block_size=block_size)
    ranked = list(zip(labelled, positions))
    ranks = np.ascontiguousarray(top.T)  # (100, nq): the top of the ranking, for pictures
    timing["search_s"] = time.perf_counter() - t1
    metrics = evaluate_positions(ranked, gnd)
    timing["total_s"] = time.perf_counter() - t0
    if out is not None:
        os.makedirs(out, exist_ok=True)
        aps = query_aps(ranked, gnd, pic.setting)
        report: dict[str, Any] = {
            "dataset": dataset, "root": root, "metrics": metrics,
            "model_name": sig.get("model_name"), "checkpoint_hash": sig.get("checkpoint_hash"),
            "preprocessing": sig.get("preprocessing"), "num_queries": len(qv),
            "num_database": len(gv), "num_distractors": n_distractors,
            **post.report(),  # "aqe", "rerank": the parameters as used
            f"ap_{pic.setting}": [None if np.isnan(a) else float(a) for a in aps],
            "timing": timing}
        if pic.which != "none":
            chosen = _select(aps, pic.which, pic.queries)
            report["picture"] = plot_top_k(os.path.join(out, "top10.png"), qds, gds, ranks, gnd,
                                           chosen, aps, pic.setting, 10, len(gv))
            report["picture_queries"] = chosen
        write_json(os.path.join(out, "retrieval.json"), report)
    return metrics
