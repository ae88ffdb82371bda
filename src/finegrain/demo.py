"""``finegrain demo``: every method against its baseline on generated data, on CPU.

Each entry trains a method and its baseline twin with the same budget (same data, schedule,
seed and backbone size; the method's additions are the only difference), evaluates both with
the task's protocol and prints one table. ``--seeds 3`` repeats every run with seeds 0, 1, 2
and reports mean and standard deviation. Every run writes its own run folder under ``--out``;
the demo adds ``demo.json`` and attention pictures (``<entry>_explain.png``).

The configurations are tiny on purpose (64 px, 4-block ViTs, ResNet-18): DESIGN.md's demo
budget is 10 minutes for everything on 2 CPU cores. They show the pipelines work end to end
and how the methods behave with little data; the paper-size recipes are in ``recipes/``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import yaml

_VIT = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
_FGVC_DATA = {"dataset": "synthetic_fgvc", "img_size": 64, "resize_size": 72, "batch_size": 32,
              "num_workers": 1,
              "dataset_kwargs": {"config": {"num_classes": 16, "train_per_class": 40,
                                            "test_per_class": 20, "size": 96, "seed": 0}}}
_REID_DATA = {"dataset": "synthetic_reid", "img_size": [64, 32], "batch_size": 32,
              "sampler": "pk", "num_instances": 4, "num_workers": 1,
              "dataset_kwargs": {"config": {"num_train_ids": 24, "num_test_ids": 24,
                                            "num_cameras": 4, "images_per_camera": 3,
                                            "height": 128, "width": 64, "seed": 0}}}
_OFF = {"glca": False, "pwca": False}
_TRAINER = {"accelerator": "cpu", "precision": "32-true", "log_every_n_steps": 5,
            "num_sanity_val_steps": 0, "enable_model_summary": False}


def _recipe(model_name: str, model_kwargs: dict, data: dict, epochs: int, lr: float,
            optimizer: str = "adamw", weight_decay: float = 0.05) -> dict:
    return {"trainer": {**_TRAINER, "max_epochs": epochs},
            "model": {"model_name": model_name, "model_kwargs": model_kwargs,
                      "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
                      "warmup_epochs": 1},
            "data": copy.deepcopy(data)}


@dataclass
class DemoEntry:
    """One comparison: ``method`` vs ``baseline`` recipes, reported on ``metrics``."""

    name: str
    label: str
    method: dict
    baseline: dict
    metrics: tuple[str, ...]
    explain_pair: bool = False
    post: str | None = None  # "retrieval": evaluate with the retrieval pipeline after training
    notes: list[str] = field(default_factory=list)


def demo_entries() -> list[DemoEntry]:
    """The demo table, in order (each recipe is a plain ``finegrain train`` config)."""
    vit = {"img_size": 64, "drop_path_rate": 0.0, "backbone_kwargs": _VIT}
    reid_vit = {**vit, "img_size": [64, 32]}
    return [
        # baselines are the DCAL twins (glca = pwca = False): the same code path, the
        # plain ViT; tested equal to timm's ViT
        DemoEntry("fgvc", "DCAL (GLCA + PWCA) vs ViT",
                  _recipe("dcal_vit_tiny_patch16_224", {**vit, "task": "fgvc"}, _FGVC_DATA, 15, 2e-3),
                  _recipe("dcal_vit_tiny_patch16_224", {**vit, "task": "fgvc", **_OFF},
                          _FGVC_DATA, 15, 2e-3), ("top1",)),
        DemoEntry("reid", "DCAL Re-ID vs ViT",
                  _recipe("dcal_vit_tiny_patch16_224", {**reid_vit, "task": "reid"},
                          _REID_DATA, 10, 1e-3),
                  _recipe("dcal_vit_tiny_patch16_224", {**reid_vit, "task": "reid", **_OFF},
                          _REID_DATA, 10, 1e-3), ("mAP", "R1"), explain_pair=True),
    ]


def _args(recipe: dict, run_dir: str, seed: int) -> list[str]:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "recipe.yaml")
    r = copy.deepcopy(recipe)
    r["seed_everything"] = seed
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return ["--config", path, "--run-dir", run_dir, "--trainer.enable_progress_bar", "true"]


def _final_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)["final"]


def _run(entry: DemoEntry, which: str, seed: int, out: str, cache: str | None) -> dict:
    from .engine.run import train
    from .models.registry import is_model
    recipe = copy.deepcopy(getattr(entry, which))
    if not is_model(recipe["model"]["model_name"]):
        return {"skipped": f"{recipe['model']['model_name']} is not available"}
    if cache:
        recipe["data"]["root"] = cache
    run_dir = os.path.join(out, f"{entry.name}-{which}-seed{seed}")
    t0 = time.time()
    train(_args(recipe, run_dir, seed))
    res = {"time_s": time.time() - t0, "run_dir": run_dir}
    if entry.post == "retrieval":
        from .retrieval.pipeline import retrieval_eval
        r = retrieval_eval(os.path.join(run_dir, "last.ckpt"), recipe["data"]["dataset"],
                           recipe["data"].get("root"), out=run_dir)
        res.update({f"{s}/{k}": v for s, d in r.items() if isinstance(d, dict)
                    for k, v in d.items()})
    else:
        res.update({k: v for k, v in _final_metrics(run_dir).items() if np.isscalar(v)})
    return res


def _explain_picture(entry: DemoEntry, run_dir: str, out_png: str) -> str | None:
    from .cli import explain
    from .data.registry import build_dataset
    from .models.registry import load_model
    ckpt = os.path.join(run_dir, "best.ckpt")
    if not os.path.isfile(ckpt):
        ckpt = os.path.join(run_dir, "last.ckpt")
    model, meta = load_model(ckpt)
    if not hasattr(model, "explain"):
        return None
    data = getattr(entry, "method")["data"]
    split = "query" if meta.get("task") == "reid" else "test"
    ds = build_dataset(data["dataset"], data.get("root"), split, **data.get("dataset_kwargs", {}))
    paths = [s.path for s in ds.samples[:: max(1, len(ds) // 4)][:4]]
    if entry.explain_pair:
        gallery = build_dataset(data["dataset"], data.get("root"), "gallery",
                                **data.get("dataset_kwargs", {}))
        match = next(s.path for s in gallery.samples if s.label == ds.samples[0].label)
        return explain(ckpt, [], out_png, pair=[ds.samples[0].path, match])
    return explain(ckpt, paths, out_png)


def format_table(rows: list[dict]) -> str:
    """The demo table: baseline vs method per entry and metric (percent, mean +- std)."""
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        m = 100 * float(np.mean(vals))
        return f"{m:5.1f}" if len(vals) == 1 else f"{m:5.1f}+-{100 * float(np.std(vals)):.1f}"

    lines = [f"{'entry':<8} {'comparison':<28} {'metric':<10} {'baseline':>12} {'method':>12} "
             f"{'delta':>7} {'time (s)':>9}"]
    for r in rows:
        for m in r["metrics"]:
            b = [x.get(m) for x in r["baseline"]]
            a = [x.get(m) for x in r["method"]]
            ok = all(v is not None for v in a + b)
            delta = f"{100 * (np.mean(a) - np.mean(b)):+6.1f}" if ok else "   n/a"
            t = sum(x.get("time_s", 0) for x in r["baseline"] + r["method"])
            lines.append(f"{r['name']:<8} {r['label']:<28} {m:<10} {cell(b):>12} {cell(a):>12} "
                         f"{delta:>7} {t:9.0f}")
    return "\n".join(lines)


def run_demo(seeds: int = 1, out: str = "runs/demo", only: list[str] | None = None,
             cache: str | None = None) -> list[dict]:
    """Run the demo; prints the table, writes ``demo.json`` and pictures under ``out``."""
    t0 = time.time()
    rows = []
    for entry in demo_entries():
        if only and entry.name not in only:
            continue
        row = {"name": entry.name, "label": entry.label, "metrics": list(entry.metrics),
               "baseline": [], "method": []}
        for seed in range(seeds):
            for which in ("baseline", "method"):
                row[which].append(_run(entry, which, seed, out, cache))
        m0 = row["method"][0]
        if "run_dir" in m0:
            try:
                row["picture"] = _explain_picture(entry, m0["run_dir"],
                                                  os.path.join(out, f"{entry.name}_explain.png"))
            except Exception as e:  # a picture must not fail the demo
                row["picture_error"] = str(e)
        rows.append(row)
    table = format_table(rows)
    total = time.time() - t0
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"seeds": seeds, "total_time_s": total, "rows": rows}, f, indent=1,
                  default=float)
    print("\n" + table)
    print(f"\ntotal {total:.0f} s; run folders, demo.json and *_explain.png in {out}")
    return rows
