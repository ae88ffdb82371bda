"""``finegrain data check NAME ROOT``: read every split of a dataset, count it, and catch the
data errors users hit most before a training run does.

:func:`check_dataset` returns a JSON-serialisable dict keyed by split (images, classes or
ids, cameras, and a few per-dataset facts) and raises :class:`DatasetError` with the fix when
something is wrong:

- a split is missing or empty, a list file is malformed (the readers' own errors);
- a label is outside ``0..C-1`` (training splits) or negative (query / gallery), or the
  splits of a classification dataset disagree on the class list;
- Re-ID / retrieval: no query identity appears in the gallery; query and gallery hold a
  single camera (the same-camera rule would remove every match); no query has a valid match;
- MSMT17: list files of one version next to the images of the other (the reader's check);
- Revisited Oxford / Paris: queries not cropped to their ``bbx``;
- every listed image exists and is not empty (a stat per file, with a progress bar);
- ``verify_images=True``: every image that cannot be decoded (all of them, per split, in
  ``corrupt``); without it images are not decoded, and the printed table says so.

:func:`format_check` prints the result as a small table.
"""

from __future__ import annotations

import inspect
import os
from typing import Iterable

from .datasets.base import DatasetError, ImageDataset
from .registry import get_dataset_class

__all__ = ["default_splits", "check_dataset", "corrupt_images", "format_check"]


def _split_stats(ds: ImageDataset) -> dict:
    out: dict = {"images": len(ds)}
    labels = ds.labels
    if any(lab >= 0 for lab in labels):
        out["ids" if ds.task == "reid" else "classes"] = len({lab for lab in labels if lab >= 0})
    cams = {s.camid for s in ds.samples if s.camid >= 0}
    if cams:
        out["cameras"] = len(cams)
    if getattr(ds, "version", ""):
        out["version"] = ds.version
    if hasattr(ds, "gnd") and ds.split == "query":
        out["cropped"] = bool(getattr(ds, "crop_queries", True))
    return out


def _relabelled(ds: ImageDataset) -> bool:
    """Whether the split's labels must be 0..len(classes)-1."""
    if ds.task == "reid":
        return ds.split == "train"
    if ds.task == "retrieval":
        return ds.split == "train" and bool(ds.classes)
    return True


def _check_labels(name: str, ds: ImageDataset) -> None:
    n = len(ds.classes)
    for i, s in enumerate(ds.samples):
        if not isinstance(s.label, int) or isinstance(s.label, bool):
            raise DatasetError(f"{name} split {ds.split!r}: sample {i} ({s.path}) has label "
                               f"{s.label!r}, not an integer; fix the reader / list file")
        if _relabelled(ds):
            if not 0 <= s.label < n:
                raise DatasetError(f"{name} split {ds.split!r}: sample {i} ({s.path}) has label "
                                   f"{s.label} outside 0..{n - 1} ({n} classes); the list file "
                                   f"and the class list disagree: re-extract the dataset")
        elif ds.task == "reid" and s.label < 0:
            raise DatasetError(f"{name} split {ds.split!r}: sample {i} ({s.path}) has negative "
                               f"identity {s.label}; junk images (-1) must be dropped")


def _check_query_gallery(name: str, query: ImageDataset, gallery: ImageDataset,
                         result: dict) -> None:
    q_ids = {s.label for s in query.samples}
    g_ids = {s.label for s in gallery.samples}
    shared = q_ids & g_ids
    if not shared:
        raise DatasetError(f"{name}: no query identity appears in the gallery ({len(q_ids)} "
                           f"query ids, {len(g_ids)} gallery ids); query and gallery labels must "
                           f"be the same raw identities (not relabelled separately): check the "
                           f"label column / folder names")
    result["query"]["ids_in_gallery"] = len(shared)
    result["query"]["queries_without_gallery_id"] = sum(s.label not in g_ids
                                                        for s in query.samples)
    if query.task != "reid":
        return
    cams = {s.camid for s in query.samples + gallery.samples}
    if len(cams) == 1:
        raise DatasetError(f"{name}: query and gallery all come from one camera ({cams.pop()}); "
                           f"the Re-ID protocol removes gallery images with the query's identity "
                           f"AND camera, so every match would be removed: give the images their "
                           f"real camera ids (reid_csv: a 'camid' column)")
    by_id: dict[int, set[int]] = {}
    for s in gallery.samples:
        by_id.setdefault(s.label, set()).add(s.camid)
    valid = sum(bool(by_id.get(s.label, set()) - {s.camid}) for s in query.samples)
    result["query"]["queries_with_valid_match"] = valid
    if valid == 0:
        raise DatasetError(f"{name}: no query has a gallery image of its identity from another "
                           f"camera, so every query would be skipped by the Re-ID protocol; "
                           f"check the camera ids of query and gallery")


def _check_revisited(name: str, query: ImageDataset) -> None:
    if not getattr(query, "crop_queries", True):
        raise DatasetError(f"{name}: queries are not cropped to their gnd bbx "
                           f"(crop_queries=False); the Revisited protocol requires the crop, "
                           f"drop crop_queries=False")
    for s, g in zip(query.samples, query.gnd):
        if s.bbox is None or tuple(s.bbox) != tuple(float(v) for v in g["bbx"]):
            raise DatasetError(f"{name}: query {s.path} is not cropped to its gnd bbx "
                               f"{list(g['bbx'])}; the Revisited protocol requires the crop")


def _stat_images(name: str, ds: ImageDataset, bar) -> None:
    """Every listed image exists and is not empty (no decoding: one ``stat`` per file)."""
    for i, s in enumerate(ds.samples):
        where = f"{name} split {ds.split!r}, image {i + 1} of {len(ds)}"
        try:
            size = os.stat(s.path).st_size
        except OSError:
            raise DatasetError(f"{where}: {s.path} not found; restore the missing file "
                               f"(re-extract the dataset), or check that the root is the "
                               f"folder of the published layout") from None
        if size == 0:
            raise DatasetError(f"{where}: {s.path} is empty (0 bytes); re-extract it (training "
                               f"can also skip such files with --data.on_error skip)")
        bar.update()


def _verify_images(ds: ImageDataset, bar) -> list[dict]:
    """Decode every image; returns the ones that fail (``{"image", "error"}``), all of them."""
    bad = []
    for i in range(len(ds)):
        try:
            ds.load_image(i)
        except DatasetError as e:
            bad.append({"image": ds.samples[i].path, "error": str(e)})
        bar.update()
    return bad


def default_splits(name: str, root: str | None, **kwargs) -> tuple[str, ...]:
    """The splits :func:`check_dataset` reads when none are given: those present on disk for
    readers that can tell (``imagefolder``, ``reid_csv``), else all the reader declares.
    ``kwargs`` are reader options (``csv_file`` ...), passed on where they apply."""
    cls = get_dataset_class(name)
    available = getattr(cls, "available_splits", None)
    if available is not None:
        accepted = inspect.signature(available).parameters
        return tuple(available(root, **{k: v for k, v in kwargs.items() if k in accepted}))
    splits = getattr(cls, "splits", None)
    if not splits:
        raise DatasetError(f"{name}: cannot tell its splits; pass them explicitly")
    return tuple(splits)


def check_dataset(name: str, root: str | None, splits: Iterable[str] | None = None,
                  verify_images: bool = False, progress: bool = False, **kwargs) -> dict:
    """Read and check a dataset.

    Args:
        name: registry name (``cub200``, ``market1501`` ...).
        root: dataset root.
        splits: splits to read (default: all the dataset has).
        verify_images: also decode every image (slow) and list every one that fails
            (without it, every image is only checked to exist and be non-empty).
        progress: show a progress bar (stderr) while the images are checked.
        **kwargs: reader options (``train_only=True`` for MSMT17 ...).

    Returns:
        ``{split: {"images": int, "classes" | "ids": int, "cameras": int (when present),
        ...}}``, JSON-serialisable. Query splits add ``ids_in_gallery``,
        ``queries_without_gallery_id`` (and ``queries_with_valid_match`` for Re-ID);
        Revisited queries add ``cropped``; MSMT17 adds ``version``; with ``verify_images``
        every split adds ``verified`` (images decoded) and ``corrupt`` (``{"image",
        "error"}`` of each that failed).

    Raises:
        DatasetError: the first problem found, with the fix.
    """
    cls = get_dataset_class(name)
    splits = tuple(splits) if splits is not None else default_splits(name, root, **kwargs)
    datasets: dict[str, ImageDataset] = {}
    result: dict[str, dict] = {}
    for split in splits:
        try:
            ds = cls(root, split, **kwargs)
        except DatasetError as e:
            raise DatasetError(f"{name} split {split!r}: {e}") from None
        _check_labels(name, ds)
        datasets[split] = ds
        result[split] = _split_stats(ds)

    fixed = [s for s in ("train", "val", "test") if s in datasets
             and datasets[s].task in ("classification",)]
    for s in fixed[1:]:
        if datasets[s].classes != datasets[fixed[0]].classes:
            raise DatasetError(f"{name}: splits {fixed[0]!r} and {s!r} have different class "
                               f"lists ({len(datasets[fixed[0]].classes)} vs "
                               f"{len(datasets[s].classes)}), so a label means different "
                               f"classes; make every split use the same class list")
    if "query" in datasets:
        q = datasets["query"]
        if hasattr(q, "gnd"):
            _check_revisited(name, q)
        elif "gallery" in datasets:
            _check_query_gallery(name, q, datasets["gallery"], result)
    from tqdm.auto import tqdm
    total = sum(len(ds) for ds in datasets.values()) * (2 if verify_images else 1)
    with tqdm(total=total, unit="img", desc="data check", disable=not progress,
              leave=False) as bar:
        for ds in datasets.values():
            _stat_images(name, ds, bar)
        for split, ds in datasets.items():
            if verify_images:
                bad = _verify_images(ds, bar)
                result[split]["verified"] = len(ds) - len(bad)
                result[split]["corrupt"] = bad
    return result


def corrupt_images(result: dict) -> list[dict]:
    """Every image ``verify_images`` could not decode, over all splits."""
    return [dict(b, split=split) for split, r in result.items() for b in r.get("corrupt", ())]


def format_check(result: dict) -> str:
    """A small text table of a :func:`check_dataset` result (one row per split)."""
    main = ["images", "classes", "ids", "cameras"]
    cols = [c for c in main if any(c in r for r in result.values())]
    rows = [["split"] + cols + ["notes"]]
    for split, r in result.items():
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in main + ["corrupt"])
        if r.get("corrupt"):
            notes += f"{', ' if notes else ''}corrupt={len(r['corrupt'])}"
        rows.append([split] + [str(r.get(c, "-")) for c in cols] + [notes])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths[:-1]))
    bad = corrupt_images(result)
    for b in bad:
        lines.append(f"corrupt ({b['split']}): {b['image']}")
    if not any("verified" in r for r in result.values()):
        lines.append("images were checked to exist and be non-empty, not decoded: "
                     "--verify-images decodes every one and lists the corrupt files")
    return "\n".join(lines)
