"""What the engine costs: ``finegrain.engine.train`` (LightningCLI fit) against a bare PyTorch
loop, the data pipeline's rate per worker, and the training step's achieved FLOP/s against a
matmul peak measured in the same run.

Per model, on one ``synthetic_fgvc`` tree generated at the input size:

(a) **engine vs bare loop**: the same registered model (``finegrain.create_model``), AdamW
    with the engine's decay / no-decay groups, the same batches (the data module's first
    epoch, preloaded in memory for the bare loop). The engine step is timed by a Callback from
    ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer and
    scheduler step, logging, hooks); the engine *iteration* (end to end) adds fetching the
    next batch with ``num_workers=0``. The bare loop runs before and after the engine (load on
    a shared machine drifts). Overhead = engine step / bare step - 1, in wall and in process
    CPU time (steadier when other jobs share the cores). One ``last.ckpt`` write is timed and
    amortised over the default ``--checkpoint-every 50``.
(b) **data pipeline**: decode + train transform through a DataLoader with 1 worker
    (first batch, the worker's start, dropped): images/s per worker against the model's
    step rate, and the workers needed to keep the step fed.
(c) **FLOP/s**: the training step's FLOPs (forward + backward) counted by
    ``torch.utils.flop_counter.FlopCounterMode`` under ``sdpa_kernel(SDPBackend.MATH)``,
    divided by the bare step time, fp32 and bf16 (``torch.autocast("cpu")``), as a fraction
    of a (n x n) @ (n x n) matmul peak (best of the timed runs) in the same dtype.

    python benchmarks/engine.py                                  # ViT-S/16, ResNet-50 at 224
    python benchmarks/engine.py --quick                          # tiny models at 64 px
    python benchmarks/engine.py --models resnet50 --batch 16 --steps 8
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops as common_count_flops  # noqa: E402
from common import machine_info, matmul_rates, mean_std  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from finegrain.data.samplers import RandomBatchSampler, SeededDataset  # noqa: E402
from finegrain.data.synthetic import FGVCConfig, generate_cub  # noqa: E402
from finegrain.engine import train  # noqa: E402
from finegrain.engine.datamodule import FinegrainDataModule, _collate  # noqa: E402
from finegrain.engine.module import param_groups  # noqa: E402
from finegrain.models import create_model  # noqa: E402
from finegrain.models.registry import model_arg  # noqa: E402

NUM_CLASSES = 4
LR, WEIGHT_DECAY = 5e-4, 0.05  # FinegrainModule defaults


def matmul_stats(n: int, dtype: torch.dtype, iters: int = 5) -> dict:
    """GFLOP per CPU-second (and per wall second) of (n x n) @ (n x n) in ``dtype``: best of
    ``iters`` (the peak), mean and std; one warm-up."""
    wall, cpu = matmul_rates(n, dtype, iters)
    m, s = mean_std(cpu)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "peak_gflops": max(cpu),
            "mean_gflops": m, "std_gflops": s, "peak_gflops_wall": max(wall)}


def model_kwargs(name: str, img_size: int) -> dict:
    return {"img_size": img_size} if ("vit" in name or "deit" in name) else {}


class StepTimer(Callback):
    """Wall and process-CPU time of every training step (batch start -> batch end) and of
    every iteration (batch end -> batch end, so the next batch's fetch included)."""

    def __init__(self):
        self.step_wall, self.step_cpu, self.iter_wall = [], [], []
        self._start = self._cpu = self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t, c = time.perf_counter(), time.process_time()
        self.step_wall.append(t - self._start)
        self.step_cpu.append(c - self._cpu)
        self.iter_wall.append(t - self._end if self._end is not None else float("nan"))
        self._end = t


def bare_steps(model, opt, batches, warmup: int, autocast: bool = False) -> dict:
    """Time ``len(batches)`` plain training steps; the first ``warmup`` are dropped."""
    wall, cpu = [], []
    model.train()
    for i, b in enumerate(batches):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(b["image"], targets=b["label"])
        loss = sum(v.float() for v in out["losses"].values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


def count_flops(model, batch) -> int:
    """FLOPs of one training step's forward + backward (MATH attention, so it is counted)."""
    model.train()

    def step():
        out = model(batch["image"], targets=batch["label"])
        sum(out["losses"].values()).backward()

    flops = common_count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def data_rate(dm: FinegrainDataModule, batch: int, batches: int = 16, seed: int = 0) -> dict:
    """Decode + train transform with one DataLoader worker: images/s over ``batches`` batches
    (epochs repeated as needed), after a first batch that includes the worker's start."""
    sampler = RandomBatchSampler(len(dm.train_set), batch, seed)
    loader = torch.utils.data.DataLoader(SeededDataset(dm.train_set), batch_sampler=sampler,
                                         num_workers=1, collate_fn=_collate,
                                         persistent_workers=True)
    times, t, epoch = [], time.perf_counter(), 0
    while len(times) < batches + 1:
        sampler.set_epoch(epoch)
        for _ in loader:
            now = time.perf_counter()
            times.append(now - t)
            t = now
        epoch += 1
    per_batch, std = mean_std(times[1:])
    return {"images_per_s": batch / per_batch, "batch_s_mean": per_batch, "batch_s_std": std,
            "batches": len(times) - 1}


def engine_argv(name: str, args, cache: str, cfg: dict, run_dir: str) -> list[str]:
    return ["--run-dir", run_dir, "--checkpoint-every", "0", "--seed_everything", "0",
            "--trainer.max_epochs", "1", "--trainer.max_steps", str(args.warmup + args.steps),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(name, model_kwargs(name, args.img_size)),
            "--model.optimizer.lr", str(LR), "--model.optimizer.weight_decay", str(WEIGHT_DECAY),
            "--data.dataset", "synthetic_fgvc", "--data.root", cache,
            "--data.dataset_kwargs", json.dumps({"config": cfg}), "--data.val_split", "none",
            "--data.img_size", str(args.img_size), "--data.batch_size", str(args.batch),
            "--data.num_workers", "0"]


def bench_model(name: str, args, cache: str, cfg: dict, peaks: dict) -> dict:
    n_steps = args.warmup + args.steps
    dm = FinegrainDataModule("synthetic_fgvc", root=cache, img_size=args.img_size,
                             batch_size=args.batch, num_workers=0, val_split="none",
                             dataset_kwargs={"config": cfg})
    batches = list(islice(dm.train_dataloader(), n_steps))  # the engine's first batches
    assert len(batches) == n_steps, "dataset too small for warm-up + steps"

    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, **model_kwargs(name, args.img_size))
    opt = torch.optim.AdamW(param_groups(model, LR, WEIGHT_DECAY), lr=LR)  # the engine's groups
    before = bare_steps(model, opt, batches, args.warmup)

    timer = StepTimer()
    run_dir = tempfile.mkdtemp(prefix="engine-run-", dir=cache)
    cli = train(engine_argv(name, args, cache, cfg, run_dir), callbacks=[timer])
    assert len(timer.step_wall) == n_steps, f"engine ran {len(timer.step_wall)} steps"
    t = time.perf_counter()
    cli.trainer.save_checkpoint(os.path.join(run_dir, "timed.ckpt"))
    ckpt_s = time.perf_counter() - t
    del cli
    shutil.rmtree(run_dir, ignore_errors=True)

    after = bare_steps(model, opt, batches[:args.steps], 0)  # already warm
    bare_wall = before["wall"] + after["wall"]
    bare_cpu = before["cpu"] + after["cpu"]
    bf16 = bare_steps(model, opt, batches[:1 + args.steps], 1, autocast=True) \
        if not args.no_bf16 else None
    flops = count_flops(model, batches[0])
    data = data_rate(dm, args.batch)

    bw, bws = mean_std(bare_wall)
    bc, _ = mean_std(bare_cpu)
    ew, ews = mean_std(timer.step_wall[args.warmup:])
    ec, _ = mean_std(timer.step_cpu[args.warmup:])
    iw, iws = mean_std(timer.iter_wall[args.warmup:])
    model_ips = args.batch / ew
    row = {
        "model": name, "img_size": args.img_size, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup,
        "bare_step_s": bw, "bare_step_s_std": bws, "bare_step_cpu_s": bc,
        "bare_images_per_s": args.batch / bw,
        "engine_step_s": ew, "engine_step_s_std": ews, "engine_step_cpu_s": ec,
        "engine_images_per_s": model_ips,
        "engine_iter_s": iw, "engine_iter_s_std": iws,
        "engine_iter_images_per_s": args.batch / iw,
        "overhead_wall": ew / bw - 1, "overhead_cpu": ec / bc - 1,
        "overhead_iter_wall": iw / bw - 1,
        "checkpoint_write_s": ckpt_s,
        "checkpoint_overhead_every_50": ckpt_s / (50 * bw),
        "data_images_per_s_per_worker": data["images_per_s"],
        "data_batch_s_std": data["batch_s_std"],
        "workers_needed": math.ceil(model_ips / data["images_per_s"]),
        "gflop_per_step": flops / 1e9,
        "fp32_gflops_per_s": flops / 1e9 / bw,
        "fp32_gflops_per_cpu_s": flops / 1e9 / bc,
        "fp32_fraction_of_peak": flops / 1e9 / bc / peaks["float32"]["peak_gflops"],
        "raw": {"bare_wall": bare_wall, "bare_cpu": bare_cpu, "engine_wall": timer.step_wall,
                "engine_cpu": timer.step_cpu, "engine_iter": timer.iter_wall},
    }
    if bf16 is not None:
        fw, fws = mean_std(bf16["wall"])
        fc, _ = mean_std(bf16["cpu"])
        row.update({"bf16_step_s": fw, "bf16_step_s_std": fws, "bf16_step_cpu_s": fc,
                    "bf16_images_per_s": args.batch / fw,
                    "bf16_gflops_per_s": flops / 1e9 / fw,
                    "bf16_gflops_per_cpu_s": flops / 1e9 / fc,
                    "bf16_fraction_of_peak": flops / 1e9 / fc / peaks["bfloat16"]["peak_gflops"]})
        row["raw"]["bf16_wall"], row["raw"]["bf16_cpu"] = bf16["wall"], bf16["cpu"]
    return row


def print_table(rows: list[dict], peaks: dict) -> None:
    print("\nmatmul peak (GFLOP per CPU-second, best of 5): " + ", ".join(
        f"{p['dtype']} {p['peak_gflops']:.0f} (mean {p['mean_gflops']:.0f} ± "
        f"{p['std_gflops']:.0f}; wall {p['peak_gflops_wall']:.0f} GFLOP/s)"
        for p in peaks.values()))
    head = (f"{'model':<24}{'bare img/s':>15}{'engine img/s':>15}{'ovh wall':>9}{'ovh CPU':>8}"
            f"{'+fetch':>8}{'ckpt/50':>8}{'data/wkr':>9}{'wkrs':>5}{'GFLOP':>6}"
            f"{'fp32 GF/cpu-s':>17}{'bf16 img/s':>11}{'bf16 GF/cpu-s':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b_sd = r["bare_images_per_s"] * r["bare_step_s_std"] / r["bare_step_s"]
        e_sd = r["engine_images_per_s"] * r["engine_step_s_std"] / r["engine_step_s"]
        bf = (f"{r['bf16_images_per_s']:>11.2f}{r['bf16_gflops_per_cpu_s']:>9.0f} "
              f"({100 * r['bf16_fraction_of_peak']:>4.1f}%)") if "bf16_step_s" in r else \
            f"{'-':>11}{'-':>17}"
        print(f"{r['model'] + ' @' + str(r['img_size']):<24}"
              f"{r['bare_images_per_s']:>8.2f} ± {b_sd:<4.2f}"
              f"{r['engine_images_per_s']:>8.2f} ± {e_sd:<4.2f}"
              f"{100 * r['overhead_wall']:>+8.1f}%{100 * r['overhead_cpu']:>+7.1f}%"
              f"{r['engine_iter_images_per_s']:>8.2f}"
              f"{100 * r['checkpoint_overhead_every_50']:>7.1f}%"
              f"{r['data_images_per_s_per_worker']:>9.1f}{r['workers_needed']:>5d}"
              f"{r['gflop_per_step']:>6.0f}"
              f"{r['fp32_gflops_per_cpu_s']:>9.0f} ({100 * r['fp32_fraction_of_peak']:>4.1f}%)"
              f"{bf}")
    print("img/s: wall clock, mean ± std over the timed steps; ovh: engine step / bare step - 1 "
          "in wall and in process CPU time; +fetch: engine img/s incl. loading the next batch "
          "in-process (num_workers=0); ckpt/50: one last.ckpt write amortised over 50 steps; "
          "data/wkr: decode + train transform img/s of one DataLoader worker; wkrs: workers "
          "needed to feed the engine step; GF/cpu-s: counted FLOPs per CPU-second of the bare "
          "step (% of the matmul peak in the same dtype)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None,
                   help="comma-separated registry names (default vit_small_patch16_224,"
                        "resnet50; --quick: vit_tiny_patch16_224,resnet18)")
    p.add_argument("--img-size", type=int, default=None, help="input size (224; --quick: 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed steps (4; --quick: 4)")
    p.add_argument("--warmup", type=int, default=1, help="dropped steps before timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine more threads spin-wait on each "
                        "other and the step slows by 10x; CPU time then measures this process "
                        "alone)")
    p.add_argument("--matmul-n", type=int, default=2048, help="matmul size of the peak")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast step")
    p.add_argument("--quick", action="store_true", help="tiny models at 64 px (seconds)")
    p.add_argument("--cache", default=None, help="folder for the generated data (default: tmp)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine.json"))
    args = p.parse_args()
    args.models = args.models or ("vit_tiny_patch16_224,resnet18" if args.quick
                                  else "vit_small_patch16_224,resnet50")
    args.img_size = args.img_size or (64 if args.quick else 224)
    args.steps = args.steps or 4
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.getLogger("finegrain").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    machine = machine_info("cpu", "cores", "torch_threads", "torch", "timm", "lightning",
                           "python", "load_avg")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch "
          f"threads), load avg {machine['load_avg'][0]:.1f}; torch {machine['torch']}, "
          f"timm {machine['timm']}, lightning {machine['lightning']}")
    print(f"models {args.models} at {args.img_size} px, batch {args.batch}, {args.warmup} "
          f"warm-up + {args.steps} timed steps (bare loop: before and after the engine)")

    peaks = {"float32": matmul_stats(args.matmul_n, torch.float32)}
    if not args.no_bf16:
        peaks["bfloat16"] = matmul_stats(args.matmul_n, torch.bfloat16)

    own_cache = args.cache is None
    cache = args.cache or tempfile.mkdtemp(prefix="finegrain-bench-")
    per_class = math.ceil(args.batch * (args.warmup + args.steps) / NUM_CLASSES)
    cfg = {"num_classes": NUM_CLASSES, "train_per_class": per_class, "test_per_class": 1,
           "size": args.img_size, "seed": 0}
    t = time.perf_counter()
    generate_cub(cache, FGVCConfig(**cfg))
    print(f"data: synthetic_fgvc {NUM_CLASSES} x {per_class} train images at {args.img_size} px "
          f"({time.perf_counter() - t:.1f} s to generate)")

    rows = []
    try:
        for name in args.models.split(","):
            t = time.perf_counter()
            rows.append(bench_model(name.strip(), args, cache, cfg, peaks))
            print(f"  {name}: {time.perf_counter() - t:.0f} s")
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    print_table(rows, peaks)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "args": vars(args), "peaks": peaks, "results": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
