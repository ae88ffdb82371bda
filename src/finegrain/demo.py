"""``finegrain demo``: every method against its baseline on generated data, on CPU.

Each entry trains a method and its baseline twin with the same budget (same data, schedule,
seed and backbone; the method's additions are the only difference), evaluates both with the
task's protocol and prints one table. Runs are ``finegrain train`` subprocesses, ``--jobs`` at
a time with one thread each (2 cores: 2 jobs). ``--seeds 3`` repeats every run with seeds
0, 1, 2 and reports mean and standard deviation. Every run keeps its run folder under
``--out``; the demo adds ``demo.json`` and attention pictures (``<entry>_explain.png``).

The configurations are tiny on purpose (64 px, a 4-block hybrid ViT-Ti, small ResNet-18s):
DESIGN.md's budget is 10 minutes for everything on 2 CPU cores. They show each pipeline end to
end and how the methods behave from scratch with little data and compute; the paper-size
recipes are in ``recipes/``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import yaml

# A hybrid ViT-Ti (ResNet stem, stride 4, then 2x2 patches: 8x8 tokens at 64 px): from scratch
# it learns the parts within the demo budget, a plain patch-8 ViT does not.
_VIT = {"patch_size": 2, "embed_dim": 96, "depth": 4, "num_heads": 3}
_RESNET = {"channels": [16, 32, 64, 128], "stem_width": 16}
_FGVC_CFG = {"num_classes": 10, "train_per_class": 80, "test_per_class": 20, "size": 64,
             "seed": 0}
_FGVC_DATA = {"dataset": "synthetic_fgvc", "img_size": 64, "resize_size": 64, "batch_size": 32,
              "num_workers": 0, "dataset_kwargs": {"config": _FGVC_CFG}}
_REID_DATA = {"dataset": "synthetic_reid", "img_size": [64, 32], "batch_size": 32,
              "sampler": "pk", "num_instances": 4, "num_workers": 0,
              "dataset_kwargs": {"config": {"num_train_ids": 32, "num_test_ids": 24,
                                            "num_cameras": 4, "images_per_camera": 3,
                                            "height": 128, "width": 64, "seed": 0}}}
_DML_DATA = {"dataset": "synthetic_dml", "img_size": 64, "resize_size": 64, "batch_size": 32,
             "sampler": "pk", "num_instances": 4, "num_workers": 0,
             "dataset_kwargs": {"config": {**_FGVC_CFG, "num_classes": 24,
                                           "train_per_class": 20, "test_per_class": 10}}}
_LANDMARK_DATA = {"dataset": "synthetic_landmarks", "img_size": 64, "batch_size": 32,
                  "num_workers": 0}
_TRAINER = {"accelerator": "cpu", "precision": "32-true", "log_every_n_steps": 10,
            "num_sanity_val_steps": 0, "enable_model_summary": False,
            "enable_progress_bar": False}
_OFF_DCAL = {"glca": False, "pwca": False}


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


def demo_entries() -> list[DemoEntry]:
    """The demo table, in order (each recipe is a plain ``finegrain train`` config)."""
    vit = {"img_size": 64, "drop_path_rate": 0.0, "backbone_kwargs": _VIT}
    reid_vit = {**vit, "img_size": [64, 32], "task": "reid"}
    dcal = "dcal_vit_tiny_r_s16_p8_224"
    tasn = {"sample_size": 64, "attention_size": 64, "backbone_kwargs": _RESNET,
            "attention_backbone_kwargs": _RESNET}
    dml = {"embedding_dim": 128, "backbone_kwargs": _RESNET}
    dalg = {"img_size": 64, "global_dim": 96, "local_dim": 96, "embedding_dim": 64,
            "window_size": 4, "fusion_heads": 3, "drop_path_rate": 0.0, "backbone_kwargs":
                {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}}
    return [
        # DCAL's baselines are its twins (glca = pwca = False): the plain ViT on the same
        # code path, tested equal to timm's ViT
        DemoEntry("fgvc", "DCAL vs ViT (FGVC)",
                  _recipe(dcal, {**vit, "task": "fgvc"}, _FGVC_DATA, 32, 1e-3),
                  _recipe(dcal, {**vit, "task": "fgvc", **_OFF_DCAL}, _FGVC_DATA, 32, 1e-3),
                  ("top1",)),
        DemoEntry("reid", "DCAL vs ViT (Re-ID)",
                  _recipe(dcal, reid_vit, _REID_DATA, 30, 1e-3),
                  _recipe(dcal, {**reid_vit, **_OFF_DCAL}, _REID_DATA, 30, 1e-3),
                  ("mAP", "R1"), explain_pair=True),
        DemoEntry("tasn", "TASN vs ResNet-18",
                  _recipe("tasn_resnet18", tasn, {**_FGVC_DATA, "img_size": 64,
                                                  "resize_size": 64}, 10, 2e-3),
                  _recipe("resnet18", {"backbone_kwargs": _RESNET}, _FGVC_DATA, 10, 2e-3),
                  ("top1",)),
        DemoEntry("dml", "Cross-image attn vs DML baseline",
                  _recipe("cross_image_resnet18", dml, _DML_DATA, 12, 1e-3),
                  _recipe("cross_image_resnet18", {**dml, "cross_attention": False}, _DML_DATA,
                          12, 1e-3), ("R@1", "MAP@R")),
        DemoEntry("dalg", "DALG vs ViT global (retrieval)",
                  _recipe("dalg_deit_tiny_patch16_224", dalg, _LANDMARK_DATA, 12, 1e-3),
                  _recipe("dalg_deit_tiny_patch16_224", {**dalg, "local": "none",
                                                         "fusion": "none"},
                          _LANDMARK_DATA, 12, 1e-3),
                  ("medium/mAP", "hard/mAP"), post="retrieval"),
    ]


def _write_recipe(recipe: dict, run_dir: str, seed: int) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "recipe.yaml")
    r = copy.deepcopy(recipe)
    r["seed_everything"] = seed
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path


def _prepare_data(recipe: dict) -> None:
    """Generate a run's dataset once, before parallel runs race to write the same cache."""
    from .data.registry import build_dataset
    d = recipe["data"]
    build_dataset(d["dataset"], d.get("root"), "train", **d.get("dataset_kwargs", {}))


def _train(recipe_path: str, run_dir: str, threads: int) -> tuple[float, str | None]:
    """One ``finegrain train`` subprocess; returns (seconds, error or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        p = subprocess.run([sys.executable, "-m", "finegrain", "train", "--config", recipe_path,
                            "--run-dir", run_dir], stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        with open(os.path.join(run_dir, "train.log")) as f:
            return time.time() - t0, "".join(f.readlines()[-15:])
    return time.time() - t0, None


def _evaluate(entry: DemoEntry, recipe: dict, run_dir: str) -> dict:
    if entry.post == "retrieval":
        from .retrieval.pipeline import retrieval_eval
        d = recipe["data"]
        r = retrieval_eval(os.path.join(run_dir, "last.ckpt"), d["dataset"], d.get("root"),
                           out=run_dir)
        return {f"{s}/{k}": v for s, dd in r.items() if isinstance(dd, dict)
                for k, v in dd.items()}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        final = json.load(f)["final"]
    return {k: v for k, v in final.items() if np.isscalar(v)}


def _explain_picture(entry: DemoEntry, run_dir: str, out_png: str) -> str | None:
    from .cli import explain
    from .data.registry import build_dataset
    from .models.registry import load_model
    ckpt = os.path.join(run_dir, "last.ckpt")
    model, meta = load_model(ckpt)
    if not hasattr(model, "explain"):
        return None
    data = entry.method["data"]
    kw = data.get("dataset_kwargs", {})
    split = {"reid": "query", "retrieval": "query"}.get(meta.get("task"), "test")
    ds = build_dataset(data["dataset"], data.get("root"), split, **kw)
    if entry.explain_pair:
        gallery = build_dataset(data["dataset"], data.get("root"), "gallery", **kw)
        q = ds.samples[0]
        match = next(s.path for s in gallery.samples if s.label == q.label and s.camid != q.camid)
        return explain(ckpt, [], out_png, pair=[q.path, match], loaded=(model, meta))
    paths = [s.path for s in ds.samples[:: max(1, len(ds) // 4)][:4]]
    return explain(ckpt, paths, out_png, loaded=(model, meta))


def format_table(rows: list[dict]) -> str:
    """The demo table: baseline vs method per entry and metric (percent, mean +- std)."""
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "failed"
        m = 100 * float(np.mean(vals))
        return f"{m:5.1f}" if len(vals) == 1 else f"{m:5.1f}+-{100 * float(np.std(vals)):.1f}"

    lines = [f"{'entry':<6} {'comparison':<32} {'metric':<11} {'baseline':>11} {'method':>11} "
             f"{'delta':>7} {'train s':>8}"]
    for r in rows:
        for i, m in enumerate(r["metrics"]):
            b = [x.get(m) for x in r["baseline"]]
            a = [x.get(m) for x in r["method"]]
            ok = all(v is not None for v in a + b)
            delta = f"{100 * (np.mean(a) - np.mean(b)):+6.1f}" if ok else "    n/a"
            t = f"{sum(x.get('time_s', 0) for x in r['baseline'] + r['method']):8.0f}" \
                if i == 0 else ""
            lines.append(f"{r['name'] if i == 0 else '':<6} {r['label'] if i == 0 else '':<32} "
                         f"{m:<11} {cell(b):>11} {cell(a):>11} {delta:>7} {t:>8}")
    return "\n".join(lines)


def run_demo(seeds: int = 1, out: str = "runs/demo", only: list[str] | None = None,
             jobs: int = 2, threads: int = 1) -> list[dict]:
    """Run the demo; prints the table, writes ``demo.json`` and pictures under ``out``.

    Raises:
        RuntimeError: a run failed (after the table is printed; its log is named).
    """
    from tqdm import tqdm
    t0 = time.time()
    entries = [e for e in demo_entries() if not only or e.name in only]
    rows = {e.name: {"name": e.name, "label": e.label, "metrics": list(e.metrics),
                     "baseline": [{} for _ in range(seeds)],
                     "method": [{} for _ in range(seeds)]} for e in entries}
    work = []
    for e in entries:
        for seed in range(seeds):
            for which in ("method", "baseline"):  # methods first: they are the longer runs
                recipe = getattr(e, which)
                run_dir = os.path.join(out, f"{e.name}-{which}-seed{seed}")
                work.append((e, which, seed, recipe, run_dir))
    for e in entries:
        _prepare_data(e.method)
        _prepare_data(e.baseline)
    failures = []
    bar = tqdm(total=len(work), desc="demo runs", unit="run")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_train, _write_recipe(r, d, s), d, threads): (e, w, s, r, d)
                   for e, w, s, r, d in work}
        for fut in as_completed(futures):
            e, which, seed, recipe, run_dir = futures[fut]
            seconds, err = fut.result()
            res = {"time_s": seconds, "run_dir": run_dir}
            if err is None:
                try:
                    res.update(_evaluate(e, recipe, run_dir))
                except Exception as ex:  # noqa: BLE001  (reported in the table and below)
                    err = f"evaluation failed: {ex}"
            if err is not None:
                res["error"] = err
                failures.append(f"{run_dir}: {err}")
            rows[e.name][which][seed] = res
            bar.update(1)
            bar.write(f"  {run_dir}: {seconds:.0f} s" + (" FAILED" if err else ""))
    bar.close()
    for e in entries:
        m0 = rows[e.name]["method"][0]
        if "error" not in m0:
            try:
                rows[e.name]["picture"] = _explain_picture(
                    e, m0["run_dir"], os.path.join(out, f"{e.name}_explain.png"))
            except Exception as ex:  # noqa: BLE001  (a picture must not fail the demo)
                rows[e.name]["picture_error"] = str(ex)
    table = format_table(list(rows.values()))
    total = time.time() - t0
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"seeds": seeds, "total_time_s": total, "rows": list(rows.values())}, f,
                  indent=1, default=float)
    print("\n" + table)
    print(f"\ntotal {total:.0f} s on {jobs} parallel job(s); run folders, demo.json and "
          f"*_explain.png in {out}")
    if failures:
        raise RuntimeError("demo runs failed:\n" + "\n".join(failures))
    return list(rows.values())
