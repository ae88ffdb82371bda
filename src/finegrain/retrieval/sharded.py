"""``finegrain embed`` on Lightning's predict loop: sharded, multi-process, resumable.

The dataset is cut into fixed blocks of ``shard_size`` consecutive images (in dataset order,
independent of the number of processes). Every block becomes one shard,
``NAME.shards/NNNNNN.npy`` + ``.json`` (the block's rows, names, labels, skipped images and the
extraction's model / checkpoint / preprocessing), written atomically (``.tmp`` then rename, the
JSON last: a shard is finished when its JSON is there). Under DDP (``--devices`` /
``--num-nodes`` / ``--strategy``, torchrun or SLURM) rank ``r`` of ``W`` takes every ``W``-th
unfinished block, and each of its data-loader workers every ``num_workers``-th of those; a
worker decodes a block and groups its images by size exactly as :func:`~.extract.extract`
(no padding), so the descriptors do not depend on the number of processes or workers.

**Resume.** Run the same command again: finished shards are checked (same model, checkpoint,
preprocessing, dataset, split and block) and kept; the others -- missing, or a ``.tmp`` left by
a kill -- are computed. Shards of another extraction under the same ``NAME`` are refused.

**The end.** After a barrier, rank 0 writes ``NAME.manifest.json`` (the ``NAME.json`` fields
plus ``"shards"`` in global name order). By default it then merges the shards into ``NAME.npy``
+ ``NAME.json`` (copied shard by shard into a memory-mapped file: one shard in RAM at a time),
exactly the files of a single-process extraction, and removes the shards and the manifest;
``merge=False`` (``--no-merge``) keeps the shards and the manifest, which
:func:`~.descriptors.load_descriptors` reads as one set (``index build``, ``index search``,
``retrieval eval --gallery / --distractors`` accept ``NAME`` either way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch

from ..atomic import atomic_path, write_with
from ..errors import InputError, nonfinite_outputs
from ..meta import ModelMeta
from .descriptors import (FORMAT, MANIFEST_FORMAT, descriptor_meta, descriptor_paths,
                          manifest_path, read_json, upgrade_meta)
from .extract import embed_batch, _ExtractionItems

__all__ = ["embed_sharded", "shard_plan", "shard_folder", "finished_shards", "write_manifest",
           "merge_shards", "default_num_workers", "DEFAULT_SHARD_SIZE"]

SHARD_FORMAT = "finegrain-descriptor-shard"
#: Images per shard: at most this many images are recomputed after a kill, per process.
DEFAULT_SHARD_SIZE = 1024
#: Fields of a shard that must equal the running extraction's for the shard to be reused.
_SAME = ("model_name", "checkpoint_hash", "preprocessing", "dataset", "split", "total",
         "start", "stop")


def default_num_workers() -> int:
    """Data-loader decode workers per process: ``min(8, CPU count)``."""
    return min(8, os.cpu_count() or 1)


def shard_folder(out: str) -> str:
    """``NAME.shards`` for ``--out NAME``."""
    return os.path.splitext(descriptor_paths(out)[0])[0] + ".shards"


def shard_plan(n: int, shard_size: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` blocks of ``shard_size`` consecutive images covering ``n``."""
    if shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_size}")
    return [(i, a, min(a + shard_size, n)) for i, a in enumerate(range(0, n, shard_size))]


def _shard_base(out: str, i: int) -> str:
    return os.path.join(shard_folder(out), f"{i:06d}")


#: temporary files of a write (``finegrain.atomic``'s ``.NAME.tmp-PID``, older ``NAME.tmp``)
_TEMPORARY = re.compile(r"\..+\.tmp-\d+|.+\.tmp")


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into ``path`` whole or not at all (:mod:`finegrain.atomic`: a
    temporary name beside it, fsync, rename; a full disk is one paragraph)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, as read back from JSON


def finished_shards(out: str, plan: Sequence[tuple[int, int, int]], expected: dict,
                    names: Sequence[str] | None = None) -> list[int]:
    """Shards of ``plan`` already written by an extraction with the ``expected`` fields
    (:data:`_SAME` but the block's ``start`` / ``stop``) and, given ``names`` (every image
    name of the split), the block's image names.

    Raises:
        InputError: a finished shard comes from another extraction (model, checkpoint,
            preprocessing, dataset, split or block differ): resuming would mix them.
    """
    done = []
    for i, a, b in plan:
        base = _shard_base(out, i)
        if not (os.path.isfile(base + ".json") and os.path.isfile(base + ".npy")):
            continue
        try:
            with open(base + ".json") as f:
                meta = upgrade_meta(json.load(f))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # not finished: computed again
        want = _norm({**expected, "start": a, "stop": b})
        diff = [k for k in _SAME if meta.get(k) != want.get(k)]
        if names is not None and not diff:
            skipped = set(meta.get("skipped", []))
            if meta.get("names") != [names[j] for j in range(a, b) if j not in skipped]:
                diff = ["names"]
                want["names"] = f"the {b - a} images {a}..{b - 1} of the split"
                meta = {**meta, "names": "other images"}
        if meta.get("format") != SHARD_FORMAT or diff:
            k = diff[0] if diff else "format"
            raise InputError(
                f"{base}.json belongs to another extraction ({k}: {meta.get(k)!r} there, "
                f"{want.get(k)!r} now); resume with the same checkpoint, dataset, split, "
                f"--img-size, --scales and --shard-size, or delete {shard_folder(out)} to "
                f"start over")
        try:
            shape = np.load(base + ".npy", mmap_mode="r").shape
        except (OSError, ValueError):
            continue
        if shape[0] == meta["count"]:
            done.append(i)
    return done


class _ShardBatches(torch.utils.data.IterableDataset):
    """Same-size batches of the blocks ``plan``: each worker takes every ``num_workers``-th
    block, decodes it in order and groups its images by size (``batch_size``, ``max_pending``
    as :func:`~.extract.extract`). Items: ``{"shard", "index" (B,), "image" (B, 3, H, W) or
    None, "skipped": [dataset index], "errors": [message]}``."""

    def __init__(self, items, plan, batch_size: int, max_pending: int):
        self.items, self.plan = items, list(plan)
        self.batch_size, self.max_pending = int(batch_size), int(max_pending)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, a, b in self.plan[wid::nw]:
            yield from self._block(i, a, b)

    def _block(self, shard: int, a: int, b: int):
        buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        pending = 0
        skipped, errors = [], []

        def batch(key):
            nonlocal pending
            items = buckets.pop(key)
            pending -= len(items)
            return {"shard": shard, "index": torch.tensor([i for i, _ in items]),
                    "image": torch.stack([x for _, x in items]), "skipped": [], "errors": []}

        for idx in range(a, b):
            item = self.items[idx]
            img = item["image"]
            if img is None:
                skipped.append(idx)
                errors.append(item["error"])
                continue
            if not torch.is_tensor(img) or img.ndim != 3 or not img.is_floating_point():
                raise InputError("extraction needs a dataset whose transform returns "
                                 "normalised float (3, H, W) tensors")
            key = tuple(img.shape[-2:])
            buckets.setdefault(key, []).append((idx, img))
            pending += 1
            if len(buckets[key]) >= self.batch_size:
                yield batch(key)
            elif pending > self.max_pending:
                yield batch(max(buckets, key=lambda k: len(buckets[k])))
        for key in list(buckets):
            yield batch(key)
        if skipped or a == b:
            yield {"shard": shard, "index": torch.zeros(0, dtype=torch.long), "image": None,
                   "skipped": skipped, "errors": errors}


class EmbedPredictor(pl.LightningModule):
    """Runs the model on :class:`_ShardBatches` and writes each finished block."""

    def __init__(self, model, dataset, out, plan, expected, names, labels, scales, amp,
                 batch_size, max_pending, num_workers, checkpoint, merge):
        super().__init__()
        self.model = model
        self.dataset, self.out, self.plan = dataset, out, list(plan)
        self.expected, self.names, self.labels = expected, names, labels
        self.scales, self.amp, self.merge = tuple(scales), amp, merge
        self.batch_size, self.max_pending = batch_size, max_pending
        self.num_workers, self.checkpoint = num_workers, checkpoint
        self._pending: dict[int, dict] = {}
        self._dim: int | None = None

    def predict_dataloader(self):
        done = set(finished_shards(self.out, self.plan, self.expected, self.names)) \
            if self.global_rank == 0 else set()
        todo = [p for p in self.plan if p[0] not in done]
        todo = self.trainer.strategy.broadcast(todo, src=0)  # rank 0's view, for all
        mine = todo[self.global_rank::self.trainer.world_size]
        os.makedirs(shard_folder(self.out), exist_ok=True)
        ds = _ShardBatches(_ExtractionItems(self.dataset), mine, self.batch_size,
                           self.max_pending)
        workers = min(self.num_workers, len(mine))
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                           pin_memory=self.device.type == "cuda")

    def predict_step(self, batch, batch_idx):
        shard = int(batch["shard"])
        _, a, b = self.plan[shard]
        buf = self._pending.setdefault(shard, {"rows": None, "seen": 0, "skipped": []})
        for err in batch["errors"]:
            warnings.warn(f"skipped: {err}", stacklevel=2)
        buf["skipped"] += [int(i) for i in batch["skipped"]]
        buf["seen"] += len(batch["skipped"])
        if batch["image"] is not None:
            emb = embed_batch(self.model, batch["image"], self.scales, self.amp)
            emb = emb.cpu().numpy()
            self._dim = emb.shape[1]
            if buf["rows"] is None:
                buf["rows"] = np.zeros((b - a, emb.shape[1]), dtype=np.float32)
            buf["rows"][batch["index"].cpu().numpy() - a] = emb
            buf["seen"] += len(emb)
        if buf["seen"] == b - a:
            self._write(shard)
        return len(batch["index"])  # (not kept: return_predictions=False)

    def _write(self, shard: int) -> None:
        i, a, b = self.plan[shard]
        buf = self._pending.pop(shard)
        skipped = set(buf["skipped"])
        keep = [j for j in range(a, b) if j not in skipped]
        dim = self._dim or 0
        rows = (buf["rows"] if buf["rows"] is not None
                else np.zeros((b - a, dim), np.float32))[np.asarray(keep, int) - a]
        bad = int((~np.isfinite(rows).all(1)).sum()) if len(rows) else 0
        if bad:
            raise nonfinite_outputs(self.checkpoint, bad, len(rows), "descriptors")
        meta = {"format": SHARD_FORMAT, **_norm(self.expected), "shard": i, "start": a,
                "stop": b, "count": len(rows), "dim": int(rows.shape[1]),
                "names": [self.names[j] for j in keep],
                "labels": [self.labels[j] for j in keep], "skipped": sorted(skipped),
                "rank": self.global_rank, "world_size": self.trainer.world_size}
        base = _shard_base(self.out, i)
        _atomic_write(base + ".npy", lambda f: np.save(f, np.ascontiguousarray(rows)))
        _atomic_write(base + ".json", lambda f: f.write(json.dumps(meta).encode()))

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("embed-shards")
        if self.trainer.is_global_zero:
            write_manifest(self.out, self.plan, self.expected)
            if self.merge:
                merge_shards(self.out)
        self.trainer.strategy.barrier("embed-merged")


def write_manifest(out: str, plan: Sequence[tuple[int, int, int]], expected: dict) -> str:
    """``NAME.manifest.json`` of the finished shards of ``plan`` in global name order (the
    ``NAME.json`` fields plus ``"shards"``, ``"skipped"``); returns its path."""
    done = set(finished_shards(out, plan, expected))
    missing = [i for i, _, _ in plan if i not in done]
    if missing:
        raise InputError(f"{len(missing)} shards of {out} are not finished (first: "
                         f"{_shard_base(out, missing[0])}); run the same 'finegrain embed' "
                         f"again to compute them")
    folder = os.path.dirname(os.path.abspath(manifest_path(out)))
    names, labels, shards, skipped, dim = [], [], [], [], 0
    for i, _, _ in plan:
        base = _shard_base(out, i)
        with open(base + ".json") as f:
            m = json.load(f)
        names += m["names"]
        labels += m["labels"]
        skipped += m["skipped"]
        if m["count"]:
            dim = m["dim"]
            shards.append({"path": os.path.relpath(base + ".npy", folder), "count": m["count"]})
    e = dict(expected)
    extra = {k: e.pop(k) for k in ("dataset", "split", "checkpoint", "root") if k in e}
    meta = descriptor_meta(len(names), dim, names, labels, e.pop("model_name"),
                           e.pop("checkpoint_hash"), e.pop("preprocessing"), **extra)
    meta.update(format=MANIFEST_FORMAT, shards=shards, skipped=skipped)
    path = manifest_path(out)
    _atomic_write(path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    for name in os.listdir(shard_folder(out)):  # temporaries of killed writes: every shard
        if _TEMPORARY.fullmatch(name):           # is whole now, nothing writes any more
            os.remove(os.path.join(shard_folder(out), name))
    for p in descriptor_paths(out):  # an older merged set under NAME would shadow it
        if os.path.exists(p):
            os.remove(p)
    return path


def merge_shards(out: str, remove: bool = True) -> tuple[str, str]:
    """Copy the shards listed in ``NAME.manifest.json`` into ``NAME.npy`` + ``NAME.json`` (the
    single-process files; one shard in RAM at a time), then (``remove``) delete the shards and
    the manifest. Returns the two paths."""
    from .descriptors import load_descriptors
    d = load_descriptors(manifest_path(out))
    npy, js = descriptor_paths(out)
    meta = {k: v for k, v in d.meta.items() if k not in ("shards", "skipped")}
    meta["format"] = FORMAT
    if len(set(meta["names"])) != len(meta["names"]):
        raise InputError(f"{manifest_path(out)}: an image name appears twice; descriptor "
                         f"names must be unique")
    parts = d.vectors.parts if hasattr(d.vectors, "parts") else [d.vectors]

    def copy(tmp: str) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                        shape=(len(d), d.dim))
        row = 0
        for p in parts:
            arr[row:row + len(p)] = p
            row += len(p)
        arr.flush()
        del arr

    write_with(npy, copy, 4 * len(d) * d.dim + 128)
    _atomic_write(js, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    if remove:
        shutil.rmtree(shard_folder(out), ignore_errors=True)
        os.remove(manifest_path(out))
    return npy, js


def embed_sharded(checkpoint: str, dataset_name: str, root: str | None, split: str, out: str,
                  img_size: int | None = None, scales: Sequence[float] = (1.0,),
                  batch_size: int = 16, num_workers: int | None = None, amp: bool = False,
                  accelerator: str = "auto", devices: Any = 1, strategy: str = "auto",
                  num_nodes: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
                  merge: bool = True, on_error: str = "raise", max_pending: int | None = None,
                  progress: bool = True, model: torch.nn.Module | None = None,
                  meta: ModelMeta | dict | None = None, upscale: bool = False) -> dict:
    """Extract ``dataset_name``/``split`` with ``checkpoint`` into ``out`` on Lightning's
    predict loop (see the module docstring). ``model`` / ``meta``: an already loaded model
    (tests); the checkpoint's hash is still recorded. ``upscale``: also enlarge images
    smaller than ``img_size`` (recorded in the preprocessing).

    Returns:
        ``{"count", "dim", "computed" (images decoded this run), "seconds", "images_per_s",
        "shards", "resumed" (shards kept), "paths", "global_zero"}``.
    """
    from ..loading import in_memory, open_model
    from .extract import extraction_dataset, model_name_of, sample_names

    loaded = open_model(checkpoint) if model is None else in_memory(model, meta, checkpoint)
    model, meta, ck_hash = loaded.model, loaded.meta, loaded.checkpoint_hash
    model_name = model_name_of(model, meta)
    model.eval()
    if not scales:
        raise InputError("scales is empty; use (1.0,) for single-scale extraction")
    ds, pre = extraction_dataset(model, dataset_name, root, split, img_size, scales, meta,
                                 on_error, upscale)
    plan = shard_plan(len(ds), shard_size)
    if not plan:
        raise InputError(f"{dataset_name}/{split} has no image; check the dataset root")
    expected = {"model_name": model_name, "checkpoint_hash": ck_hash,
                "preprocessing": pre, "dataset": dataset_name, "split": split,
                "checkpoint": checkpoint, "total": len(ds),
                "root": os.path.abspath(root) if root else None}  # finds the images again
    names = sample_names(ds)
    done = finished_shards(out, plan, expected, names)  # foreign shards: refused, every rank
    n_todo = sum(b - a for i, a, b in plan if i not in set(done))
    module = EmbedPredictor(
        model=model, dataset=ds, out=out, plan=plan, expected=expected,
        names=names, labels=[int(v) for v in ds.labels], scales=scales, amp=amp,
        batch_size=batch_size, max_pending=max_pending or 8 * batch_size,
        num_workers=default_num_workers() if num_workers is None else int(num_workers),
        checkpoint=checkpoint, merge=merge)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy,
                         num_nodes=num_nodes, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         enable_progress_bar=progress, inference_mode=True)
    t0 = time.perf_counter()
    trainer.predict(module, return_predictions=False)
    seconds = time.perf_counter() - t0
    paths = descriptor_paths(out) if merge else (manifest_path(out),)
    info = {"computed": n_todo, "seconds": seconds,
            "images_per_s": n_todo / max(seconds, 1e-9), "shards": len(plan),
            "resumed": len(done), "paths": paths, "global_zero": trainer.is_global_zero}
    js = paths[1] if merge else paths[0]
    info["skipped"] = []
    if trainer.is_global_zero:
        m = read_json(js, "extract again")
        kept = set(m["names"])
        info.update(count=m["count"], dim=m["dim"],
                    skipped=[n for n in names if n not in kept])  # on_error="skip"
    return info
