"""The ``finegrain`` command (also ``python -m finegrain``).

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

from .errors import EXIT_USER_ERROR, FinegrainError, InputError, nonfinite_outputs, one_paragraph

log = logging.getLogger("finegrain")


# ---- predict ----------------------------------------------------------------------------
def _eval_transform(meta: dict):
    from .data.transforms import build_transform
    task = meta.get("task", "classification")
    if task == "retrieval":  # a batch of pictures: a plain resize, not the longest side
        task = "reid"
    return build_transform(task, False, meta["img_size"],
                           meta.get("resize_size"), tuple(meta["mean"]), tuple(meta["std"]),
                           resize_mode=meta.get("resize_mode", "square"))


def _load_images(paths: list[str], meta: dict):
    import torch
    from .data.datasets.base import read_image
    tf = _eval_transform(meta)
    return torch.stack([tf(read_image(p)) for p in paths])


def predict(checkpoint: str, images: list[str], topk: int = 5) -> list[dict]:
    """Top-k class names and probabilities for each image (``softmax(logits)``)."""
    import torch
    from .models.registry import load_model
    model, meta = load_model(checkpoint)
    task = meta.get("task", "classification")
    if task != "classification":
        raise InputError(f"{checkpoint} is a {task} model: its classes are the training "
                         f"identities, not answers about new images; compare images by their "
                         f"embeddings instead (`finegrain embed`, then `finegrain index search`)")
    names = meta.get("class_names") or [str(i) for i in range(10 ** 6)]
    with torch.no_grad():
        probs = model(_load_images(images, meta))["logits"].float().softmax(-1)
    bad = int((~torch.isfinite(probs).all(1)).sum())
    if bad:
        raise nonfinite_outputs(checkpoint, bad, len(images), "probabilities")
    k = min(topk, probs.shape[1])
    p, i = probs.topk(k, dim=1)
    return [{"image": img, "top": [{"class": names[int(c)], "index": int(c), "prob": float(q)}
                                   for q, c in zip(p[b], i[b])]} for b, img in enumerate(images)]


def _cmd_predict(a) -> int:
    res = predict(a.checkpoint, a.images, a.topk)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['class']}")
    return 0


# ---- eval -------------------------------------------------------------------------------
def evaluate_checkpoint(checkpoint: str, overrides: dict | None = None,
                        devices: int | str = 1, accelerator: str = "auto",
                        progress: bool = True, model_overrides: dict | None = None) -> dict:
    """Evaluate a checkpoint on its dataset's evaluation split (same code path as training,
    DDP-exact). ``overrides``: ``FinegrainDataModule`` arguments (``root`` ...);
    ``model_overrides``: inference-time model arguments (DCAL ``sa_only``, ``glca_selection``)
    that leave the weights unchanged."""
    import lightning.pytorch as pl
    from .engine import FinegrainDataModule, FinegrainModule
    from .models.weights import load_checkpoint_meta, read_weights
    sd, meta = read_weights(checkpoint)  # one read: weights (``model.`` stripped) and meta
    if meta is None:
        load_checkpoint_meta(checkpoint)  # raises, naming what is missing
    if meta.get("task") == "retrieval":
        raise InputError(f"{checkpoint} is a retrieval model: evaluate it with `finegrain "
                         f"retrieval eval {checkpoint} --dataset NAME --root DIR`")
    module = FinegrainModule(meta["model_name"], {**meta["model_kwargs"],
                                                  **(model_overrides or {})})
    module.model.load_state_dict(sd)
    module.set_data_meta(meta)
    data = {"dataset": meta["dataset"], "img_size": meta["img_size"],
            "resize_size": meta.get("resize_size"), "mean": tuple(meta["mean"]),
            "resize_mode": meta.get("resize_mode", "square"),
            "std": tuple(meta["std"]), "num_workers": 2, "batch_size": 64,
            "dataset_kwargs": meta.get("dataset_kwargs")}
    data.update(overrides or {})
    dm = FinegrainDataModule(**data)
    if dm.val_set is None:
        raise InputError(f"dataset {dm.hparams.dataset} has no evaluation split for training-"
                         f"time evaluation; use `finegrain retrieval eval`")
    module.set_data_meta({"num_query": dm._num_query})
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, devices=devices,
                         accelerator=accelerator, use_distributed_sampler=False,
                         enable_model_summary=False, enable_progress_bar=progress)
    trainer.validate(module, datamodule=dm, verbose=False)
    if module.nonfinite_outputs:
        raise nonfinite_outputs(checkpoint, module.nonfinite_outputs, len(dm.val_set))
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in module.last_metrics.items()}


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
    data, model = _overrides(extra)
    res = evaluate_checkpoint(a.checkpoint, data, a.devices, progress=not a.json,
                              model_overrides=model)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            if isinstance(v, float):
                print(f"{k:>8s}  {v * 100:6.2f}" if 0 <= v <= 1 else f"{k:>8s}  {v:.4f}")
    return 0


# ---- explain ----------------------------------------------------------------------------
def explain(checkpoint: str, images: list[str], out: str, pair: list[str] | None = None,
            loaded: tuple | None = None) -> str:
    """Write the model's attention pictures (``model.explain``) for ``images`` to ``out``.
    ``loaded``: the ``(model, meta)`` of ``checkpoint`` when the caller already has them."""
    import torch
    from .models.registry import load_model
    from .visualize import save_explain
    model, meta = loaded if loaded is not None else load_model(checkpoint)
    if not hasattr(model, "explain"):
        raise InputError(f"{meta['model_name']} has no attention to explain (plain baseline); "
                         f"use a DCAL, TASN, DALG or cross-image checkpoint")
    kw, px = {}, None
    if pair:
        if len(pair) != 2:
            raise InputError("--pair takes two images: A B")
        x = _load_images([pair[0]], meta)
        px = _load_images([pair[1]], meta)
        kw["pair"] = px
    elif images:
        x = _load_images(images, meta)
    else:
        raise InputError("explain: give one or more images, or --pair A B")
    with torch.no_grad():
        maps = model.explain(x, **kw)
    return save_explain(x, maps, out, meta["mean"], meta["std"],
                        titles=[os.path.basename(p) for p in (pair[:1] if pair else images)],
                        pair_images=px)


def _cmd_explain(a) -> int:
    print(explain(a.checkpoint, a.images, a.out, a.pair))
    return 0


# ---- data check -------------------------------------------------------------------------
def _cmd_data(a) -> int:
    from .data.check import check_dataset, format_check
    res = check_dataset(a.name, a.root, verify_images=a.verify_images,
                        progress=not a.json and sys.stderr.isatty())
    print(json.dumps(res, indent=1) if a.json else format_check(res))
    return 0


def _cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(seeds=a.seeds, out=a.out, only=a.only, jobs=a.jobs, ablations=a.ablations)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    p = argparse.ArgumentParser(prog="finegrain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="store_true", help="print the version")
    p.add_argument("--debug", action="store_true",
                   help="before the command: show the traceback of an error (also "
                        "FINEGRAIN_DEBUG=1); errors exit with code 2")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train from a YAML recipe (LightningCLI fit; see "
                                 "`finegrain train --help`)", add_help=False)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its dataset (--data.root DIR; "
                                    "--data.<name> VALUE and inference-time --model.<name> "
                                    "VALUE overrides, e.g. --model.sa_only true)")
    e.add_argument("checkpoint")
    e.add_argument("--devices", default=1, help="devices (DDP when > 1: same metrics)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--out", help="write the metrics JSON here")
    pr = sub.add_parser("predict", help="top-k class names and probabilities")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="+")
    pr.add_argument("-k", "--topk", type=int, default=5)
    pr.add_argument("--json", action="store_true")
    ex = sub.add_parser("explain", help="attention pictures of a checkpoint on images")
    ex.add_argument("checkpoint")
    ex.add_argument("images", nargs="*")
    ex.add_argument("--pair", nargs=2, metavar=("A", "B"),
                    help="also draw where A attends in B (pair-wise cross-attention)")
    ex.add_argument("--out", default="explain.png")
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate a dataset on disk; counts per split")
    dc.add_argument("name", help="dataset name (cub200, market1501, ...)")
    dc.add_argument("root")
    dc.add_argument("--json", action="store_true")
    dc.add_argument("--verify-images", action="store_true", help="decode every image")
    dm = sub.add_parser("demo", help="every method vs its baseline on generated data (CPU)")
    dm.add_argument("--seeds", type=int, default=1)
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--only", nargs="*", help="run only these entries (fgvc reid tasn dml dalg)")
    dm.add_argument("--ablations", action="store_true",
                    help="also the arms that test each mechanism (DCAL random selection, GLCA / "
                         "PWCA only, TASN uniform map, cross-image lambda 0, DALG orthogonal "
                         "fusion, equal-compute baselines)")
    dm.add_argument("--jobs", type=int, default=2, help="training runs in parallel (1 thread "
                                                         "each)")
    try:
        from .retrieval.commands import register
    except ModuleNotFoundError as err:  # retrieval pipeline not installed in this build
        if err.name != "finegrain.retrieval.commands":
            raise
    else:
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
               "demo": _cmd_demo}.get(a.command)
    return handler(a) if handler else a.func(a)


if __name__ == "__main__":
    sys.exit(main())
