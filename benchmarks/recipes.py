"""What each shipped recipe costs, at its own image size and class count, before renting a GPU.

    python benchmarks/recipes.py              # FLOPs and memory of every recipe (no compute)
    python benchmarks/recipes.py --time       # + CPU step time at batch 2 (slow: ViT-B at 448)

Per recipe: parameters; training (forward + backward) and evaluation FLOPs per image at the
recipe's image size (``FlopCounterMode``, MATH attention, on the meta device: nothing is
computed; TASN, whose autocast switch meta cannot run, on the CPU); activation memory at the recipe's batch; and whether one 80 GB GPU holds it.

Activation memory is the bytes of the tensors autograd saves for backward
(``saved_tensors_hooks``) in one training forward at batch 2 (same device), scaled
linearly to the recipe's batch, in fp32 and with attention run by the MATH backend, which saves
the attention probabilities: an upper bound (bf16 autocast stores matmul inputs in half, and a
fused attention kernel saves less: for DCAL DeiT-T at 448 px, batch 2, 779 MB with the CPU's
fused kernel against 1065 MB with MATH). The method is checked at a small size on real
CPU tensors (the ``--check`` line: meta and real agree, and batch 2 -> 4 doubles it). Model
state for AdamW / SGD-momentum training is 16 / 12 bytes per parameter (fp32 weights, grads,
one or two moments). "80 GB" = activations + state < 80 GB, on one GPU at the full batch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import count_flops, machine_info, write_results  # noqa: E402

from finegrain.engine.run import build_recipe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _size(cfg: dict) -> tuple[int, int]:
    s = cfg["data"]["img_size"]
    return tuple(s) if isinstance(s, (list, tuple)) else (s, s)


def _labels(cfg: dict, batch: int) -> torch.Tensor:
    if cfg["data"].get("sampler") == "pk":  # pair losses: every class twice
        return torch.arange(batch) // 2
    return torch.arange(batch) % 2


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training forward (each storage once)."""
    seen, total = set(), 0

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        key = storage._cdata  # one storage however many views of it are saved
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack,
                                                                                lambda t: t):
        model(x, targets=y)
    return total


def measure(path: str, timed: bool) -> dict:
    cfg_model, _, cfg = build_recipe(path)
    h, w = _size(cfg)
    batch = int(cfg["data"]["batch_size"])
    params = sum(p.numel() for p in cfg_model.parameters())
    adam = "Adam" in cfg["model"]["optimizer"]["class_path"]
    momentum = float(cfg["model"]["optimizer"]["init_args"].get("momentum", 0) or 0)
    state = params * (16 if adam else (12 if momentum else 8))
    try:  # the meta device computes nothing; a model whose ops meta lacks runs on the CPU
        row = _costs(path, cfg, "meta")
    except (RuntimeError, NotImplementedError):
        row = _costs(path, cfg, "cpu")
    row.update({"recipe": os.path.relpath(path, ROOT), "image": f"{h}x{w}", "batch": batch,
                "params_M": params / 1e6, "state_GB": state / 1e9})
    row["activations_GB"] *= batch / 2
    row["fits_80GB"] = row["activations_GB"] + row["state_GB"] < 80
    if timed:
        row["cpu_step_s_batch2"] = _step_time(path, cfg)
    return row


def _costs(path: str, cfg: dict, device: str) -> dict:
    """FLOPs per image (train, eval) and saved bytes at batch 2, on ``device``."""
    h, w = _size(cfg)
    with torch.device(device):
        model, _, _ = build_recipe(path)
        x, y = torch.randn(2, 3, h, w), _labels(cfg, 2)

    def train():
        out = model.train()(x, targets=y)
        sum(v.float() for v in out["losses"].values()).backward()

    def evaluate():
        with torch.no_grad():
            model.eval()(x)

    return {"device": device, "train_gflops_per_image": count_flops(train) / 2 / 1e9,
            "eval_gflops_per_image": count_flops(evaluate) / 2 / 1e9,
            "activations_GB": saved_bytes(model.train(), x, y) / 2 / 1e9}


def _step_time(path: str, cfg: dict) -> float:
    """Mean wall seconds of two CPU training steps at batch 2 (after one warm-up)."""
    h, w = _size(cfg)
    torch.manual_seed(0)
    real, opt, _ = build_recipe(path)
    x, y = torch.randn(2, 3, h, w), _labels(cfg, 2)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled="bf16" in str(cfg["trainer"]["precision"])):
            out = real.train()(x, targets=y)
        sum(v.float() for v in out["losses"].values()).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / 2


def check_method() -> str:
    """The activation estimate on meta equals the real one and is linear in the batch."""
    path = os.path.join(ROOT, "recipes", "dcal", "cub_deit_tiny.yaml")
    torch.manual_seed(0)
    real, _, cfg = build_recipe(path)
    with torch.device("meta"):
        meta, _, _ = build_recipe(path)
    h, w = _size(cfg)
    out = []
    for b in (2, 4):
        x, y = torch.randn(b, 3, h, w), _labels(cfg, b)
        out.append((saved_bytes(real.train(), x, y),
                    saved_bytes(meta.train(), x.to("meta"), y.to("meta"))))
    (r2, m2), (r4, m4) = out
    return (f"check (DCAL DeiT-T, {h} px): real {r2 / 1e6:.1f} MB vs meta {m2 / 1e6:.1f} MB at "
            f"batch 2; batch 4 / batch 2 = {r4 / r2:.3f} (real), {m4 / m2:.3f} (meta)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time", action="store_true", help="also time a CPU step at batch 2")
    p.add_argument("--recipes", nargs="*", default=None, help="recipe files (default: all)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipes.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # measure one recipe, print its row as JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.time)))
        return
    paths = a.recipes or sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))
    rows = []
    head = (f"{'recipe':<44}{'image':>9}{'batch':>6}{'params M':>9}{'train GF/img':>13}"
            f"{'eval GF/img':>12}{'act GB':>8}{'state GB':>9}{'80 GB':>6}"
            + (f"{'CPU s/step':>11}" if a.time else ""))
    print(head)
    for path in paths:  # one process per recipe: memory does not add up across 56 models
        cmd = [sys.executable, os.path.abspath(__file__), "--one", path] + ["--time"] * a.time
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['recipe'][8:]:<44}{r['image']:>9}{r['batch']:>6}{r['params_M']:>9.1f}"
              f"{r['train_gflops_per_image']:>13.1f}{r['eval_gflops_per_image']:>12.1f}"
              f"{r['activations_GB']:>8.1f}{r['state_GB']:>9.2f}"
              f"{'yes' if r['fits_80GB'] else 'NO':>6}"
              + (f"{r['cpu_step_s_batch2']:>11.2f}" if a.time else ""), flush=True)
    note = check_method()
    print(note)
    write_results(a.out, {"machine": machine_info(), "method": __doc__, "check": note,
                          "recipes": rows})


if __name__ == "__main__":
    main()
