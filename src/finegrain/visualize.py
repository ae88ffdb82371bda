"""Pictures people would rather see than read: attention overlays, sampled images, curves."""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
import torch


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


def save_explain(images: torch.Tensor, outputs: dict[str, torch.Tensor], path: str,
                 mean: Sequence[float], std: Sequence[float],
                 titles: Sequence[str] | None = None, pair_images: torch.Tensor | None = None) -> str:
    """Grid: one row per image; the input, then every map of ``outputs`` as a heat-map overlay
    (maps (B, h, w) in [0, 1]) and every ``*_image`` entry as an image. Maps whose name starts
    with ``pair`` are drawn over ``pair_images``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = denormalize(images, mean, std)
    pimgs = denormalize(pair_images, mean, std) if pair_images is not None else None
    keys = list(outputs)
    B, cols = len(imgs), 1 + len(keys) + (pimgs is not None)
    fig, axes = plt.subplots(B, cols, figsize=(2.4 * cols, 2.4 * B), squeeze=False)
    for b in range(B):
        ax = axes[b, 0]
        ax.imshow(imgs[b])
        ax.set_title(titles[b] if titles else "input", fontsize=8)
        c = 1
        if pimgs is not None:
            axes[b, c].imshow(pimgs[b])
            axes[b, c].set_title("pair image", fontsize=8)
            c += 1
        for k in keys:
            ax = axes[b, c]
            v = outputs[k][b]
            if k.endswith("_image"):
                ax.imshow(denormalize(v[None], mean, std)[0])
            else:
                base = pimgs[b] if (k.startswith("pair") and pimgs is not None) else imgs[b]
                ax.imshow(base)
                ax.imshow(_upsample(v, base.shape[:2]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(k, fontsize=8)
            c += 1
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(metrics_csv: str, out_png: str) -> str:
    """Training loss and validation metrics over steps, from Lightning's ``metrics.csv``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if v not in ("", None) and k not in ("step", "epoch") and \
                    (k == "train/loss" or k.startswith("val/")):
                series.setdefault(k, []).append((float(r["step"]), float(v)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for k, pts in series.items():
        ax = a if k.startswith("train") else b
        ax.plot(*zip(*pts), label=k, marker="" if ax is a else "o")
    a.set_xlabel("step"), a.set_title("training loss"), b.set_xlabel("step")
    b.set_title("validation"), b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
