"""The ``finegrain`` command (also ``python -m finegrain``): it parses arguments and prints
results; the work is library code (:mod:`finegrain.inference` for predict / eval / explain).

``train`` is LightningCLI ``fit`` (YAML recipes, dotted overrides, ``--print_config``); the
other subcommands are plain argparse and run in-process (``main(argv)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from .atomic import write_json
from .errors import (EXIT_INTERRUPTED, EXIT_USER_ERROR, FinegrainError, InputError,
                     Interrupted, one_paragraph)

__all__ = ["build_parser", "main"]

log = logging.getLogger("finegrain")


# ---- predict ----------------------------------------------------------------------------
def _cmd_predict(a) -> int:
    from .inference import predict
    res = predict(a.checkpoint, a.images, a.topk, a.runtime)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['class']}")
    return 0


# ---- eval -------------------------------------------------------------------------------
def _overrides(extra: list[str]) -> tuple[dict, dict]:
    """``--data.<name> VALUE`` and ``--model.<name> VALUE`` pairs -> (data, model) dicts."""
    out: dict[str, dict] = {"data": {}, "model": {}}
    it = iter(extra)
    for a in it:
        kind = a[2:].partition(".")[0] if a.startswith("--") else ""
        if kind not in out:
            raise InputError(f"unknown option {a}; eval takes --data.<name> VALUE and "
                             f"--model.<name> VALUE overrides")
        key, _, val = a[len(kind) + 3:].partition("=")
        val = val or next(it, None)
        if val is None:
            raise InputError(f"{a} needs a value: {a} VALUE")
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        out[kind][key] = val
    return out["data"], out["model"]


def _cmd_eval(a, extra) -> int:
    # the progress bar writes to stdout: off when stdout carries JSON
    from .inference import evaluate_checkpoint
    data, model = _overrides(extra)
    vis_out, info = None, {}
    if a.visrank:
        vis_out = os.path.join(os.path.dirname(os.path.abspath(a.out)) if a.out else ".",
                               "visrank.png")
    metrics = evaluate_checkpoint(a.checkpoint, data, a.devices, progress=not a.json,
                                  model_overrides=model, rerank=a.rerank, aqe=a.aqe,
                                  visrank=a.visrank, visrank_out=vis_out,
                                  visrank_queries=a.visrank_queries, info=info)
    picture = metrics.pop("visrank", None)
    res = {"checkpoint": os.path.abspath(a.checkpoint), **info,
           "unit": "fraction", "rerank": a.rerank, "aqe": a.aqe, "model_overrides": model,
           "metrics": metrics, **({"visrank": picture} if picture else {})}
    if a.out:
        write_json(a.out, res)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['dataset']} / {res['split']} of {a.checkpoint}"
              + (" (re-ranked)" if a.rerank else "") + (f" (aqe {a.aqe})" if a.aqe else ""))
        print(f"checkpoint chosen in its run on: {res['selected_on']}")
        print(f"{'metric':>8s}  {'%':>6s}")
        for k, v in metrics.items():
            if isinstance(v, float):
                print(f"{k:>8s}  {v * 100:6.2f}" if 0 <= v <= 1 else f"{k:>8s}  {v:.4f}")
        if picture:
            print(f"ranked gallery: {picture}")
    return 0


# ---- explain ----------------------------------------------------------------------------
def _cmd_explain(a) -> int:
    from .inference import explain
    for path in explain(a.checkpoint, a.images, a.out, a.pair):
        print(path)
    return 0


# ---- export -----------------------------------------------------------------------------
def _cmd_export(a) -> int:
    from .export import export, format_parity
    overrides = {"sa_only": True} if a.sa_only else None
    report = export(a.checkpoint, a.out, a.format, images=a.images, num_images=a.num_images,
                    model_overrides=overrides, tolerance=a.tolerance, dtype=a.dtype)
    print(json.dumps(report, indent=1) if a.json else format_parity(report))
    if not a.json:
        print(f"written: {a.out} (parity.json, preprocess.json, export.json)")
    return 0


# ---- data check -------------------------------------------------------------------------
def _cmd_init_model(a) -> int:
    from .api import init_model
    try:
        kwargs = json.loads(a.model_args) if a.model_args else {}
    except json.JSONDecodeError as e:
        raise InputError(f"--model-args {a.model_args!r} is not JSON ({e}); e.g. "
                         f"'{{\"task\": \"dml\"}}'") from None
    weights = init_model(a.name, a.out, pretrained=a.pretrained, img_size=a.img_size, **kwargs)
    print(f"written: {weights} + model.json; next: finegrain embed {weights} --images DIR "
          f"--out NAME, finegrain index build NAME --out NAME.index, finegrain serve "
          f"NAME.index")
    return 0


def _cmd_data(a) -> int:
    from .data.check import check_dataset, corrupt_images, format_check
    res = check_dataset(a.name, a.root, verify_images=a.verify_images,
                        progress=not a.json and sys.stderr.isatty())
    print(json.dumps(res, indent=1) if a.json else format_check(res))
    bad = corrupt_images(res)
    if bad:  # the report is out (text or JSON); the exit code and one paragraph say it failed
        first = ", ".join(b["image"] for b in bad[:3])
        print(f"error: {len(bad)} image(s) of {a.name} at {a.root} cannot be decoded (first: "
              f"{first}); re-extract or replace them, or train with --data.on_error skip to "
              f"skip and count them", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(seeds=a.seeds, out=a.out, only=a.only, jobs=a.jobs, ablations=a.ablations)
    return 0


# ---- search / serve ---------------------------------------------------------------------
def _cmd_search(a) -> int:
    from .api import Searcher
    results = Searcher(a.index, model=a.model, gallery_root=a.gallery_root).search(a.images,
                                                                                  a.k)
    res = {"index": a.index, "k": a.k, "queries": [r.to_dict() for r in results]}
    if a.out:
        write_json(a.out, res)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print("\n".join(str(r) for r in results))
    return 0


def _cmd_serve(a) -> int:
    from .errors import require
    for module in ("fastapi", "uvicorn", "multipart"):
        require(module, "serve")
    from .serve import serve
    serve(a.index, model=a.model, host=a.host, port=a.port, k_max=a.k_max,
          max_upload_mb=a.max_upload_mb, max_pixels=int(a.max_megapixels * 1e6),
          device=a.device, gallery_root=a.gallery_root)
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="an index folder of `finegrain index build`")
    p.add_argument("--model", default=None, metavar="CKPT_OR_EXPORT",
                   help="checkpoint or export folder to embed queries with (default: the "
                        "checkpoint the index records; it must be the one that embedded it)")
    p.add_argument("--gallery-root", default=None,
                   help="where the gallery images are, when they moved since `embed` (the "
                        "--images folder / glob / list, or the dataset root)")


class _Parser(argparse.ArgumentParser):
    """argparse with every option's default in its help (sub-commands inherit it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


# ---- compare ----------------------------------------------------------------------------
def _cmd_compare(a) -> int:
    from .engine.report import compare_runs, find_runs, format_compare
    res = compare_runs(find_runs(a.runs), a.group_by, a.baseline)
    print(json.dumps(res, indent=1) if a.json else format_compare(res, a.markdown))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    p = _Parser(prog="finegrain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="store_true", help="print the version")
    p.add_argument("--debug", action="store_true",
                   help="before the command: show the traceback of an error (also "
                        "FINEGRAIN_DEBUG=1); errors exit with code 2")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("train", help="train from a YAML recipe (LightningCLI fit; see "
                                 "`finegrain train --help`)", add_help=False)
    ckpt_help = "a finegrain checkpoint (runs/<run>/best.ckpt or last.ckpt)"
    e = sub.add_parser("eval", help="evaluate a checkpoint on its dataset",
                       description="Evaluate a checkpoint on its dataset's test protocol "
                                   "(query + gallery for Re-ID; --data.val_split holdout: the "
                                   "held-out part of train that chose best.ckpt). Also takes "
                                   "--data.<name> "
                                   "VALUE overrides (--data.root DIR ...) and inference-time "
                                   "--model.<name> VALUE overrides (--model.sa_only true). "
                                   "Metrics are fractions in [0, 1] in the JSON; the console "
                                   "table shows percentages.")
    e.add_argument("checkpoint", help=ckpt_help)
    e.add_argument("--devices", default=1, help="devices (DDP when > 1: same metrics)")
    e.add_argument("--json", action="store_true",
                   help="print the JSON (metrics as fractions, checkpoint, dataset, split) "
                        "instead of the table")
    e.add_argument("--out", help="also write that JSON to this file")
    e.add_argument("--rerank", action="store_true",
                   help="Re-ID: k-reciprocal re-ranking (Zhong et al. 2017; k1 20, k2 6, "
                        "lambda 0.3) of the query-gallery distances")
    e.add_argument("--aqe", type=int, default=0, metavar="N",
                   help="Re-ID: average query expansion with the top N gallery matches "
                        "(0: off)")
    e.add_argument("--visrank", type=int, default=0, metavar="N",
                   help="Re-ID: draw the top-N ranked gallery of some queries (torchreid's "
                        "visrank) into visrank.png beside --out, or the working directory")
    e.add_argument("--visrank-queries", type=int, default=8, metavar="Q",
                   help="queries in the --visrank picture")
    pr = sub.add_parser("predict", help="top-k class names and probabilities")
    pr.add_argument("checkpoint", help=ckpt_help)
    pr.add_argument("images", nargs="+", help="image files (jpg / png)")
    pr.add_argument("-k", "--topk", type=int, default=5, help="classes shown per image")
    pr.add_argument("--json", action="store_true", help="print JSON (probabilities as "
                                                         "fractions) instead of the table")
    pr.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                    help="torch: the checkpoint (or an export folder's torch.export program); "
                         "onnx: an export folder's model.onnx on ONNX Runtime (CUDA provider "
                         "when present, else CPU)")
    xp = sub.add_parser("export", help="a checkpoint as ONNX / torch.export / timm weights, "
                                       "checked against PyTorch",
                        description="Export a checkpoint's inference model (eval mode, dynamic "
                                    "batch, the checkpoint's image size; ONNX of a model with "
                                    "an embedding that takes any size: dynamic height and "
                                    "width, as search embeds photos) into a folder with "
                                    "preprocess.json, then run it and PyTorch on real images "
                                    "(and non-square crops of them) and write parity.json; "
                                    "fails above the tolerance.")
    xp.add_argument("checkpoint", help=ckpt_help)
    xp.add_argument("--format", choices=["onnx", "exported", "timm"], default="onnx",
                    help="onnx: model.onnx (torch.onnx dynamo exporter); exported: model.pt2 "
                         "(torch.export); timm: backbone.safetensors that timm.create_model "
                         "loads (timm.json gives the name and arguments)")
    xp.add_argument("--out", required=True, help="the export folder")
    xp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="weights and compute of the exported model (onnx / exported); its "
                         "input and outputs stay float32 (default float32: the checkpoint's)")
    xp.add_argument("--images", nargs="+", default=None,
                    help="parity images (files or folders); default: the test split of a "
                         "generated CUB-layout dataset")
    xp.add_argument("--num-images", type=int, default=16, help="parity images used at most")
    xp.add_argument("--sa-only", action="store_true",
                    help="DCAL: export the SA branch alone (no rollout / GLCA at inference)")
    xp.add_argument("--tolerance", type=float, default=None,
                    help="largest max|exported - PyTorch| / max|PyTorch| per output (default "
                         "by --dtype: 1e-4 float32, see finegrain.export.TOLERANCES)")
    xp.add_argument("--json", action="store_true", help="print parity.json instead of the "
                                                         "table")
    ex = sub.add_parser("explain", help="attention pictures of a checkpoint on images",
                        description="Attention pictures: one row per image with the "
                                    "predicted class and its probability, one heat map per "
                                    "attention map (colour bar 0-1). With --pair, a second "
                                    "picture shows where A attends in B and their similarity.")
    ex.add_argument("checkpoint", help=ckpt_help)
    ex.add_argument("images", nargs="*", help="image files, one row each")
    ex.add_argument("--pair", nargs=2, metavar=("A", "B"),
                    help="also draw where A attends in B (pair-wise cross-attention)")
    ex.add_argument("--out", default="explain.png",
                    help="a .png / .jpg / .pdf / .svg file, or a folder (explain.png and, "
                         "with --pair and images, explain_pair.png inside it); the paths "
                         "written are printed")
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    dc = dsub.add_parser("check", help="validate a dataset on disk; counts per split")
    dc.add_argument("name", help="dataset name (cub200, market1501, ...)")
    dc.add_argument("root", help="the dataset's folder in its published layout")
    dc.add_argument("--json", action="store_true", help="print JSON instead of the table")
    dc.add_argument("--verify-images", action="store_true", help="decode every image")
    dm = sub.add_parser("demo", help="every method vs its baseline on generated data (CPU)")
    dm.add_argument("--seeds", type=int, default=1, help="seeds per arm (paired by seed)")
    dm.add_argument("--out", default="runs/demo", help="folder of the runs, demo.json and "
                                                       "pictures")
    dm.add_argument("--only", nargs="*", help="run only these entries (fgvc reid tasn dml dalg)")
    dm.add_argument("--ablations", action="store_true",
                    help="also the arms that test each mechanism (DCAL random selection, GLCA / "
                         "PWCA only, TASN uniform map, cross-image lambda 0, DALG orthogonal "
                         "fusion, equal-compute baselines)")
    dm.add_argument("--jobs", type=int, default=2, help="training runs in parallel (1 thread "
                                                         "each)")
    cp = sub.add_parser("compare", help="a table of training runs (mean +- std over seeds, "
                                        "paired difference against a baseline)")
    cp.add_argument("runs", nargs="+", metavar="RUN",
                    help="run folders of `finegrain train` (globs allowed: 'runs/*-cub*')")
    cp.add_argument("--group-by", choices=["recipe"], default=None,
                    help="one row per recipe: mean +- std (ddof 1) of its runs over seeds")
    cp.add_argument("--baseline", metavar="RUN",
                    help="a run folder (or recipe name with --group-by recipe): every other "
                         "row gets its paired difference against that run's group, paired "
                         "by seed")
    fmt = cp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON (fractions)")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    se = sub.add_parser("search", help="top-k gallery images of query images",
                        description="Embed images with the index's own model and "
                                    "preprocessing (index.json) and print their top-k.")
    _search_args(se)
    se.add_argument("images", nargs="+", help="image files or folders of images")
    se.add_argument("-k", type=int, default=10, help="results per image")
    se.add_argument("--json", action="store_true", help="print JSON instead of the table")
    se.add_argument("--out", default=None, help="also write the JSON to this file")
    im = sub.add_parser("init-model", help="a model record from weights alone (no training): "
                                           "embed / search / serve / export take it",
                        description="Write OUT/weights.safetensors + OUT/model.json for a "
                                    "registered model with pretrained weights and no "
                                    "training; its inputs are the weights' own. A plain "
                                    "classifier (tf_efficientnet_lite0, resnet50 ...) is "
                                    "made a retrieval model: its embedding is the "
                                    "L2-normalised pooled feature (--task dml).")
    im.add_argument("name", help="a registered model name (finegrain.list_models())")
    im.add_argument("--pretrained", required=True,
                    help="weights: a local file (.safetensors, .pth, efficientnet_pytorch "
                         "files ...) or a Hub tag")
    im.add_argument("--out", required=True, help="folder to write")
    im.add_argument("--img-size", type=int, default=None,
                    help="input size (default: the weights' input_size); in retrieval the "
                         "longest side of an embedded image")
    im.add_argument("--model-args", default=None, metavar="JSON",
                    help="further create_model arguments, e.g. '{\"task\": \"reid\"}'")
    sv = sub.add_parser("serve", help="a search page and JSON API over an index (FastAPI)",
                        description="Serve a search page (upload an image or pick a gallery "
                                    "one; top-k with scores, attention pictures) and its JSON "
                                    "API (POST /search, GET /health, GET /gallery/{id}; "
                                    "schema at /docs). The index folder is only read.")
    _search_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--k-max", type=int, default=100, help="largest k a request may ask")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (MB)")
    sv.add_argument("--max-megapixels", type=float, default=40.0,
                    help="largest image (width x height / 1e6), checked before decoding")
    sv.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    from .retrieval.commands import register
    register(sub)
    return p, sub


def main(argv: list[str] | None = None) -> int:
    """Run ``finegrain``; returns the exit code: 0, or 2 for a problem the user can fix
    (:class:`finegrain.errors.FinegrainError`: one paragraph on stderr naming the file and the
    fix; ``--debug`` before the command or ``FINEGRAIN_DEBUG=1`` adds the traceback). Any other
    exception is a bug and propagates with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    debug = os.environ.get("FINEGRAIN_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    try:
        return _run(argv)
    except Interrupted as e:
        print(f"interrupted: {one_paragraph(e)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FinegrainError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_paragraph(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        from .engine.run import train
        train(argv[1:])
        return 0
    parser, _ = build_parser()
    a, extra = parser.parse_known_args(argv)
    if a.version:
        from . import __version__
        print(__version__)
        return 0
    if a.command is None:
        parser.print_help()
        return 0
    if extra and a.command != "eval":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.command == "eval":
        return _cmd_eval(a, extra)
    handler = {"predict": _cmd_predict, "explain": _cmd_explain, "data": _cmd_data,
               "demo": _cmd_demo, "compare": _cmd_compare, "search": _cmd_search,
               "serve": _cmd_serve, "export": _cmd_export,
               "init-model": _cmd_init_model}.get(a.command)
    return handler(a) if handler else a.func(a)


if __name__ == "__main__":
    sys.exit(main())
