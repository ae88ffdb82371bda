"""A small generated landmark-retrieval set in the Revisited Oxford / Paris layout.

Each **landmark** is a structured scene drawn from a seed: sky and ground, a building body with
a window grid (rectangular or arched windows), a roof (gable, dome, flat or spire), zero to two
towers and horizontal banding, each with its own colours. A scene is a function of continuous
world coordinates, so every **view** is rendered exactly through a homography: viewpoint
(rotation + perspective), scale (zoom), translation, plus a global illumination change and
clutter (occluding blobs and bars standing for trees, people, cars).

Ground truth follows the Revisited protocol, by construction of the view:

- ``easy``: the building clearly visible (small viewpoint / scale changes, light clutter);
- ``hard``: strong perspective, zoom in or out (x0.5 .. x2), strong illumination change and
  heavy clutter, the building still largely visible;
- ``junk``: the building barely visible (tiny in a corner, mostly out of frame, or mostly
  occluded);
- queries: near-frontal views, ``bbx`` = the building's box in the query image (the reader
  crops queries to it); distractors: other scenes that are none of the landmarks.

Written (cached) as::

    <root>/landmarks-<hash>/
        gnd_synthetic_landmarks.pkl    dict(imlist, qimlist, gnd=[dict(bbx, easy, hard, junk)])
        jpg/<name>.jpg                 queries q_XXXX, database (shuffled) db_XXXX; 64-128 px
        train.txt                      "train/<name>.jpg <label>" lines
        train/<name>.jpg               labelled views of the landmarks (+ extra landmarks)
        .complete                      parameters of the finished tree

and read by :class:`SyntheticLandmarks` (``synthetic_landmarks``), a subclass of the real
Revisited reader: ``query`` / ``gallery`` exactly as ``roxford5k``; ``train`` = labelled
landmark views for training. The train split holds the evaluation landmarks (labels
``0 .. num_landmarks-1``, views drawn independently of the database) and ``extra_train``
further landmarks: a closed-set demo, not a protocol (GLDv2 and Oxford share no landmark).

Deterministic given the seed (numpy ``default_rng`` per image); the cache folder defaults to
``~/.cache/finegrain/synthetic_landmarks`` (pass ``root`` to change it). A different parameter
set goes to its own sub-folder.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from .datasets._parsing import read_rows, to_int
from .datasets.base import DatasetError, Sample, check_file
from .datasets.revisited import _Revisited
from .registry import register_dataset
from .synthetic import _done, _folder, _stamp, _write_jpeg

__all__ = ["DEFAULT_CACHE", "GND_NAME", "LandmarksConfig", "Scene", "random_scene",
           "render_scene", "render_view", "generate_landmarks", "SyntheticLandmarks"]

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "finegrain",
                             "synthetic_landmarks")
GND_NAME = "gnd_synthetic_landmarks.pkl"


@dataclass(frozen=True)
class LandmarksConfig:
    """Parameters of ``synthetic_landmarks``.

    Args:
        num_landmarks: landmarks with queries and database views.
        queries_per_landmark: query images per landmark.
        easy_per_landmark: database views in ``easy`` per landmark.
        hard_per_landmark: database views in ``hard``.
        junk_per_landmark: database views in ``junk``.
        num_distractors: database images of other scenes.
        train_per_landmark: ``train`` views per landmark.
        extra_train: landmarks only in ``train`` (labels after the evaluation ones).
        min_size: shortest image side drawn (pixels).
        max_size: longest image side drawn (pixels).
        seed: generator seed.
    """

    num_landmarks: int = 6
    queries_per_landmark: int = 2
    easy_per_landmark: int = 4
    hard_per_landmark: int = 3
    junk_per_landmark: int = 2
    num_distractors: int = 24
    train_per_landmark: int = 10
    extra_train: int = 4
    min_size: int = 64
    max_size: int = 128
    seed: int = 0


# --------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """Parameters of one landmark scene in world coordinates (u right, v down, unit square)."""

    sky: np.ndarray
    sky2: np.ndarray
    ground: np.ndarray
    horizon: float
    body: tuple[float, float, float, float]  # x1, y1, x2, y2
    wall: np.ndarray
    window: np.ndarray
    grid: tuple[int, int]  # rows, cols
    arched: bool
    roof: int  # 0 gable, 1 dome, 2 flat, 3 spire
    roof_col: np.ndarray
    towers: list[tuple[float, float, float]]  # centre u, half width, top v
    tower_col: np.ndarray
    bands: int


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw a landmark scene."""
    col = lambda lo=30, hi=230: rng.uniform(lo, hi, 3).astype(np.float32)  # noqa: E731
    horizon = rng.uniform(0.72, 0.82)
    w = rng.uniform(0.35, 0.55)
    top = rng.uniform(0.35, 0.5)
    cx = rng.uniform(0.45, 0.55)
    towers = []
    for _ in range(rng.integers(0, 3)):
        side = rng.choice([-1, 1])
        towers.append((float(cx + side * rng.uniform(0.15, w / 2)), float(rng.uniform(0.03, 0.06)),
                       float(rng.uniform(0.12, top - 0.08))))
    return Scene(sky=col(120, 240), sky2=col(60, 200), ground=col(40, 160), horizon=horizon,
                 body=(cx - w / 2, top, cx + w / 2, horizon), wall=col(), window=col(0, 120),
                 grid=(int(rng.integers(2, 5)), int(rng.integers(3, 7))),
                 arched=bool(rng.random() < 0.5), roof=int(rng.integers(0, 4)), roof_col=col(),
                 towers=towers, tower_col=col(), bands=int(rng.integers(0, 4)))


def render_scene(sc: Scene, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colours (H, W, 3) and building mask (H, W) of the scene at world points (u, v)."""
    t = np.clip(v / sc.horizon, 0, 1)[..., None]
    img = np.where((v < sc.horizon)[..., None], sc.sky * (1 - t) + sc.sky2 * t, sc.ground)
    x1, y1, x2, y2 = sc.body
    body = (u > x1) & (u < x2) & (v > y1) & (v < y2)
    img = np.where(body[..., None], sc.wall, img)
    if sc.bands:
        band = body & (((v - y1) / (y2 - y1) * (2 * sc.bands + 1)) % 2 < 0.25)
        img = np.where(band[..., None], sc.wall * 0.6, img)
    rows, cols = sc.grid
    cu, cv = (u - x1) / (x2 - x1) * cols, (v - y1) / (y2 - y1) * rows
    fu, fv = cu % 1.0, cv % 1.0
    win = body & (np.abs(fu - 0.5) < 0.22) & (fv > 0.25) & (fv < 0.8)
    if sc.arched:  # round top
        win &= ~((fv < 0.45) & ((fu - 0.5) ** 2 / 0.22 ** 2 + (fv - 0.45) ** 2 / 0.2 ** 2 > 1))
    img = np.where(win[..., None], sc.window, img)
    mid, half = (x1 + x2) / 2, (x2 - x1) / 2
    if sc.roof == 0:  # gable
        roof = (v <= y1) & (v > y1 - 0.15) & (np.abs(u - mid) < half * (1 - (y1 - v) / 0.15))
    elif sc.roof == 1:  # dome
        roof = (v <= y1) & ((u - mid) ** 2 / (half * 0.7) ** 2 + (v - y1) ** 2 / 0.14 ** 2 < 1)
    elif sc.roof == 2:  # flat parapet
        roof = (v <= y1) & (v > y1 - 0.04) & (np.abs(u - mid) < half * 1.05)
    else:  # spire
        roof = (v <= y1) & (v > y1 - 0.3) & (np.abs(u - mid) < 0.06 * (1 - (y1 - v) / 0.3))
    img = np.where(roof[..., None], sc.roof_col, img)
    mask = body | roof
    for tu, th, ttop in sc.towers:
        tower = (np.abs(u - tu) < th) & (v > ttop) & (v < sc.horizon)
        cap = (v <= ttop) & (v > ttop - 0.05) & (np.abs(u - tu) < th * (1 - (ttop - v) / 0.05))
        img = np.where((tower | cap)[..., None], sc.tower_col, img)
        mask |= tower | cap
    return img, mask


# --------------------------------------------------------------------------- views
_VIEWS = {  # tilt (perspective), rotation (rad), zoom range, shift, clutter blobs, light
    "query": dict(persp=0.05, rot=0.03, zoom=(0.95, 1.1), shift=0.03, clutter=(0, 1), light=0.05),
    "easy": dict(persp=0.12, rot=0.06, zoom=(0.8, 1.25), shift=0.06, clutter=(0, 2), light=0.1),
    "hard": dict(persp=0.45, rot=0.15, zoom=(0.5, 2.0), shift=0.12, clutter=(3, 6), light=0.35),
    "train": dict(persp=0.3, rot=0.1, zoom=(0.6, 1.6), shift=0.1, clutter=(0, 4), light=0.25),
}


def _img_size(rng: np.random.Generator, cfg: LandmarksConfig) -> tuple[int, int]:
    long = int(rng.integers(max(cfg.min_size, 80), cfg.max_size + 1))
    short = int(rng.integers(cfg.min_size, long + 1))
    return (long, short) if rng.random() < 0.35 else (short, long)  # (H, W)


def _homography(rng: np.random.Generator, kind: str, H: int, W: int,
                centre: tuple[float, float]) -> np.ndarray:
    """3 x 3 map from image pixels (x, y, 1) to world (u, v, 1)."""
    p = _VIEWS[kind]
    S = max(H, W)
    zoom = rng.uniform(*p["zoom"])
    th = rng.uniform(-p["rot"], p["rot"])
    px, py = rng.uniform(-p["persp"], p["persp"], 2)
    to_unit = np.array([[1 / S, 0, -W / (2 * S)], [0, 1 / S, -H / (2 * S)], [0, 0, 1]])
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    scale = np.diag([1 / zoom, 1 / zoom, 1.0])
    persp = np.array([[1, 0, 0], [0, 1, 0], [px, py, 1]])
    cu = centre[0] + rng.uniform(-1, 1) * p["shift"]
    cv = centre[1] + rng.uniform(-1, 1) * p["shift"]
    to_world = np.array([[1, 0, cu], [0, 1, cv], [0, 0, 1]])
    return to_world @ persp @ rot @ scale @ to_unit


def _junk_homography(rng: np.random.Generator, H: int, W: int, sc: Scene) -> np.ndarray:
    """A view where the building is barely visible: tiny, or almost out of the frame."""
    S = max(H, W)
    x1, y1, x2, y2 = sc.body
    if rng.random() < 0.5:  # tiny, near a corner
        zoom = rng.uniform(0.12, 0.18)
        cu = (x1 + x2) / 2 + rng.choice([-1, 1]) * rng.uniform(1.6, 2.2)
        cv = (y1 + y2) / 2 + rng.choice([-1, 1]) * rng.uniform(1.2, 1.8)
    else:  # zoomed onto the sky / ground beside it, only an edge in frame
        zoom = rng.uniform(1.0, 1.4)
        side = rng.choice([-1, 1])
        cu = (x1 if side < 0 else x2) + side * rng.uniform(0.38, 0.45)
        cv = rng.uniform(0.4, 0.7)
    to_unit = np.array([[1 / S, 0, -W / (2 * S)], [0, 1 / S, -H / (2 * S)], [0, 0, 1]])
    return np.array([[1 / zoom, 0, cu], [0, 1 / zoom, cv], [0, 0, 1]]) @ to_unit


def _warp(sc: Scene, Hm: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    pts = Hm @ np.stack([xx.ravel(), yy.ravel(), np.ones(H * W)])
    u, v = (pts[:2] / pts[2:]).reshape(2, H, W)
    return render_scene(sc, u, v)


def _clutter(rng: np.random.Generator, img: np.ndarray, n: int, big: bool) -> np.ndarray:
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    for _ in range(n):
        col = rng.uniform(10, 120, 3) if rng.random() < 0.5 else \
            np.array([rng.uniform(20, 80), rng.uniform(90, 160), rng.uniform(20, 80)])
        r = rng.uniform(0.12, 0.3 if big else 0.15) * min(H, W)
        cy, cx = rng.uniform(0.3, 1.0) * H, rng.uniform(0, 1) * W
        if rng.random() < 0.6:  # tree / blob
            m = (yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r * r
        else:  # person / pole / car: a bar from the bottom
            m = (np.abs(xx - cx) < r * 0.35) & (yy > cy)
        img[m] = col
    return img


def render_view(sc: Scene, kind: str, rng: np.random.Generator, cfg: LandmarksConfig
                ) -> tuple[np.ndarray, tuple[float, float, float, float] | None, float]:
    """One view: ``(uint8 (H, W, 3), building bbx in pixels or None, visible fraction)``.

    ``visible`` is the fraction of the image covered by the (unoccluded) building.
    """
    H, W = _img_size(rng, cfg)
    x1, y1, x2, y2 = sc.body
    centre = ((x1 + x2) / 2, (y1 + y2) / 2 - 0.05)
    Hm = _junk_homography(rng, H, W, sc) if kind == "junk" else _homography(rng, kind, H, W,
                                                                           centre)
    img, mask = _warp(sc, Hm, H, W)
    img = img.astype(np.float32)
    p = _VIEWS.get(kind, _VIEWS["hard"])
    gain = 1 + rng.uniform(-p["light"], p["light"], 3) if kind != "junk" else \
        1 + rng.uniform(-0.3, 0.3, 3)
    img = img * gain
    if kind == "junk" and rng.random() < 0.5:
        n_clutter, big = 6, True
    else:
        lo, hi = p["clutter"]
        n_clutter, big = int(rng.integers(lo, hi + 1)), kind == "hard"
    before = img.copy()
    img = _clutter(rng, img, n_clutter, big)
    occluded = np.any(img != before, axis=2)
    visible = float((mask & ~occluded).mean())
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    bbx = None
    if mask.any():
        ys, xs = np.nonzero(mask)
        bbx = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return img, bbx, visible


def generate_landmarks(root: str | None = None, cfg: LandmarksConfig = LandmarksConfig()) -> str:
    """Write the tree (cached) and return its folder (see the module docstring).

    ``root`` may also be a finished tree itself (it holds ``gnd_synthetic_landmarks.pkl``).
    """
    if root is not None and os.path.isfile(os.path.join(root, GND_NAME)):
        return root
    folder = _folder(root or DEFAULT_CACHE, "landmarks", cfg)
    if _done(folder):
        return folder
    os.makedirs(os.path.join(folder, "jpg"), exist_ok=True)
    L = cfg.num_landmarks
    scenes = [random_scene(np.random.default_rng([cfg.seed, 1, i]))
              for i in range(L + cfg.extra_train)]

    # database: (landmark, kind) per image, then shuffled so positives are not contiguous
    entries = [(lm, kind) for lm in range(L)
               for kind, n in (("easy", cfg.easy_per_landmark), ("hard", cfg.hard_per_landmark),
                               ("junk", cfg.junk_per_landmark)) for _ in range(n)]
    entries += [(-1, "distractor")] * cfg.num_distractors
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(entries))
    imlist, gnd = [], [{"easy": [], "hard": [], "junk": []} for _ in range(L)]
    lm_of_q = [lm for lm in range(L) for _ in range(cfg.queries_per_landmark)]
    for j, e in enumerate(order):
        lm, kind = entries[e]
        rng = np.random.default_rng([cfg.seed, 3, j])
        if lm < 0:
            sc = random_scene(np.random.default_rng([cfg.seed, 4, j]))
            img, _, _ = render_view(sc, "easy", rng, cfg)
        else:
            img, _, _ = render_view(scenes[lm], kind, rng, cfg)
        name = f"db_{j:04d}"
        _write_jpeg(os.path.join(folder, "jpg", name + ".jpg"), img)
        imlist.append(name)
        if lm >= 0:
            gnd[lm][kind].append(j)

    qimlist, qgnd = [], []
    for q, lm in enumerate(lm_of_q):
        rng = np.random.default_rng([cfg.seed, 5, q])
        img, bbx, _ = render_view(scenes[lm], "query", rng, cfg)
        assert bbx is not None  # near-frontal views always show the building
        name = f"q_{q:04d}"
        _write_jpeg(os.path.join(folder, "jpg", name + ".jpg"), img)
        qimlist.append(name)
        qgnd.append({"bbx": list(bbx), **{k: list(v) for k, v in gnd[lm].items()}})

    lines = []
    for lm in range(L + cfg.extra_train):
        for k in range(cfg.train_per_landmark):
            rng = np.random.default_rng([cfg.seed, 6, lm, k])
            img, _, _ = render_view(scenes[lm], "train", rng, cfg)
            rel = f"train/lm{lm:03d}_{k:03d}.jpg"
            _write_jpeg(os.path.join(folder, rel), img)
            lines.append(f"{rel} {lm}")
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, GND_NAME), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": qgnd}, f)
    _stamp(folder, cfg)
    return folder


@register_dataset("synthetic_landmarks")
class SyntheticLandmarks(_Revisited):
    """Generated landmark retrieval set read with the Revisited reader (see module docstring).

    Args:
        root: cache folder (``None``: ``~/.cache/finegrain/synthetic_landmarks``) or a
            generated tree.
        split: ``train`` (labelled landmark views), ``query`` (cropped to bbx) or
            ``gallery``.
        config: a :class:`LandmarksConfig` or a dict of its fields (a YAML recipe's
            ``dataset_kwargs``); default parameters when ``None``.
        crop_queries: as for ``roxford5k``.
        **kwargs: ``transform``, ``on_error``.

    Attributes:
        gnd, imlist, qimlist: as ``roxford5k`` (for every split).
    """

    splits = ("train", "query", "gallery")
    gnd_name = GND_NAME

    def __init__(self, root: str | None = None, split: str = "gallery",
                 config: LandmarksConfig | dict | None = None, crop_queries: bool = True,
                 **kwargs):
        if split not in self.splits:
            raise DatasetError(f"SyntheticLandmarks: unknown split {split!r}; choose one of "
                               f"{self.splits}")
        if isinstance(config, dict):
            config = LandmarksConfig(**config)
        folder = generate_landmarks(root, config or LandmarksConfig())
        super().__init__(folder, split, crop_queries=crop_queries, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        if self.split != "train":
            return super().load()
        split, self.split = self.split, "gallery"
        super().load()  # gnd, imlist, qimlist for every split
        self.split = split
        path = check_file(os.path.join(self.root, "train.txt"), "the train list")
        samples = []
        for n, (rel, label) in read_rows(path, "the train list", 2):
            samples.append(Sample(os.path.join(self.root, rel), to_int(label, path, n, "label"),
                                  extra={"name": os.path.splitext(rel)[0]}))
        n_cls = max(s.label for s in samples) + 1
        return samples, [f"landmark_{i:03d}" for i in range(n_cls)]
