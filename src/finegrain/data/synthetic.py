"""Generated fine-grained data, written to disk in the published layouts.

Every class / identity shares one global shape (a bird-like body: ellipse body, round head,
wedge tail) and differs only in **small local parts**: the head mark, the wing bars and the
tail tip (a few pixels each at 96 px). Nuisances are class-independent: pose (rotation,
mirror), scale, position, body colour, background clutter and, for Re-ID, a per-camera colour
cast and background. That is the situation attention methods are for: the global shape says
nothing, the parts say everything.

The generator is deterministic given its seed (numpy ``default_rng`` per image), and writes:

- ``synthetic_fgvc``: a CUB-200-2011 tree (``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt``, ``classes.txt``, ``bounding_boxes.txt``, ``images/<class>/*.jpg``),
  read back by the real ``cub200`` reader;
- ``synthetic_reid``: a Market-1501 tree (``bounding_box_train/``, ``query/``,
  ``bounding_box_test/`` with ``0002_c1s1_000451_03.jpg`` names), read by ``market1501``;
- ``synthetic_dml``: a CUB tree whose classes split in halves, read by ``cub200_dml``.

The cache folder defaults to ``~/.cache/finegrain/synthetic`` (``FINEGRAIN_CACHE`` is not
read: pass ``root``). A finished tree carries a ``.complete`` stamp with its parameters; a
different parameter set is generated into its own sub-folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import InputError
from .datasets.base import ImageDataset
from .registry import build_dataset, register_dataset

__all__ = ["DEFAULT_CACHE", "HEAD_MARKS", "WING_BARS", "TAIL_TIPS", "class_parts", "render",
           "FGVCConfig", "ReIDConfig", "generate_cub", "generate_market", "SyntheticFGVC",
           "SyntheticReID", "SyntheticDML"]

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "finegrain", "synthetic")

# Part vocabulary: each class is one (head mark, wing bars, tail tip) combination.
HEAD_MARKS = ("dot", "ring", "bar", "cross")
WING_BARS = ("one", "two", "three", "slant")
TAIL_TIPS = ("plain", "notch", "spot", "stripe")

_PALETTE = np.array([[200, 60, 50], [60, 140, 200], [80, 170, 80], [210, 180, 60],
                     [150, 90, 180], [230, 130, 40], [90, 90, 90], [170, 120, 90]], np.float32)


def class_parts(num_classes: int, seed: int = 0, offset: int = 0) -> list[tuple[int, int, int]]:
    """Distinct part combinations for ``num_classes`` classes: positions ``[offset, offset +
    num_classes)`` of one seeded permutation of the 64 combinations. Sets with offset 0 nest
    (10 classes are among 24); ``offset=k`` gives classes disjoint from every set of at most
    ``k`` classes with the same seed (the demo's pretraining set)."""
    combos = [(h, w, t) for h in range(len(HEAD_MARKS)) for w in range(len(WING_BARS))
              for t in range(len(TAIL_TIPS))]
    if offset < 0 or offset + num_classes > len(combos):
        raise InputError(f"at most {len(combos)} synthetic classes (asked {num_classes} from "
                         f"position {offset})")
    order = np.random.default_rng(seed).permutation(len(combos))[offset:offset + num_classes]
    return [combos[i] for i in sorted(order)]


def _clutter(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """Background: a colour gradient plus random blobs and lines (class-independent)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base[None, None, :] * (0.7 + 0.3 * (yy / h))[..., None]
    img = img + rng.normal(0, 6, (h, w, 3))
    for _ in range(rng.integers(2, 5)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(h, w) / 6)
        col = rng.uniform(40, 220, 3)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[m] = 0.5 * img[m] + 0.5 * col
    for _ in range(rng.integers(0, 3)):
        a, c = rng.uniform(-1, 1), rng.uniform(0, w)
        m = np.abs(xx - (a * yy + c)) < 1.0
        img[m] = rng.uniform(40, 220, 3)
    return img


def render(parts: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int] = (96, 96),
           cast: np.ndarray | None = None, bg: np.ndarray | None = None,
           vertical: bool = False, body_colour: np.ndarray | None = None
           ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Draw one object with the given parts; returns (H, W, 3) uint8 and its bbox (x1,y1,x2,y2).

    Object frame: body ellipse centred at 0 with semi-axes (1, 0.45); head at u = +1.05;
    tail wedge at u < -1. Parts live in that frame, so pose and scale move them together.
    """
    h, w = size
    base_bg = bg if bg is not None else rng.uniform(60, 200, 3)
    img = _clutter(rng, h, w, base_bg)
    scale = rng.uniform(0.27, 0.32) * min(h, w) if not vertical else rng.uniform(0.42, 0.48) * w
    theta = rng.uniform(-0.35, 0.35) + (np.pi / 2 if vertical else 0.0)
    if rng.random() < 0.5:
        theta = np.pi - theta  # mirrored pose: head left or right (wings stay on top)
        mirror = True
    else:
        mirror = False
    cy = h / 2 + rng.uniform(-0.05, 0.05) * h
    cx = w / 2 + rng.uniform(-0.05, 0.05) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    c, s = np.cos(theta), np.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * s) / scale  # object frame
    v = (-(xx - cx) * s + (yy - cy) * c) / scale
    if mirror:
        v = -v
    body_col = (_PALETTE[rng.integers(len(_PALETTE))] if body_colour is None else body_colour) * \
        rng.uniform(0.8, 1.1)
    # parts contrast with the body whatever its colour: dark on light bodies, light on dark
    lum = float(body_col @ np.array([0.299, 0.587, 0.114]))
    dark = np.array([30.0, 30.0, 45.0]) if lum > 120 else np.array([235.0, 230.0, 200.0])
    body = (u / 1.0) ** 2 + (v / 0.45) ** 2 < 1
    head = (u - 1.05) ** 2 + v ** 2 < 0.3 ** 2
    tail = (u < -0.85) & (u > -1.45) & (np.abs(v) < 0.12 + 0.35 * (-0.85 - u))
    obj = body | head | tail
    img[obj] = body_col
    hm, wb, tt = parts
    # head mark (a few pixels): dot / ring / bar / cross
    r2 = (u - 1.12) ** 2 + (v - 0.02) ** 2
    mark = {0: r2 < 0.13 ** 2,
            1: (r2 < 0.2 ** 2) & (r2 > 0.1 ** 2),
            2: (np.abs(u - 1.12) < 0.07) & (np.abs(v) < 0.22),
            3: ((np.abs(u - 1.12) < 0.06) | (np.abs(v - 0.02) < 0.06)) & (r2 < 0.21 ** 2)}[hm]
    # wing bars on the body's back half
    wing_zone = body & (u > -0.55) & (u < 0.35) & (v > -0.05)
    bars = {0: np.abs(u + 0.1) < 0.09,
            1: (np.abs(u + 0.32) < 0.08) | (np.abs(u + 0.02) < 0.08),
            2: (np.abs(u + 0.42) < 0.065) | (np.abs(u + 0.1) < 0.065) | (np.abs(u - 0.22) < 0.065),
            3: np.abs((u + 0.1) - 0.9 * (v - 0.2)) < 0.09}[wb] & wing_zone
    # tail tip
    tip = tail & (u < -1.2)
    tails = {0: np.zeros_like(tip),
             1: tip & (np.abs(v) < 0.1),
             2: ((u + 1.25) ** 2 + v ** 2 < 0.12 ** 2),
             3: tail & (np.abs(u + 1.1) < 0.07)}[tt]
    for m in (mark, bars, tails):
        img[m & obj if m is not tails else m] = dark
    if cast is not None:
        img = img * cast[None, None, :]
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(obj)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return img, box


def _write_jpeg(path: str, img: np.ndarray) -> None:
    from torchvision.io import write_jpeg
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jpeg(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), path, quality=92)


@dataclass(frozen=True)
class FGVCConfig:
    """Parameters of ``synthetic_fgvc`` / ``synthetic_dml`` (CUB layout)."""

    num_classes: int = 16
    train_per_class: int = 30
    test_per_class: int = 20
    size: int = 96
    seed: int = 0
    class_offset: int = 0  # > 0: classes disjoint from smaller sets (see class_parts)


@dataclass(frozen=True)
class ReIDConfig:
    """Parameters of ``synthetic_reid`` (Market-1501 layout)."""

    num_train_ids: int = 24
    num_test_ids: int = 24
    num_cameras: int = 4
    images_per_camera: int = 3
    height: int = 128
    width: int = 64
    seed: int = 0


def _folder(root: str | None, kind: str, cfg) -> str:
    d = {k: v for k, v in asdict(cfg).items() if not (k == "class_offset" and v == 0)}
    tag = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]  # old tags kept
    return os.path.join(root or DEFAULT_CACHE, f"{kind}-{tag}")


def _done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ".complete"))


def _stamp(folder: str, cfg) -> None:
    with open(os.path.join(folder, ".complete"), "w") as f:
        json.dump(asdict(cfg), f)


def generate_cub(root: str | None = None, cfg: FGVCConfig = FGVCConfig(),
                 kind: str = "fgvc") -> str:
    """Write a CUB-200-2011 tree (cached); returns its folder (``.../CUB_200_2011``)."""
    folder = os.path.join(_folder(root, kind, cfg), "CUB_200_2011")
    if _done(folder):
        return folder
    os.makedirs(folder, exist_ok=True)
    parts = class_parts(cfg.num_classes, cfg.seed, cfg.class_offset)
    images, labels, split, boxes, classes = [], [], [], [], []
    img_id = 0
    for ci, p in enumerate(parts):
        cname = f"{ci + 1:03d}.{HEAD_MARKS[p[0]]}_{WING_BARS[p[1]]}_{TAIL_TIPS[p[2]]}"
        classes.append(f"{ci + 1} {cname}")
        for k in range(cfg.train_per_class + cfg.test_per_class):
            img_id += 1
            rng = np.random.default_rng([cfg.seed, ci, k])
            img, box = render(p, rng, (cfg.size, cfg.size))
            rel = f"{cname}/{cname.split('.', 1)[1]}_{img_id:04d}.jpg"
            _write_jpeg(os.path.join(folder, "images", rel), img)
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {ci + 1}")
            split.append(f"{img_id} {int(k < cfg.train_per_class)}")
            x1, y1, x2, y2 = box
            boxes.append(f"{img_id} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                        ("classes.txt", classes)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    _stamp(folder, cfg)
    return folder


def generate_market(root: str | None = None, cfg: ReIDConfig = ReIDConfig()) -> str:
    """Write a Market-1501 tree (cached); returns its folder (``.../Market-1501-v15.09.15``).

    Identities are part combinations plus a body colour (as clothing) shared by every eighth
    identity, so identities of one colour differ only in their parts;
    each camera has its own background tone and colour cast. Test identities: for each
    camera, the first image goes to ``query/`` and the rest to ``bounding_box_test/``; a
    few distractors (pid 0000) and junk (pid -1) images are added to the gallery.
    """
    folder = os.path.join(_folder(root, "reid", cfg), "Market-1501-v15.09.15")
    if _done(folder):
        return folder
    n_ids = cfg.num_train_ids + cfg.num_test_ids
    combos = class_parts(min(n_ids, 64), cfg.seed)
    cam_rng = np.random.default_rng([cfg.seed, 999])
    casts = cam_rng.uniform(0.8, 1.2, (cfg.num_cameras, 3))
    bgs = cam_rng.uniform(60, 200, (cfg.num_cameras, 3))
    size = (cfg.height, cfg.width)
    for pid in range(1, n_ids + 1):
        train = pid <= cfg.num_train_ids
        parts = combos[(pid - 1) % len(combos)]
        for cam in range(cfg.num_cameras):
            for k in range(cfg.images_per_camera):
                rng = np.random.default_rng([cfg.seed, pid, cam, k])
                img, _ = render(parts, rng, size, cast=casts[cam], bg=bgs[cam], vertical=True,
                                body_colour=_PALETTE[pid % len(_PALETTE)])
                name = f"{pid:04d}_c{cam + 1}s1_{k * 25 + 1:06d}_{k:02d}.jpg"
                sub = "bounding_box_train" if train else ("query" if k == 0 else
                                                          "bounding_box_test")
                _write_jpeg(os.path.join(folder, sub, name), img)
    for j in range(4):  # distractors (0000) and junk (-1), as in the real gallery
        rng = np.random.default_rng([cfg.seed, 10_000 + j])
        img = _clutter(rng, cfg.height, cfg.width, bgs[j % cfg.num_cameras]).clip(0, 255)
        pid = "0000" if j < 2 else "-1"
        _write_jpeg(os.path.join(folder, "bounding_box_test",
                                 f"{pid}_c{j % cfg.num_cameras + 1}s1_{j:06d}_00.jpg"),
                    img.astype(np.uint8))
    _stamp(folder, cfg)
    return folder


def _synthetic(kind: str, reader: str, generate, config_cls, splits, task):
    @register_dataset(f"synthetic_{kind}")
    class _Synthetic(ImageDataset):
        __doc__ = (f"Generated data in the published layout read by ``{reader}``. ``root`` is "
                   f"the cache folder (None: {DEFAULT_CACHE}); keyword ``config`` takes a "
                   f"``{config_cls.__name__}``.")

        def __new__(cls, root: str | None = None, split: str = "train", config=None, **kwargs):
            if isinstance(config, dict):
                config = config_cls(**config)
            folder = generate(root, config or config_cls())
            return build_dataset(reader, folder, split, **kwargs)

    _Synthetic.__name__ = _Synthetic.__qualname__ = f"Synthetic{kind.upper()}"
    _Synthetic.splits = splits
    _Synthetic.task = task
    return _Synthetic


SyntheticFGVC = _synthetic("fgvc", "cub200", generate_cub, FGVCConfig, ("train", "test"),
                           "classification")
SyntheticReID = _synthetic("reid", "market1501", generate_market, ReIDConfig,
                           ("train", "query", "gallery"), "reid")
SyntheticDML = _synthetic("dml", "cub200_dml",
                          lambda root, cfg: generate_cub(root, cfg, kind="dml"), FGVCConfig,
                          ("train", "test"), "dml")
