"""``finegrain demo``: every method against its baseline on generated data, in the papers' regime.

Every paper fine-tunes an ImageNet-pretrained backbone; none claims anything from scratch. So
the demo does the same at toy scale, on CPU:

1. **Pretraining**, once per backbone family (the hybrid R+ViT-Ti of DCAL / DALG, the small
   ResNet-18 of TASN / DML and the CNN baseline): an ordinary ``finegrain train`` run that
   classifies 16 generated classes whose part combinations are *disjoint* from every
   fine-tuning set (``class_offset=32``: positions 32-47 of the generator's permutation; the
   fine-tuning sets use positions 0-31). It is cached in ``OUT/pretrain-<family>/`` and
   reused when its recipe is unchanged.
2. **Fine-tuning**: every arm of every entry starts from those same weights
   (``--init-weights OUT/pretrain-<family>/weights.safetensors``) with a small learning rate,
   same data, schedule and seed; the arms differ in one switch only.
3. **Paired statistics** over seeds (``--seeds N``): per comparison and metric, the baseline
   and method means, the mean paired difference with its 95% Student-t interval (ddof 1,
   :func:`finegrain.evaluation.stats.paired_difference`), the seeds the method won, the test-set
   size and the binomial error of one run. A verdict is given only where the interval excludes
   zero. ``summary.png`` draws the paired differences with their intervals.

``--ablations`` adds the arms that test each mechanism: DCAL with random instead of rollout
selection, GLCA only, PWCA only, and a baseline trained 2x as long (DCAL's training step costs
~2x the baseline's); TASN with a uniform attention map (same compute) and a ResNet baseline
trained 5x as long (TASN's step costs ~5x at these sizes); cross-image attention with
``cond_weight = 0``; DALG with orthogonal fusion (DOLG) as well as cross-attention and none.

Runs are ``finegrain train`` subprocesses, ``--jobs`` at a time with one thread each; while
they run, the progress line shows each running job's step and ETA (from its run folder's
``progress.json``). Everything lands under ``--out``: run folders, ``demo.json``,
``summary.png`` and one attention picture per entry (``<entry>_explain.png``). A run that
finished in an earlier demo into the same ``--out`` (same recipe, same seed) is reused and only
re-evaluated, so an interrupted or partly failed demo continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import yaml

from .models.registry import model_config
from .models.tiny import DEMO_RESNET, DEMO_SIZE, DEMO_VIT

__all__ = ["PRETRAIN_EPOCHS", "FINETUNE_LR", "pretrain_recipes", "Comparison", "DemoEntry",
           "demo_entries", "run_demo", "format_table"]

# ---- data (fixed before any comparison was run: docs/demo.md) -----------------------------
# Fine-tuning sets draw their classes / identities from positions 0..31 of the generator's
# permutation of the 64 part combinations; pretraining uses positions 32..47.
_FINETUNE_POOL = 32
_PRETRAIN_CFG = {"num_classes": 16, "class_offset": _FINETUNE_POOL, "train_per_class": 80,
                 "test_per_class": 10, "size": DEMO_SIZE, "seed": 0}
_FGVC_CFG = {"num_classes": 10, "train_per_class": 80, "test_per_class": 20, "size": DEMO_SIZE,
             "seed": 0}
# The demo reports the last checkpoint of a fixed schedule: its training-time evaluation on the
# test split draws curves and chooses nothing (val_split test). DML keeps the resize + random
# crop its table was run with (train_crop), not the random-resized crop of the DML default.
_PRETRAIN_DATA = {"val_split": "test", "dataset": "synthetic_fgvc", "img_size": DEMO_SIZE, "resize_size": DEMO_SIZE,
                  "batch_size": 32, "num_workers": 0, "dataset_kwargs": {"config": _PRETRAIN_CFG}}
_FGVC_DATA = {"val_split": "test", "dataset": "synthetic_fgvc", "img_size": DEMO_SIZE, "resize_size": DEMO_SIZE,
              "batch_size": 32, "num_workers": 0, "dataset_kwargs": {"config": _FGVC_CFG}}
_REID_DATA = {"val_split": "test", "dataset": "synthetic_reid", "img_size": [DEMO_SIZE, DEMO_SIZE // 2],
              "batch_size": 32, "sampler": "pk", "num_instances": 4, "num_workers": 0,
              "dataset_kwargs": {"config": {"num_train_ids": 20, "num_test_ids": 12,
                                            "num_cameras": 4, "images_per_camera": 3,
                                            "height": 128, "width": 64, "seed": 0}}}
_DML_DATA = {"val_split": "test", "train_crop": "resize_crop", "dataset": "synthetic_dml", "img_size": DEMO_SIZE, "resize_size": DEMO_SIZE,
             "batch_size": 32, "sampler": "pk", "num_instances": 4, "num_workers": 0,
             "dataset_kwargs": {"config": {**_FGVC_CFG, "num_classes": 24,
                                           "train_per_class": 20, "test_per_class": 10}}}
_LANDMARK_DATA = {"dataset": "synthetic_landmarks", "img_size": DEMO_SIZE, "batch_size": 32,
                  "num_workers": 0}
_TRAINER = {"accelerator": "cpu", "precision": "32-true", "log_every_n_steps": 10,
            "num_sanity_val_steps": 0, "enable_model_summary": False,
            "enable_progress_bar": False}

# ---- schedules (fixed a priori, not tuned on which arm wins) --------------------------------
# Pretraining from scratch at lr 1e-3, 40 steps / epoch: the ViT 30 epochs (1,200 steps), the
# ResNet 20 (800 steps; at 1,600 it was at 96% after 21 epochs and flat from there), so that
# `make demo` fits 10 minutes on a fresh clone (docs/demo.md).
PRETRAIN_EPOCHS = {"vit": 30, "resnet": 20}
FINETUNE_LR = 3e-4  # the papers fine-tune at a fraction of the from-scratch rate
DCAL_COST, TASN_COST = 2, 5  # training-step cost vs the baseline (equal-compute arms)

_DCAL = "dcal_vit_tiny_r_s16_p8_224"
_VIT_KW = {"img_size": DEMO_SIZE, "drop_path_rate": 0.0, "backbone_kwargs": DEMO_VIT}


def _recipe(model_name: str, model_kwargs: dict, data: dict, epochs: int, lr: float = FINETUNE_LR,
            weight_decay: float = 0.05, family: str | None = None) -> dict:
    """A plain ``finegrain train`` config building what ``create_model(model_name,
    **model_kwargs)`` builds (``model.model``: its ``class_path`` / ``init_args``; the input
    size comes from ``data.img_size``, linked); ``family``: the pretrained weights it starts
    from (recorded under the demo-only key ``init_family``, removed before the file is
    written)."""
    model = model_config(model_name, **copy.deepcopy(model_kwargs))
    size = model["init_args"].pop("img_size", data["img_size"])
    if size != data["img_size"]:
        raise ValueError(f"{model_name}: img_size {size} is not data.img_size {data['img_size']}")
    r = {"trainer": {**_TRAINER, "max_epochs": epochs},
         "model": {"model": model,
                   "optimizer": {"class_path": "torch.optim.AdamW",
                                 "init_args": {"lr": lr, "weight_decay": weight_decay}},
                   "warmup_epochs": 1},
         "data": copy.deepcopy(data)}
    if family is not None:
        r["init_family"] = family
    return r


def pretrain_recipes() -> dict[str, dict]:
    """The pretraining run of each backbone family (16 classes disjoint from fine-tuning)."""
    return {
        "vit": _recipe(_DCAL, {**_VIT_KW, "task": "classification", "glca": False, "pwca": False},
                       _PRETRAIN_DATA, PRETRAIN_EPOCHS["vit"], lr=1e-3),
        "resnet": _recipe("resnet18", {"backbone_kwargs": DEMO_RESNET}, _PRETRAIN_DATA,
                          PRETRAIN_EPOCHS["resnet"], lr=1e-3),
    }


@dataclass
class Comparison:
    """``method`` arm vs ``baseline`` arm (arm keys of the entry), paired by seed."""

    method: str
    baseline: str
    label: str
    ablation: bool = False


@dataclass
class DemoEntry:
    """One task: its arms (``finegrain train`` recipes) and the comparisons between them."""

    name: str
    metrics: tuple[str, ...]
    arms: dict[str, dict]
    comparisons: list[Comparison]
    ablation_arms: tuple[str, ...] = ()
    explain_arm: str = "method"
    explain_pair: bool = False
    post: str | None = None  # "retrieval": evaluate with the retrieval pipeline after training
    eval_split: str = "test"

    def arms_to_run(self, ablations: bool) -> list[str]:
        return [a for a in self.arms if ablations or a not in self.ablation_arms]

    def comparisons_to_report(self, ablations: bool) -> list[Comparison]:
        return [c for c in self.comparisons if ablations or not c.ablation]


def demo_entries() -> list[DemoEntry]:
    """The demo's entries, in order (each arm is a plain ``finegrain train`` config)."""
    fgvc = {**_VIT_KW, "task": "classification"}
    on, off = {"glca": True, "pwca": True}, {"glca": False, "pwca": False}
    reid = {**_VIT_KW, "img_size": _REID_DATA["img_size"], "task": "reid"}
    tasn = {"sample_size": DEMO_SIZE, "attention_size": DEMO_SIZE, "backbone_kwargs": DEMO_RESNET,
            "attention_backbone_kwargs": DEMO_RESNET}
    dml = {"embedding_dim": 128, "backbone_kwargs": DEMO_RESNET}
    dalg = {"img_size": DEMO_SIZE, "global_dim": 96, "local_dim": 96, "embedding_dim": 64,
            "window_size": 4, "fusion_heads": 3, "drop_path_rate": 0.0,
            "backbone_kwargs": DEMO_VIT}
    E = 8  # fine-tuning epochs on synthetic_fgvc (25 steps each)
    return [
        DemoEntry("fgvc", ("top1",), {
            "method": _recipe(_DCAL, {**fgvc, **on}, _FGVC_DATA, E, family="vit"),
            "baseline": _recipe(_DCAL, {**fgvc, **off}, _FGVC_DATA, E, family="vit"),
            "random": _recipe(_DCAL, {**fgvc, **on, "glca_selection": "random"}, _FGVC_DATA, E,
                              family="vit"),
            "glca_only": _recipe(_DCAL, {**fgvc, "glca": True, "pwca": False}, _FGVC_DATA, E,
                                 family="vit"),
            "pwca_only": _recipe(_DCAL, {**fgvc, "glca": False, "pwca": True}, _FGVC_DATA, E,
                                 family="vit"),
            "baseline_long": _recipe(_DCAL, {**fgvc, **off}, _FGVC_DATA, DCAL_COST * E,
                                     family="vit")},
            [Comparison("method", "baseline", "DCAL vs ViT (FGVC)"),
             Comparison("method", "random", "DCAL: rollout vs random selection", True),
             Comparison("glca_only", "baseline", "GLCA only vs ViT", True),
             Comparison("pwca_only", "baseline", "PWCA only vs ViT", True),
             Comparison("method", "baseline_long", f"DCAL vs ViT x{DCAL_COST} steps", True)],
            ablation_arms=("random", "glca_only", "pwca_only", "baseline_long")),
        DemoEntry("reid", ("mAP", "R1"), {
            "method": _recipe(_DCAL, {**reid, **on}, _REID_DATA, 24, family="vit"),
            "baseline": _recipe(_DCAL, {**reid, **off}, _REID_DATA, 24, family="vit")},
            [Comparison("method", "baseline", "DCAL vs ViT (Re-ID)")],
            explain_pair=True, eval_split="query"),
        DemoEntry("tasn", ("top1",), {
            "method": _recipe("tasn_resnet18", tasn, _FGVC_DATA, E, family="resnet"),
            "baseline": _recipe("resnet18", {"backbone_kwargs": DEMO_RESNET}, _FGVC_DATA, E,
                                family="resnet"),
            "uniform": _recipe("tasn_resnet18", {**tasn, "sampler_map": "uniform"},
                               _FGVC_DATA, E, family="resnet"),
            "baseline_long": _recipe("resnet18", {"backbone_kwargs": DEMO_RESNET}, _FGVC_DATA,
                                     TASN_COST * E, family="resnet")},
            [Comparison("method", "baseline", "TASN vs ResNet-18"),
             Comparison("method", "uniform", "TASN: attention vs uniform map", True),
             Comparison("method", "baseline_long", f"TASN vs ResNet-18 x{TASN_COST} steps", True)],
            ablation_arms=("uniform", "baseline_long")),
        DemoEntry("dml", ("R@1", "MAP@R"), {
            "method": _recipe("cross_image_resnet18", dml, _DML_DATA, 24, family="resnet"),
            "baseline": _recipe("cross_image_resnet18", {**dml, "cross_attention": False},
                                _DML_DATA, 24, family="resnet"),
            "lambda0": _recipe("cross_image_resnet18", {**dml, "cond_weight": 0.0}, _DML_DATA,
                               24, family="resnet")},
            [Comparison("method", "baseline", "Cross-image attn vs DML baseline"),
             Comparison("method", "lambda0", "Cross-image: lambda 1 vs 0", True)],
            ablation_arms=("lambda0",)),
        DemoEntry("dalg", ("medium/mAP", "hard/mAP"), {
            "method": _recipe("dalg_vit_tiny_r_s16_p8_224", dalg, _LANDMARK_DATA, 10,
                              family="vit"),
            "baseline": _recipe("dalg_vit_tiny_r_s16_p8_224",
                                {**dalg, "local": "none", "fusion": "none"}, _LANDMARK_DATA,
                                10, family="vit"),
            "orthogonal": _recipe("dalg_vit_tiny_r_s16_p8_224", {**dalg, "fusion": "orthogonal"},
                                  _LANDMARK_DATA, 10, family="vit")},
            [Comparison("method", "baseline", "DALG vs ViT global (retrieval)"),
             Comparison("orthogonal", "baseline", "DALG orthogonal fusion vs global", True),
             Comparison("method", "orthogonal", "DALG: cross-attn vs orthogonal fusion", True)],
            ablation_arms=("orthogonal",), post="retrieval", eval_split="query"),
    ]


# ---- running --------------------------------------------------------------------------------

def _recipe_path(run_dir: str) -> str:
    """A run's recipe file, beside its folder (``finegrain train`` refuses a run folder that
    holds other files than a run's)."""
    return run_dir.rstrip(os.sep) + ".recipe.yaml"


def _log_path(run_dir: str) -> str:
    return run_dir.rstrip(os.sep) + ".train.log"


def _write_recipe(recipe: dict, run_dir: str, seed: int) -> str:
    path = _recipe_path(run_dir)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    r = copy.deepcopy(recipe)
    r.pop("init_family", None)
    r["seed_everything"] = seed
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path


def _prepare_data(recipe: dict) -> None:
    """Generate a run's dataset once, before parallel runs race to write the same cache."""
    from .data.registry import build_dataset
    d = recipe["data"]
    build_dataset(d["dataset"], d.get("root"), "train", **d.get("dataset_kwargs", {}))


def _train(recipe_path: str, run_dir: str, threads: int,
           init: str | None = None) -> tuple[float, str | None]:
    """One ``finegrain train`` subprocess into ``run_dir`` (replacing an unfinished or older
    run there: the demo owns its folders); its output goes to the log beside the folder.
    Returns (seconds, error or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "finegrain", "train", "--config", recipe_path,
           "--run-dir", run_dir, "--overwrite", "true"]
    if init is not None:
        cmd += ["--init-weights", init]
    t0 = time.time()
    with open(_log_path(run_dir), "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        with open(_log_path(run_dir)) as f:
            return time.time() - t0, "".join(f.readlines()[-15:])
    return time.time() - t0, None


def _finished(recipe: dict, run_dir: str, seed: int) -> bool:
    """A run of exactly this recipe and seed finished in ``run_dir`` earlier (its recipe file
    matches and the run wrote ``weights.safetensors``, which happens when fitting ends)."""
    try:
        with open(_recipe_path(run_dir)) as f:
            old = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    new = copy.deepcopy(recipe)
    new.pop("init_family", None)
    new["seed_everything"] = seed
    return old == new and os.path.isfile(os.path.join(run_dir, "weights.safetensors"))


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


def _test_size(entry: DemoEntry) -> int:
    """Number of evaluation queries / test images of the entry (for the binomial error)."""
    from .data.registry import build_dataset
    d = entry.arms["method"]["data"]
    return len(build_dataset(d["dataset"], d.get("root"), entry.eval_split,
                             **d.get("dataset_kwargs", {})))


def _explain_picture(entry: DemoEntry, run_dir: str, out_png: str) -> str | None:
    from .inference import explain
    from .data.registry import build_dataset
    from .loading import open_model
    ckpt = os.path.join(run_dir, "last.ckpt")
    loaded = open_model(ckpt)
    model, meta = loaded.model, loaded.meta
    if not hasattr(model, "explain"):
        return None
    data = entry.arms[entry.explain_arm]["data"]
    kw = data.get("dataset_kwargs", {})
    split = {"reid": "query", "retrieval": "query"}.get(meta.task, "test")
    ds = build_dataset(data["dataset"], data.get("root"), split, **kw)
    if entry.explain_pair:
        gallery = build_dataset(data["dataset"], data.get("root"), "gallery", **kw)
        q = ds.samples[0]
        match = next(s.path for s in gallery.samples if s.label == q.label and s.camid != q.camid)
        return explain(ckpt, [], out_png, pair=[q.path, match], loaded=loaded)[0]
    paths = [s.path for s in ds.samples[:: max(1, len(ds) // 4)][:4]]
    return explain(ckpt, paths, out_png, loaded=loaded)[0]


class _Progress:
    """One progress line: finished runs, and each running job's step / total and ETA."""

    def __init__(self, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc="demo runs", unit="run", dynamic_ncols=True)
        self.running: dict[str, str] = {}  # label -> run folder
        self.lock = threading.Lock()

    def start(self, label: str, run_dir: str) -> None:
        with self.lock:
            self.running[label] = run_dir

    def done(self, label: str, message: str) -> None:
        with self.lock:
            self.running.pop(label, None)
        self.bar.update(1)
        self.bar.write(message)

    def refresh(self) -> None:
        parts = []
        with self.lock:
            items = list(self.running.items())
        for label, run_dir in items:
            try:
                with open(os.path.join(run_dir, "progress.json")) as f:
                    p = json.load(f)
            except (OSError, ValueError):
                parts.append(f"{label} starting")
                continue
            eta = f" eta {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
            parts.append(f"{label} {p['step']}/{p.get('total') or '?'}{eta}")
        self.bar.set_postfix_str(" | ".join(parts), refresh=True)

    def close(self) -> None:
        self.bar.close()


def run_demo(seeds: int = 1, out: str = "runs/demo", only: list[str] | None = None,
             jobs: int = 2, threads: int = 1, ablations: bool = False) -> list[dict]:
    """Pretrain (cached), fine-tune every arm for every seed, print the paired table; writes
    ``demo.json``, ``summary.png`` and the attention pictures under ``out``.

    Raises:
        RuntimeError: a run failed (after the table is printed; its log is named).
    """
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    entries = [e for e in demo_entries() if not only or e.name in only]
    if not entries:
        raise ValueError(f"--only {only}: no such entry; choose from "
                         f"{[e.name for e in demo_entries()]}")
    pre = pretrain_recipes()
    families = sorted({e.arms[a]["init_family"] for e in entries
                       for a in e.arms_to_run(ablations)})
    for r in [pre[f] for f in families] + [e.arms[a] for e in entries for a in e.arms_to_run(
            ablations)]:
        _prepare_data(r)

    ready = {f: threading.Event() for f in families}
    pre_error: dict[str, str] = {}
    results: dict[tuple[str, str, int], dict] = {}
    failures: list[str] = []
    # the ResNet family first: its pretraining is shorter, its fine-tuning jobs can start early
    order = {"resnet": 0, "vit": 1}
    work = []
    for f in families:
        d = os.path.join(out, f"pretrain-{f}")
        work.append(("pretrain", f, d, pre[f], 0, None))
    fine = []
    for e in entries:
        for seed in range(seeds):
            for a in e.arms_to_run(ablations):
                r = e.arms[a]
                fine.append((order.get(r["init_family"], 9), seed, e, a, r))
    fine.sort(key=lambda w: (w[0], w[1]))
    for _, seed, e, a, r in fine:
        work.append(("finetune", e, os.path.join(out, f"{e.name}-{a}-seed{seed}"), r, seed, a))

    progress = _Progress(len(work))

    def job(kind, what, run_dir, recipe, seed, arm):
        if kind == "pretrain":
            label = f"pretrain-{what}"
            progress.start(label, run_dir)
            if _finished(recipe, run_dir, 0):
                ready[what].set()
                progress.done(label, f"  {run_dir}: cached")
                return
            seconds, err = _train(_write_recipe(recipe, run_dir, 0), run_dir, threads)
            if err:
                pre_error[what] = err
                failures.append(f"{run_dir}: {err}")
            ready[what].set()
            progress.done(label, f"  {run_dir}: {seconds:.0f} s" + (" FAILED" if err else ""))
            return
        fam = recipe["init_family"]
        label = f"{what.name}/{arm}/s{seed}"
        ready[fam].wait()
        res = {"run_dir": run_dir}
        if fam in pre_error:
            res["error"] = f"pretraining {fam} failed"
            results[(what.name, arm, seed)] = res
            progress.done(label, f"  {run_dir}: skipped (pretraining failed)")
            return
        progress.start(label, run_dir)
        init = os.path.join(out, f"pretrain-{fam}", "weights.safetensors")
        if recipe["model"]["model"]["class_path"].endswith(".TASN"):
            # TASN's attention net is a second ResNet: it starts from the same weights
            recipe = copy.deepcopy(recipe)
            recipe["model"]["model"]["init_args"]["attention_pretrained"] = init
        if _finished(recipe, run_dir, seed):  # an earlier demo into the same --out: reuse
            seconds, err, note = 0.0, None, " (finished earlier, reused)"
        else:
            seconds, err = _train(_write_recipe(recipe, run_dir, seed), run_dir, threads, init)
            note = ""
        res["time_s"] = seconds
        if err is None:
            try:
                res.update(_evaluate(what, recipe, run_dir))
            except Exception as ex:  # noqa: BLE001  (reported in the table and below)
                err = f"evaluation failed: {ex}"
        if err is not None:
            res["error"] = err
            failures.append(f"{run_dir}: {err}")
        results[(what.name, arm, seed)] = res
        progress.done(label, f"  {run_dir}: {seconds:.0f} s{note}" + (" FAILED" if err else ""))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(job, *w) for w in work}
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()
            progress.refresh()
    progress.close()

    rows = []
    for e in entries:
        n_test = _test_size(e)
        arms = {a: [results.get((e.name, a, s), {"error": "not run"}) for s in range(seeds)]
                for a in e.arms_to_run(ablations)}
        row = {"name": e.name, "metrics": list(e.metrics), "n_test": n_test, "arms": arms,
               "comparisons": []}
        for c in e.comparisons_to_report(ablations):
            row["comparisons"].append({"label": c.label, "method": c.method,
                                       "baseline": c.baseline, "ablation": c.ablation,
                                       "stats": _compare(arms[c.method], arms[c.baseline],
                                                         e.metrics, n_test)})
        m0 = arms[e.explain_arm][0]
        if "error" not in m0:
            try:
                row["picture"] = _explain_picture(e, m0["run_dir"],
                                                  os.path.join(out, f"{e.name}_explain.png"))
            except Exception as ex:  # noqa: BLE001  (a picture must not fail the demo)
                row["picture_error"] = str(ex)
        rows.append(row)
    total = time.time() - t0
    pretraining = {}
    for f in families:
        d = os.path.join(out, f"pretrain-{f}")
        try:
            with open(os.path.join(d, "metrics.json")) as fh:
                best = json.load(fh)["best"]
            pretraining[f] = {"run_dir": d, "top1": best["top1"], "epoch": best["epoch"]}
        except (OSError, KeyError, TypeError, ValueError):
            pretraining[f] = {"run_dir": d}
    table = format_table(rows, seeds)
    pre_line = ", ".join(f"{f} {100 * p['top1']:.1f}%" for f, p in pretraining.items()
                         if "top1" in p)
    if pre_line:
        table += (f"\npretraining (top-1 on its {_PRETRAIN_CFG['num_classes']} disjoint "
                  f"classes): {pre_line}")
    summary = None
    try:
        from .visualize import plot_paired_differences
        summary = plot_paired_differences(rows, os.path.join(out, "summary.png"))
    except Exception as ex:  # noqa: BLE001  (a picture must not fail the demo)
        print(f"could not draw summary.png: {ex}")
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"seeds": seeds, "ablations": ablations, "total_time_s": total,
                   "pretraining": pretraining,
                   "rows": rows}, f, indent=1, default=float)
    print("\n" + table)
    print(f"\ntotal {total:.0f} s on {jobs} parallel job(s); run folders, demo.json, "
          f"{'summary.png, ' if summary else ''}*_explain.png in {out}")
    if failures:
        raise RuntimeError("demo runs failed:\n" + "\n".join(failures))
    return rows


# ---- statistics and the table ---------------------------------------------------------------

_BINOMIAL = ("top1", "top5", "R1", "R@1")  # fractions of test items: binomial error applies


def _compare(method_runs: list[dict], baseline_runs: list[dict], metrics: tuple[str, ...],
             n_test: int) -> dict:
    """Paired statistics per metric over the seeds where both arms finished."""
    from .evaluation.stats import binomial_se, paired_difference
    out = {}
    for m in metrics:
        pairs = [(a.get(m), b.get(m)) for a, b in zip(method_runs, baseline_runs)
                 if a.get(m) is not None and b.get(m) is not None]
        if not pairs:
            out[m] = None
            continue
        st = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
        st["per_seed"] = [{"method": p[0], "baseline": p[1]} for p in pairs]
        st["binomial_se"] = binomial_se(st["baseline_mean"], n_test) if m in _BINOMIAL \
            else None
        out[m] = st
    return out


def format_table(rows: list[dict], seeds: int) -> str:
    """The demo table: per comparison and metric, means, paired difference with its 95%
    interval, seeds won, test size and the binomial error of one run (percent points)."""
    head = (f"{'entry':<5} {'comparison':<40} {'metric':<10} {'baseline':>8} {'method':>8} "
            f"{'diff [95% CI]':>22} {'won':>5} {'verdict':>8} {'n_test':>6} {'1-run se':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for ci, c in enumerate(r["comparisons"]):
            for mi, m in enumerate(r["metrics"]):
                st = c["stats"].get(m)
                name = r["name"] if ci == 0 and mi == 0 else ""
                label = c["label"] if mi == 0 else ""
                if st is None:
                    lines.append(f"{name:<5} {label:<40} {m:<10} {'failed':>8}")
                    continue
                if st["ci_low"] is None:
                    diff = f"{100 * st['diff_mean']:+.1f} (1 seed)"
                else:
                    diff = (f"{100 * st['diff_mean']:+.1f} [{100 * st['ci_low']:+.1f}, "
                            f"{100 * st['ci_high']:+.1f}]")
                se = f"{100 * st['binomial_se']:.1f}" if st["binomial_se"] is not None else "-"
                verdict = {"method": "method", "baseline": "baseline"}.get(st["verdict"], "-")
                lines.append(f"{name:<5} {label:<40} {m:<10} {100 * st['baseline_mean']:8.1f} "
                             f"{100 * st['method_mean']:8.1f} {diff:>22} "
                             f"{st['wins']:>2}/{st['n']:<2} {verdict:>8} {r['n_test']:>6} "
                             f"{se:>8}")
    lines.append(f"\n{seeds} seed(s), paired (same data, same pretrained weights, same seed; one "
                 f"switch differs). diff = method - baseline in points, 95% Student-t interval "
                 f"(ddof 1); a verdict only where it excludes 0. 1-run se: binomial error of one "
                 f"run's accuracy on n_test items.")
    return "\n".join(lines)
