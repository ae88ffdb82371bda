"""Revisited Oxford5k / Paris6k landmark retrieval and the R1M distractor set.

Layout (as ``revisitop``'s ``download.py`` leaves it)::

    roxford5k/                          rparis6k/                 revisitop1m/
        gnd_roxford5k.pkl                   gnd_rparis6k.pkl          revisitop1m.txt
        jpg/all_souls_000013.jpg ...        jpg/paris_*.jpg ...       jpg/<relative path> ...

``gnd_*.pkl`` is a dict: ``imlist`` (database names), ``qimlist`` (70 query names), ``gnd``
(70 dicts with ``bbx`` [x1, y1, x2, y2], ``easy``, ``hard``, ``junk``: 0-based indices into
``imlist``). It is loaded with a restricted unpickler that only rebuilds plain containers and
numpy arrays, never arbitrary objects.

Split ``query`` = the ``qimlist`` images cropped to ``bbx`` (``Sample.bbox``, the protocol);
``gallery`` = ``imlist`` in file order, so ``gnd`` indices index the gallery directly.
Samples carry no class (``label`` -1); ground truth is ``dataset.gnd``.
"""

from __future__ import annotations

import os
import warnings

from ..registry import register_dataset
from ._parsing import read_lines_numbered, safe_load_pickle
from .base import DatasetError, ImageDataset, Sample, check_file

__all__ = ["load_revisited_gnd", "ROxford5k", "RParis6k", "RevisitOP1M"]


def load_revisited_gnd(path: str) -> dict:
    """Load and validate a Revisited ``gnd_*.pkl`` (restricted unpickler).

    Returns:
        dict with ``imlist``, ``qimlist`` (lists of str) and ``gnd`` (list of dicts).

    Raises:
        DatasetError: missing / unsafe / malformed file, or an index outside ``imlist``.
    """
    cfg = safe_load_pickle(path, "the Revisited ground truth (gnd_<dataset>.pkl)")
    fix = "download it again from http://cmp.felk.cvut.cz/revisitop/data/datasets/"
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{path}: expected a dict with imlist, qimlist, gnd; {fix}")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DatasetError(f"{path}: {len(gnd)} gnd entries for {len(qimlist)} queries; {fix}")
    n = len(imlist)
    for i, g in enumerate(gnd):
        if not isinstance(g, dict) or "bbx" not in g or len(g["bbx"]) != 4:
            raise DatasetError(f"{path}: gnd[{i}] ({qimlist[i]}) has no 4-value 'bbx'; {fix}")
        for key in ("easy", "hard", "junk"):
            bad = [int(j) for j in g.get(key, []) if not 0 <= int(j) < n]
            if bad:
                raise DatasetError(f"{path}: gnd[{i}][{key!r}] index {bad[0]} outside the "
                                   f"{n} database images; {fix}")
    return {"imlist": [str(x) for x in imlist], "qimlist": [str(x) for x in qimlist],
            "gnd": gnd}


class _Revisited(ImageDataset):
    """Shared reader of ``roxford5k`` / ``rparis6k``."""

    task = "retrieval"
    splits = ("query", "gallery")
    gnd_name = ""

    def __init__(self, root: str, split: str = "gallery", crop_queries: bool = True, **kwargs):
        if not crop_queries:
            warnings.warn(
                f"{type(self).__name__}: crop_queries=False; the Revisited protocol requires "
                f"queries cropped to their gnd 'bbx': mAP on full query images is NOT "
                f"comparable with published numbers (finegrain data check fails on it)",
                UserWarning, stacklevel=2)
        self.crop_queries = crop_queries
        super().__init__(root, split, **kwargs)

    def load(self) -> tuple[list[Sample], list[str]]:
        cfg = load_revisited_gnd(os.path.join(self.root, self.gnd_name))
        jpg = check_file(os.path.join(self.root, "jpg"), "the images folder jpg/<name>.jpg")
        self.imlist, self.qimlist, self.gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
        if self.split == "gallery":
            samples = [Sample(os.path.join(jpg, name + ".jpg"), -1, extra={"name": name})
                       for name in self.imlist]
        else:
            samples = []
            for name, g in zip(self.qimlist, self.gnd):
                bbx = tuple(float(v) for v in g["bbx"])
                samples.append(Sample(os.path.join(jpg, name + ".jpg"), -1,
                                      bbox=bbx if self.crop_queries else None,
                                      extra={"name": name, "bbx": bbx}))
        return samples, []


@register_dataset("roxford5k")
class ROxford5k(_Revisited):
    """Revisited Oxford5k.

    Reference: Radenovic et al., "Revisiting Oxford and Paris: Large-Scale Image Retrieval
    Benchmarking", CVPR 2018.
    URL: http://cmp.felk.cvut.cz/revisitop/
    Statistics: 4,993 database images, 70 queries (cropped to bbx); Easy / Medium / Hard.

    Args:
        root: folder with ``gnd_roxford5k.pkl`` and ``jpg/``.
        split: ``query`` or ``gallery``.
        crop_queries: crop queries to their ``bbx`` (the protocol). ``False`` warns loudly
            and ``finegrain data check`` reports it as an error.
        **kwargs: ``transform``, ``on_error``.

    Attributes:
        gnd: the raw ground truth list (70 dicts: bbx, easy, hard, junk).
        imlist: database image names (gallery order). qimlist: query names.
    """

    gnd_name = "gnd_roxford5k.pkl"


@register_dataset("rparis6k")
class RParis6k(_Revisited):
    """Revisited Paris6k.

    Reference: Radenovic et al., "Revisiting Oxford and Paris: Large-Scale Image Retrieval
    Benchmarking", CVPR 2018.
    URL: http://cmp.felk.cvut.cz/revisitop/
    Statistics: 6,322 database images, 70 queries (cropped to bbx); Easy / Medium / Hard.

    Args:
        root: folder with ``gnd_rparis6k.pkl`` and ``jpg/``.
        split: ``query`` or ``gallery``.
        crop_queries: as for :class:`ROxford5k`.
        **kwargs: ``transform``, ``on_error``.
    """

    gnd_name = "gnd_rparis6k.pkl"


@register_dataset("revisitop1m")
class RevisitOP1M(ImageDataset):
    """The R1M distractor set appended after the Revisited Oxford / Paris database.

    Reference: Radenovic et al., CVPR 2018 (as above).
    URL: http://cmp.felk.cvut.cz/revisitop/ (``revisitop1m.txt`` and ``revisitop1m.*.tar.gz``)
    Statistics: 1,001,001 images; only a ``gallery`` split. Distractor descriptors go after the
    database descriptors, so ``gnd`` indices stay valid.

    Args:
        root: folder with ``revisitop1m.txt`` (relative image paths, one a line) and ``jpg/``.
        split: ``gallery``.
        **kwargs: ``transform``, ``on_error``.
    """

    task = "retrieval"
    splits = ("gallery",)

    def load(self) -> tuple[list[Sample], list[str]]:
        f_list = os.path.join(self.root, "revisitop1m.txt")
        check_file(f_list, "the R1M image list (relative paths under jpg/)")
        jpg = check_file(os.path.join(self.root, "jpg"), "the R1M images folder jpg/")
        samples = []
        for n, rel in read_lines_numbered(f_list, "R1M relative image paths"):
            if os.path.isabs(rel) or rel.startswith(".."):
                raise DatasetError(f"{f_list} line {n}: {rel!r} is not a path relative to "
                                   f"jpg/; download revisitop1m.txt again")
            samples.append(Sample(os.path.join(jpg, rel), -1, extra={"name": rel}))
        return samples, []
