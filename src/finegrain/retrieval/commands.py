"""The retrieval sub-commands of ``finegrain``: ``embed``, ``index {build,search,add,remove}``,
``retrieval eval``.

``finegrain.cli`` calls :func:`register` with its sub-parsers object; every sub-command sets
``func`` to a callable ``(args) -> int`` exit code. Errors are raised as
:class:`finegrain.errors.FinegrainError` (the CLI prints them and exits with 2), so the
commands run in-process in tests::

    parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["index", "build", "db", "--kind", "Flat", "--out", "gallery.index"])
    args.func(args)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..atomic import write_json
from ..errors import InputError, MissingFileError

__all__ = ["register"]


def _out(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


# --------------------------------------------------------------------------- embed
def cmd_embed(a: argparse.Namespace) -> int:
    from .sharded import embed_sharded

    accelerator, devices = a.accelerator, a.devices
    if a.device is not None:  # the older single-device flag: cpu, cuda, cuda:1
        if a.accelerator != "auto" or a.devices != "1":
            raise InputError("embed: pass either --device or --accelerator / --devices")
        dev = str(a.device)
        accelerator = "cpu" if dev == "cpu" else "gpu"
        devices = [int(dev.split(":")[1])] if ":" in dev else 1
    dataset, root = a.dataset, a.root
    if (a.images is None) == (a.dataset is None):
        raise InputError("embed: pass --dataset NAME (with --root DIR) or --images DIR | GLOB "
                         "| list.txt, one of the two")
    if a.images is not None:  # unlabelled photos: names relative to the folder, labels -1
        if a.root is not None:
            raise InputError("embed --images takes the folder, glob or list itself; drop --root")
        dataset, root = "images", a.images
    from ..loading import open_model
    from ..runtime import is_export_folder
    model = meta = None
    if a.runtime == "onnx" or is_export_folder(a.checkpoint):  # opened here, not per rank
        loaded = open_model(a.checkpoint, a.runtime)
        model, meta = loaded.model, loaded.meta
    info = embed_sharded(a.checkpoint, dataset, root, a.split, a.out,
                         img_size=a.img_size, scales=a.scales, batch_size=a.batch_size,
                         num_workers=a.num_workers, amp=a.amp, accelerator=accelerator,
                         devices=_devices(devices), strategy=a.strategy,
                         num_nodes=a.num_nodes, shard_size=a.shard_size, merge=a.merge,
                         model=model, meta=meta, upscale=a.upscale, on_error=a.on_error)
    if info["global_zero"]:
        resumed = f", {info['resumed']} of {info['shards']} shards kept" if info["resumed"] \
            else ""
        _out(f"{info['count']} x {info['dim']} descriptors ({info['images_per_s']:.1f} img/s"
             f"{resumed}) -> {', '.join(info['paths'])}")
        if info["skipped"]:
            shown = ", ".join(info["skipped"][:5])
            more = f", ... ({len(info['skipped']) - 5} more)" if len(info["skipped"]) > 5 else ""
            _out(f"skipped {len(info['skipped'])} unreadable images (left out, name and row "
                 f"together): {shown}{more}")
    return 0


def _devices(v):
    """``--devices``: an int, -1 / auto (all), or a comma list of device ids (``0,2``)."""
    if isinstance(v, (int, list)):
        return v
    v = str(v)
    if v == "auto":
        return v
    if "," in v:
        return [int(x) for x in v.split(",") if x]
    try:
        return int(v)
    except ValueError:
        raise InputError(f"--devices {v!r}: give a count, -1 / auto, or ids like 0,2") from None


# --------------------------------------------------------------------------- index
def cmd_index_build(a: argparse.Namespace) -> int:
    from .index import Index
    index = Index.build(a.descriptors, factory=a.kind, metric=a.metric, train_size=a.train_size,
                        nprobe=a.nprobe, ef_search=a.ef_search)
    index.save(a.out)
    _out(f"index {index.manifest['factory']} ({index.manifest['mode']}) with {len(index)} "
         f"vectors -> {a.out}")
    return 0


def cmd_index_search(a: argparse.Namespace) -> int:
    import numpy as np

    from .descriptors import load_descriptors
    from .index import Index, SearchResult
    from .postprocess import postprocessed_search

    index = Index.load(a.index)
    qd = load_descriptors(a.queries)
    index.check(qd.meta, f"query descriptors {qd.path}")
    q = np.asarray(qd.vectors, dtype=np.float32)
    if a.aqe and a.aqe_n > len(index):
        raise InputError(f"--aqe-n {a.aqe_n} is larger than the index {a.index} "
                         f"({len(index)} images); pass --aqe-n {len(index)} or less")

    def search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        r = index.search(x, k, nprobe=a.nprobe, ef_search=a.ef_search)
        return r.scores, r.ids

    # the code path of 'retrieval eval' (re-ranking uses the expanded query); every returned
    # result is re-ranked: the shortlist is max(k, --rerank-k)
    post = _postprocess_options(a, min_rerank_k=a.k)
    scores, ids = postprocessed_search(q, search, index.reconstruct, a.k, post)
    names = [[index.names[r] if r >= 0 else None for r in row] for row in index.row(ids)]
    res = SearchResult(scores, ids, names)
    query_names = qd.names
    if a.rerank:
        _out("scores: minus the k-reciprocal re-ranked distance (higher is closer; <= 0)")
    for i in range(min(len(query_names), a.show)):
        top = ", ".join(f"{n} ({s:.3f})" for n, s in zip(res.names[i][:5], res.scores[i][:5]))
        _out(f"{query_names[i]}: {top}")
    if a.out:
        write_json(a.out, {"index": a.index, "k": a.k, "aqe": a.aqe, "rerank": a.rerank,
                           "score": "negative re-ranked distance" if a.rerank else
                           index.manifest["metric"], **res.to_json(query_names)}, indent=None)
        _out(f"results of {len(query_names)} queries -> {a.out}")
    return 0


def cmd_index_add(a: argparse.Namespace) -> int:
    from .index import Index
    index = Index.load(a.index)
    n = index.add(a.descriptors)
    index.save(a.index)
    _out(f"added {n} vectors; {len(index)} in {a.index}")
    return 0


def cmd_index_remove(a: argparse.Namespace) -> int:
    from .index import Index
    names = list(a.names)
    if a.names_file:
        if not os.path.isfile(a.names_file):
            raise MissingFileError(f"--names-file {a.names_file} not found; pass a text file "
                                   f"with one image name a line")
        with open(a.names_file) as f:
            names += [ln.strip() for ln in f if ln.strip()]
    if not names:
        raise InputError("index remove: give image names or --names-file")
    index = Index.load(a.index)
    n = index.remove(names)
    index.save(a.index)
    _out(f"removed {n} vectors; {len(index)} left in {a.index}")
    return 0


# --------------------------------------------------------------------------- retrieval eval
def cmd_retrieval_eval(a: argparse.Namespace) -> int:
    from .pipeline import ExtractOptions, PictureOptions, format_table, retrieval_eval

    out = a.out
    if out is None:
        base = os.path.dirname(os.path.abspath(a.checkpoint)) if a.checkpoint else "."
        out = os.path.join(base, f"retrieval_{a.dataset}")
    extract = ExtractOptions(scales=tuple(a.scales), img_size=a.img_size,
                             batch_size=a.batch_size, device=a.device,
                             num_workers=a.num_workers, amp=a.amp, upscale=a.upscale)
    metrics = retrieval_eval(a.checkpoint, a.dataset, a.root, distractors=a.distractors,
                             out=out, extract=extract, post=_postprocess_options(a),
                             picture=PictureOptions(a.picture), query_descriptors=a.queries,
                             gallery_descriptors=a.gallery)
    if a.json:
        _out(json.dumps(metrics))
    else:
        title = f"{a.dataset}" + (" +1M" if a.distractors else "") + " (%)"
        _out(format_table(metrics, title))
        _out(f"-> {os.path.join(out, 'retrieval.json')}")
    return 0


# --------------------------------------------------------------------------- parsers
def _postprocess_args(p: argparse.ArgumentParser, rerank_help: str, rerank_k_help: str) -> None:
    """``--aqe``, ``--aqe-n``, ``--aqe-alpha``, ``--rerank``, ``--rerank-k``
    (:class:`.postprocess.PostprocessOptions`)."""
    p.add_argument("--aqe", action="store_true", help="alpha query expansion")
    p.add_argument("--aqe-n", type=int, default=10, help="neighbours of the expansion")
    p.add_argument("--aqe-alpha", type=float, default=3.0, help="similarity exponent")
    p.add_argument("--rerank", action="store_true", help=rerank_help)
    p.add_argument("--rerank-k", type=int, default=100, help=rerank_k_help)


def _postprocess_options(a: argparse.Namespace, min_rerank_k: int = 0):
    """The :class:`.postprocess.PostprocessOptions` of :func:`_postprocess_args`' flags; the
    shortlist is at least ``min_rerank_k``."""
    from .postprocess import PostprocessOptions
    return PostprocessOptions(aqe=a.aqe, aqe_n=a.aqe_n, aqe_alpha=a.aqe_alpha, rerank=a.rerank,
                              rerank_k=max(min_rerank_k, a.rerank_k))


def _metric(v: str) -> str:
    """``--metric``: :func:`.search.metric_name` (``ip`` / ``l2`` -> ``cosine`` /
    ``euclidean``), its message as argparse's."""
    from .search import metric_name
    try:
        return metric_name(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _extraction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="resize factors of the image at the eval size S, descriptors "
                        "averaged then re-normalised (default 1 = single scale; DOLG: "
                        "0.7071 1 1.4142)")
    p.add_argument("--img-size", type=int, default=None,
                   help="longest image side S, aspect ratio kept; query crops scaled by "
                        "their full image's factor (default: 1024 on roxford5k / rparis6k / "
                        "revisitop1m as cirtorch and DELG, 512 the cheaper option; else the "
                        "checkpoint's training size)")
    p.add_argument("--upscale", action="store_true",
                   help="also enlarge images (and query crops' full images) smaller than "
                        "the eval size S to S; default: never enlarge, as cirtorch and DELG "
                        "(recorded in the descriptors: search applies the same)")
    # the older name of --img-size, kept for existing command lines (hidden)
    p.add_argument("--image-size", dest="img_size", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per forward among images of identical size")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--num-workers", type=int, default=0,
                   help="decode workers (embed: per process, default min(8, CPU count))")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")


def register(subparsers) -> None:
    """Add ``embed``, ``index`` and ``retrieval`` to an argparse sub-parsers object."""
    e = subparsers.add_parser(
        "embed", help="extract descriptors of a dataset split",
        description="Write NAME.npy (float32) + NAME.json descriptors on Lightning's predict "
                    "loop: shards of --shard-size images (NAME.shards/), one process per device "
                    "under DDP, merged at the end; run it again after a kill to resume.")
    e.add_argument("checkpoint", help="runs/<run>/best.ckpt, or an export folder "
                                      "(`finegrain export`)")
    e.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="torch: the checkpoint (or an export folder's torch.export program); "
                        "onnx: an export folder's model.onnx on ONNX Runtime (CUDA provider "
                        "when present, else CPU)")
    e.add_argument("--dataset", default=None, help="roxford5k, rparis6k, revisitop1m, ...")
    e.add_argument("--images", default=None, metavar="DIR|GLOB|LIST",
                   help="instead of --dataset: unlabelled images, a folder (recursive), a "
                        "quoted glob ('photos/**/*.jpg') or a list file (one path a line, "
                        "relative to it, optionally a label after it); names are relative to "
                        "the folder, labels -1")
    e.add_argument("--root", default=None, help="dataset root")
    e.add_argument("--split", default="gallery", help="query | gallery | train ...")
    e.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="an unreadable image (corrupt, truncated, missing): stop naming it "
                        "(raise, default) or leave it out, name and row together, and list "
                        "the skipped files at the end (skip)")
    e.add_argument("--out", required=True, help="output NAME (NAME.npy + NAME.json)")
    _extraction_args(e)
    e.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (Lightning)")
    e.add_argument("--devices", default="1",
                   help="devices per node: a count, -1 for all, or ids (0,2); more than one "
                        "runs DDP, each process writing its own shards")
    e.add_argument("--strategy", default="auto",
                   help="Lightning strategy: auto, ddp, ddp_spawn (DDP under torchrun / srun)")
    e.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun / SLURM)")
    e.add_argument("--shard-size", type=int, default=1024,
                   help="images per shard NAME.shards/NNNNNN.npy: the unit of work and of "
                        "resuming (a re-run keeps finished shards)")
    e.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep NAME.shards/ + NAME.manifest.json (read as one set by index / "
                        "retrieval) instead of merging them into NAME.npy + NAME.json")
    e.set_defaults(func=cmd_embed, device=None, num_workers=None)

    ix = subparsers.add_parser("index", help="build / search / grow a faiss index folder")
    isub = ix.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="index a descriptor file")
    b.add_argument("descriptors", help="descriptor NAME (NAME.npy + NAME.json)")
    b.add_argument("--kind", default="Flat",
                   help="faiss factory string: Flat (exact), IVF4096,PQ64x4fs,RFlat, IVF4096,SQ8, "
                        "HNSW32 ...; 'auto' picks by size: Flat below 200k vectors, else "
                        "IVF{~4 sqrt(n)},PQ{D/4}x4fs,RFlat at nprobe 256 (recall@100 >= 0.9 "
                        "on three generated distributions: docs/retrieval.md)")
    b.add_argument("--out", required=True, help="index folder")
    b.add_argument("--metric", default="cosine", type=_metric, choices=("cosine", "euclidean"),
                   help="cosine: inner product of the L2-normalised descriptors (higher is "
                        "closer); euclidean: squared L2 distance (lower is closer); the older "
                        "names ip / l2 are accepted")
    b.add_argument("--train-size", type=int, default=None,
                   help="IVF / PQ training sample, drawn at random (default 64 per IVF cell, "
                        "at least 65536; a size >= the count trains on every vector)")
    b.add_argument("--nprobe", type=int, default=None,
                   help="IVF cells visited (stored; with --kind auto it replaces the default)")
    b.add_argument("--ef-search", type=int, default=None, help="HNSW search depth (stored)")
    b.set_defaults(func=cmd_index_build)
    s = isub.add_parser("search", help="top-k of query descriptors")
    s.add_argument("index", help="index folder")
    s.add_argument("queries", help="query descriptor NAME")
    s.add_argument("-k", type=int, default=100, help="results per query")
    _postprocess_args(s, "k-reciprocal re-ranking",
                      "shortlist re-ranked (at least -k: every result is re-ranked)")
    s.add_argument("--nprobe", type=int, default=None)
    s.add_argument("--ef-search", type=int, default=None)
    s.add_argument("--out", default=None, help="write the results as JSON")
    s.add_argument("--show", type=int, default=5, help="queries printed")
    s.set_defaults(func=cmd_index_search)
    ad = isub.add_parser("add", help="add descriptors (same model and preprocessing)")
    ad.add_argument("index")
    ad.add_argument("descriptors")
    ad.set_defaults(func=cmd_index_add)
    rm = isub.add_parser("remove", help="remove images by name")
    rm.add_argument("index")
    rm.add_argument("names", nargs="*")
    rm.add_argument("--names-file", default=None, help="file with one name a line")
    rm.set_defaults(func=cmd_index_remove)

    rt = subparsers.add_parser("retrieval", help="landmark retrieval evaluation")
    rsub = rt.add_subparsers(dest="retrieval_command", required=True)
    ev = rsub.add_parser("eval", help="Revisited Easy / Medium / Hard mAP and mP@k")
    ev.add_argument("checkpoint", nargs="?", default=None,
                    help="runs/<run>/best.ckpt (omit with --queries / --gallery)")
    ev.add_argument("--dataset", required=True,
                    help="roxford5k | rparis6k | synthetic_landmarks")
    ev.add_argument("--root", default=None, help="dataset root")
    ev.add_argument("--distractors", default=None, help="R1M distractor descriptor NAME")
    ev.add_argument("--out", default=None,
                    help="folder for retrieval.json, descriptors, top10.png "
                         "(default: beside the checkpoint, retrieval_<dataset>)")
    _postprocess_args(ev, "k-reciprocal re-ranking (of the expanded query after --aqe)",
                      "each query's shortlist re-ranked (the rest keeps its order)")
    ev.add_argument("--picture", default="worst", choices=("best", "worst", "first", "none"),
                    help="queries drawn with their top-10")
    ev.add_argument("--queries", default=None, help="query descriptor NAME (no extraction)")
    ev.add_argument("--gallery", default=None, help="gallery descriptor NAME (no extraction)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _extraction_args(ev)
    ev.set_defaults(func=cmd_retrieval_eval)
