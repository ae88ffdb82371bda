"""DCAL cost against its baseline twin (same ViT, GLCA and PWCA off), measured in one run.

Training step (forward + backward of the summed losses) and inference (eval forward): wall
clock and process CPU time (warm-up dropped, the two variants interleaved, mean and std),
images/s, FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` under the MATH SDPA backend (fused CPU attention
counts as 0 otherwise), achieved GFLOP/s against a large matmul measured in the same run, and
the DCAL / baseline ratios next to the paper's (training 2.1 h -> 3.8 h = 1.81x on CUB
DeiT-T with 4 GPUs; inference +2-3% FLOPs).

    python benchmarks/dcal.py                       # DeiT-T/224, batch 8, CPU
    python benchmarks/dcal.py --batch 4 --img-size 448 --iters 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (count_flops, machine_info, matmul_peak, mean_std,  # noqa: E402
                    write_results)
from finegrain.models import create_model  # noqa: E402

PAPER_TRAIN_RATIO = 3.8 / 2.1
PAPER_INFER_FLOPS = "+2-3%"


def build(name: str, dcal: bool, args) -> torch.nn.Module:
    return create_model(name, num_classes=args.num_classes, img_size=args.img_size,
                        glca=dcal, pwca=dcal)


def train_step(model, images, targets) -> None:
    model.zero_grad(set_to_none=True)
    out = model(images, targets=targets)
    sum(out["losses"].values()).backward()


def infer(model, images) -> None:
    with torch.no_grad():
        model(images)


def timed_interleaved(fns: dict, warmup: int, iters: int) -> dict[str, dict[str, list]]:
    """Wall-clock and process CPU seconds per call, the variants interleaved (A B A B ...) so
    that a shared machine's load falls on both alike; warm-up calls dropped."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[k]["cpu"].append(time.process_time() - c)
            times[k]["wall"].append(time.perf_counter() - t)
    return times


def attention_strategies(args, warmup: int, iters: int) -> dict:
    """One SA block's attention at the benchmark's shapes, three ways of getting what DCAL
    needs (the output and, for the rollout, the head-mean probabilities): ``fused`` (output
    only: the baseline), ``explicit`` (softmax(QK^T/sqrt d) once, used for both: ours),
    ``fused+recompute`` (fused output plus a no-grad QK^T softmax for the probabilities).
    Returns median process CPU ms for training (forward + backward) and inference."""
    model = build(args.model, False, args)
    attn = model.backbone.blocks[0].attn
    H, D = attn.num_heads, attn.head_dim
    T = model.backbone.patch_embed.num_patches + 1
    scale = D ** -0.5

    def fused(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), None

    def explicit(q, k, v):
        a = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
        return a @ v, a.detach().mean(1)

    def recompute(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with torch.no_grad():
            a = ((q * scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)
        return o, a

    out = {}
    for name, fn in (("fused (no probabilities)", fused), ("explicit (ours)", explicit),
                     ("fused + recompute", recompute)):
        res = {}
        for mode in ("train", "infer"):
            grad = mode == "train"
            times = []
            for i in range(warmup + iters):
                qkv = torch.randn(args.batch, T, 3, H, D, requires_grad=grad)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided layout
                c = time.process_time()
                with torch.set_grad_enabled(grad):
                    o, _ = fn(q, k, v)
                    if grad:
                        o.sum().backward()
                if i >= warmup:
                    times.append(time.process_time() - c)
            res[mode] = 1e3 * statistics.median(times)
        out[name] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dcal_deit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadiest on a shared machine; CPU time then "
                        "measures this process's work alone)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dcal.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak = matmul_peak()
    machine = machine_info("cpu", "cores", "threads", "torch", "python", "matmul_peak_gflops",
                           threads=args.threads, matmul_peak_gflops=round(peak, 1))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({args.threads} threads), "
          f"torch {torch.__version__}, matmul peak {peak:.1f} GFLOP/s")
    print(f"model: {args.model} vs its baseline twin, batch {args.batch}, "
          f"{args.img_size} px, {args.warmup} warm-up + {args.iters} timed iterations\n")

    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = torch.randint(0, args.num_classes, (args.batch,))
    rows = {}
    for mode in ("train", "infer"):
        fns, counts = {}, {}
        for variant in ("baseline", "dcal"):
            model = build(args.model, variant == "dcal", args)
            model.train(mode == "train")
            fns[variant] = (lambda m=model: train_step(m, images, targets)) if mode == "train" \
                else (lambda m=model: infer(m, images))
            counts[variant] = count_flops(fns[variant])
        times = timed_interleaved(fns, args.warmup, args.iters)
        for variant, t in times.items():
            wall, wall_std = mean_std(t["wall"])
            cpu, cpu_std = mean_std(t["cpu"])
            f = counts[variant]
            rows[f"{mode}/{variant}"] = {
                "mode": mode, "variant": variant, "time_s_mean": wall, "time_s_std": wall_std,
                "cpu_s_mean": cpu, "cpu_s_std": cpu_std, "images_per_s": args.batch / wall,
                "gflops": f / 1e9, "achieved_gflops_per_s": f / 1e9 / wall,
                "fraction_of_peak": f / 1e9 / wall / peak}

    print(f"{'step':<16}{'wall (s)':>15}{'CPU (s)':>16}{'img/s':>8}{'GFLOPs':>9}{'GFLOP/s':>9}"
          f"{'% peak':>8}")
    for key, r in rows.items():
        print(f"{key:<16}{r['time_s_mean']:>8.3f} ± {r['time_s_std']:<5.3f}"
              f"{r['cpu_s_mean']:>9.3f} ± {r['cpu_s_std']:<5.3f}{r['images_per_s']:>8.1f}"
              f"{r['gflops']:>9.2f}{r['achieved_gflops_per_s']:>9.1f}"
              f"{100 * r['fraction_of_peak']:>7.0f}%")
    ratios = {}
    for mode in ("train", "infer"):
        b, d = rows[f"{mode}/baseline"], rows[f"{mode}/dcal"]
        ratios[mode] = {"wall_clock": d["time_s_mean"] / b["time_s_mean"],
                        "cpu_time": d["cpu_s_mean"] / b["cpu_s_mean"],
                        "flops": d["gflops"] / b["gflops"]}
    t, i = ratios["train"], ratios["infer"]
    print(f"\nDCAL / baseline     {'wall clock':>11}{'CPU time':>10}{'FLOPs':>8}{'paper':>9}")
    print(f"training step       {t['wall_clock']:>10.2f}x{t['cpu_time']:>9.2f}x{t['flops']:>7.2f}x"
          f"{PAPER_TRAIN_RATIO:>8.2f}x (wall clock, 2.1 h -> 3.8 h)")
    print(f"inference (SA+GLCA) {100 * (i['wall_clock'] - 1):>+10.1f}%"
          f"{100 * (i['cpu_time'] - 1):>+9.1f}%{100 * (i['flops'] - 1):>+7.1f}%"
          f"{PAPER_INFER_FLOPS:>9} (FLOPs)")
    print(f"training time ratio / FLOPs ratio: wall {t['wall_clock'] / t['flops']:.2f}, "
          f"CPU {t['cpu_time'] / t['flops']:.2f}")

    strategies = attention_strategies(args, args.warmup, 5 * args.iters)
    print(f"\none block's attention, {args.batch} x {args.img_size} px, median CPU ms")
    print(f"{'strategy':<28}{'train':>8}{'infer':>8}")
    for name, r in strategies.items():
        print(f"{name:<28}{r['train']:>8.2f}{r['infer']:>8.2f}")

    result = {"machine": machine, "attention_strategies_ms": strategies, "args": vars(args), "rows": rows, "ratios": ratios,
              "paper": {"train_wall_clock_ratio": PAPER_TRAIN_RATIO,
                        "infer_flops_increase": PAPER_INFER_FLOPS}}
    write_results(args.out, result)


if __name__ == "__main__":
    main()
