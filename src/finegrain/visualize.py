"""Pictures people would rather see than read: attention overlays, sampled images, curves."""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
import torch

from .models.explain import AttentionMap

__all__ = ["denormalize", "unit_scale", "save_explain", "save_visrank", "plot_curves",
           "plot_paired_differences"]


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensor -> (B, H, W, 3) float array in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _upsample(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    m = m.detach().float().cpu()[None, None]
    mode = "nearest" if m.unique().numel() <= 2 else "bilinear"
    kw = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(m, size=hw, mode=mode, **kw)[0, 0].numpy()


def unit_scale(m: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of (B, h, w) to [0, 1] (a constant map becomes 0): how every
    attention map is drawn."""
    m = m.detach().float()
    lo = m.flatten(1).amin(1)[:, None, None]
    hi = m.flatten(1).amax(1)[:, None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def save_explain(images: torch.Tensor, maps: Sequence[AttentionMap], path: str,
                 mean: Sequence[float], std: Sequence[float],
                 titles: Sequence[str] | None = None, pair_images: torch.Tensor | None = None,
                 captions: Sequence[str] | None = None, suptitle: str | None = None) -> str:
    """Grid: one row per image; the input (and ``pair_images``' image), then every map of
    ``model.explain`` (:class:`~finegrain.models.explain.AttentionMap`): a heat map min-max
    scaled per image to [0, 1] (one colour bar) over the image it belongs to (``image="pair"``:
    ``pair_images``), or a picture drawn as is. ``captions``: one line under each input's
    title (the predicted class and its probability); ``suptitle``: a line above the grid (for
    pairs, their similarity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(m.image == "pair" for m in maps) and pair_images is None:
        raise ValueError("a map belongs to the pair image: pass pair_images")
    imgs = denormalize(images, mean, std)
    pimgs = denormalize(pair_images, mean, std) if pair_images is not None else None
    B, cols = len(imgs), 1 + len(maps) + (pimgs is not None)
    fig, axes = plt.subplots(B, cols, figsize=(2.4 * cols + 0.6, 2.6 * B + 0.3 * bool(suptitle)),
                             squeeze=False)
    scaled = [None if m.is_picture else unit_scale(m.map) for m in maps]
    heat = None
    for b in range(B):
        ax = axes[b, 0]
        ax.imshow(imgs[b])
        title = titles[b] if titles else "input"
        if captions:
            title += "\n" + captions[b]
        ax.set_title(title, fontsize=8)
        c = 1
        if pimgs is not None:
            axes[b, c].imshow(pimgs[b])
            axes[b, c].set_title("pair image", fontsize=8)
            c += 1
        for m, v in zip(maps, scaled):
            ax = axes[b, c]
            if v is None:
                ax.imshow(denormalize(m.map[b][None], mean, std)[0])
            else:
                base = pimgs[b] if m.image == "pair" else imgs[b]
                ax.imshow(base)
                heat = ax.imshow(_upsample(v[b], base.shape[:2]), cmap="jet", alpha=0.5, vmin=0,
                                 vmax=1)
            ax.set_title(m.name + (" (pair)" if m.image == "pair" else ""), fontsize=8)
            c += 1
    for ax in axes.flat:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    if heat is not None:  # one bar for every heat map: they share the 0-1 scale
        fig.subplots_adjust(right=0.9)
        cax = fig.add_axes([0.92, 0.15, 0.015, 0.7])
        fig.colorbar(heat, cax=cax).set_label("attention (0-1)", fontsize=7)
        cax.tick_params(labelsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_visrank(dist: np.ndarray, q_paths: Sequence[str], g_paths: Sequence[str],
                 q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                 g_camids: np.ndarray, path: str, topk: int = 10,
                 num_queries: int = 8) -> str:
    """Ranked gallery of Re-ID queries (torchreid's ``visualize_ranked_results``): one row per
    query, the query then its top-``topk`` gallery images under the protocol (same identity
    and camera removed), framed green for a true match and red otherwise, with the rank and
    the distance. ``num_queries`` queries evenly spaced over the query set.

    Args:
        dist: (Q, G) query-gallery distances (smaller = closer).
        q_paths: (Q,) query image files; g_paths: (G,) gallery image files.
        q_pids, g_pids, q_camids, g_camids: identities and cameras, (Q,) and (G,).
        path: the picture to write.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .data.datasets.base import read_image

    dist = np.asarray(dist)
    Q = dist.shape[0]
    rows = np.unique(np.linspace(0, Q - 1, min(num_queries, Q)).round().astype(int))
    fig, axes = plt.subplots(len(rows), topk + 1, figsize=(1.2 * (topk + 1), 2.3 * len(rows)),
                             squeeze=False)

    def show(ax, p, colour=None, title=""):
        ax.imshow(read_image(p).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
        if colour:
            h, w = ax.get_images()[0].get_array().shape[:2]
            ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, lw=4, ec=colour))

    for r, qi in enumerate(rows):
        show(axes[r, 0], q_paths[qi], "black", f"query\nid {q_pids[qi]} cam {q_camids[qi]}")
        order = np.argsort(dist[qi], kind="stable")
        keep = ~((g_pids[order] == q_pids[qi]) & (g_camids[order] == q_camids[qi]))
        for k, gi in enumerate(order[keep][:topk]):
            ok = g_pids[gi] == q_pids[qi]
            show(axes[r, k + 1], g_paths[gi], "tab:green" if ok else "tab:red",
                 f"#{k + 1} d={dist[qi, gi]:.2f}")
        for k in range(int(keep.sum()), topk):
            axes[r, k + 1].axis("off")
    fig.suptitle(f"top-{topk} ranked gallery (green: same identity, red: other)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(metrics_csv: str, out_png: str, primary: str | None = None) -> str:
    """Training loss and validation metrics over steps, from Lightning's ``metrics.csv``.

    Validation curves carry their metric's name (``mAP``, ``top1``, ``R@1`` ...);
    ``val/score`` (a copy of the metric that picks ``best.ckpt``) is not drawn again, and
    ``primary`` (that metric) is drawn bold and named in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if v not in ("", None) and k not in ("step", "epoch", "val/score") and \
                    (k == "train/loss" or k.startswith("val/")):
                series.setdefault(k, []).append((float(r["step"]), float(v)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for k, pts in series.items():
        ax = a if k.startswith("train") else b
        name = k[4:] if k.startswith("val/") else k
        bold = name == primary
        ax.plot(*zip(*pts), label=name + (" (best.ckpt)" if bold else ""),
                marker="" if ax is a else "o", lw=2.5 if bold else 1.0, zorder=3 if bold else 2)
    a.set_xlabel("step"), a.set_title("training loss"), b.set_xlabel("step")
    b.set_title(f"validation: {primary}" if primary else "validation")
    b.set_ylabel("fraction (1 = 100%)")
    if series:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_paired_differences(rows: list[dict], out_png: str) -> str | None:
    """The demo's paired differences (method - baseline, points) with their 95% intervals,
    one line per comparison and metric; green / red where the interval excludes 0 (method /
    baseline better), grey otherwise. ``rows``: :func:`finegrain.demo.run_demo`'s rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = []
    for r in rows:
        for c in r["comparisons"]:
            for m in r["metrics"]:
                st = c["stats"].get(m)
                if st is not None:
                    items.append((f"{c['label']}  [{m}]", st))
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(items) + 1.2))
    for i, (label, st) in enumerate(reversed(items)):
        d = 100 * st["diff_mean"]
        colour = {"method": "tab:green", "baseline": "tab:red"}.get(st["verdict"], "0.45")
        if st["ci_low"] is not None:
            lo, hi = 100 * st["ci_low"], 100 * st["ci_high"]
            ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=3)
        else:
            ax.plot(d, i, "o", color=colour, mfc="none")
        for s in st.get("per_seed", []):
            ax.plot(100 * (s["method"] - s["baseline"]), i, ".", color=colour, alpha=0.35)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([lab for lab, _ in reversed(items)], fontsize=8)
    n = max(st["n"] for _, st in items)
    ax.set_xlabel(f"method - baseline (points); dots: seeds; bars: 95% t interval, {n} seed(s)")
    ax.set_title("finegrain demo: paired differences", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
