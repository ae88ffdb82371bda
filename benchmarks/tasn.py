"""TASN benchmark: the attention sampler's cost and TASN's training throughput.

1. Sampler: ``attention_sample`` (a 28 x 28 map upsampled to the 512 x 512 image, max-marginals,
   zoom clipping, inverse CDF, ``grid_sample``) vs a ResNet-50 forward on the sampled batch
   (the master-net's work), for each output size (224, 336). Aim: < 5 %. The ratio depends on
   the device: the sampler is about 120 small operations (5 coupled clipping passes on both
   axes ...), cheap on a CPU but launch-bound on a GPU, so measure it there with
   ``--device cuda`` rather than carry the CPU figure over.
2. Training: one ``tasn_resnet50`` step (forward + backward) on ``--in-size`` images vs one
   plain ``resnet50`` classifier step on ``--sample-size`` images (the baseline twin), same
   batch; images/s and their ratio. FLOPs of one forward of each (``FlopCounterMode``;
   ``grid_sample`` and softmax are not counted).

    python benchmarks/tasn.py                  # CPU defaults, about a minute on 2 cores
    python benchmarks/tasn.py --device cuda --batch 8 --train-batch 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, machine_info, mean_std, timed, write_results  # noqa: E402
from finegrain.models import create_model  # noqa: E402
from finegrain.models.tasn import attention_sample  # noqa: E402


def machine(device: str) -> dict:
    info = machine_info("cpu", "cores", "torch_threads", "torch", "python", "device",
                        device=device)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def timeit(fn, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """Mean and std in seconds over ``iters`` runs after ``warmup`` dropped runs."""
    return mean_std(timed(fn, warmup, iters, device))


def forward_flops(model: torch.nn.Module, x: torch.Tensor, **kw) -> int:
    return count_flops(lambda: model(x, **kw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--batch", type=int, default=8, help="sampler / ResNet-50 forward batch")
    p.add_argument("--in-size", type=int, default=512, help="image size given to the model")
    p.add_argument("--out-sizes", type=int, nargs="+", default=[224, 336])
    p.add_argument("--map-size", type=int, default=28, help="attention map side")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--sample-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sampler-iters", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tasn.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    info = machine(dev)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    rows = []

    # 1. sampler vs ResNet-50 forward on the sampled batch
    images = torch.randn(args.batch, 3, args.in_size, args.in_size, device=dev)
    att = torch.rand(args.batch, args.map_size, args.map_size, device=dev) ** 4
    r50 = create_model("resnet50", num_classes=200).to(dev).eval()
    for out in args.out_sizes:
        with torch.no_grad():
            s_mean, s_std = timeit(lambda: attention_sample(images, att, out), dev,
                                   args.warmup + 2, args.sampler_iters)
            sampled = attention_sample(images, att, out)
            f_mean, f_std = timeit(lambda: r50(sampled), dev, args.warmup, args.iters)
        rows.append({"what": f"sampler {args.in_size}->{out}, batch {args.batch}",
                     "mean_s": s_mean, "std_s": s_std})
        rows.append({"what": f"resnet50 forward {out}, batch {args.batch}",
                     "mean_s": f_mean, "std_s": f_std})
        rows.append({"what": f"sampler / resnet50 forward at {out}", "ratio": s_mean / f_mean})

    # 2. training step: tasn_resnet50 vs plain resnet50 classifier
    B = args.train_batch
    y = torch.randint(0, 200, (B,), device=dev)
    tasn = create_model("tasn_resnet50", num_classes=200, sample_size=args.sample_size).to(dev)
    base = create_model("resnet50", num_classes=200).to(dev)
    x_tasn = torch.randn(B, 3, args.in_size, args.in_size, device=dev)
    x_base = torch.randn(B, 3, args.sample_size, args.sample_size, device=dev)

    def step(model, x):
        model.zero_grad(set_to_none=True)
        sum(model(x, targets=y)["losses"].values()).backward()

    tasn.train()
    base.train()
    t_mean, t_std = timeit(lambda: step(tasn, x_tasn), dev, args.warmup, args.iters)
    b_mean, b_std = timeit(lambda: step(base, x_base), dev, args.warmup, args.iters)
    rows += [
        {"what": f"tasn_resnet50 train step {args.in_size}->{args.sample_size}, batch {B}",
         "mean_s": t_mean, "std_s": t_std, "images_per_s": B / t_mean},
        {"what": f"resnet50 train step {args.sample_size}, batch {B}", "mean_s": b_mean,
         "std_s": b_std, "images_per_s": B / b_mean},
        {"what": "tasn / resnet50 step time", "ratio": t_mean / b_mean},
    ]
    with torch.no_grad():
        tasn.eval()
        base.eval()
        g_tasn_train = forward_flops(tasn.train(), x_tasn[:1], targets=y[:1]) / 1e9
        g_tasn_eval = forward_flops(tasn.eval(), x_tasn[:1]) / 1e9
        g_base = forward_flops(base, x_base[:1]) / 1e9
        g_att = forward_flops(tasn.attention, torch.randn(1, 3, 224, 224, device=dev)) / 1e9
    rows += [
        {"what": "GFLOPs/image tasn_resnet50 train forward", "gflops": g_tasn_train},
        {"what": "GFLOPs/image tasn_resnet50 eval forward", "gflops": g_tasn_eval},
        {"what": "GFLOPs/image attention net (224)", "gflops": g_att},
        {"what": f"GFLOPs/image resnet50 forward {args.sample_size}", "gflops": g_base},
    ]

    print(f"\n{'measurement':<52} {'mean (ms)':>10} {'std (ms)':>9} {'value':>10}")
    for r in rows:
        if "mean_s" in r:
            extra = f"{r['images_per_s']:.2f} im/s" if "images_per_s" in r else ""
            mean, std = 1e3 * r["mean_s"], 1e3 * r["std_s"]
            print(f"{r['what']:<52} {mean:>10.1f} {std:>9.1f} {extra:>10}")
        elif "ratio" in r:
            print(f"{r['what']:<52} {'':>10} {'':>9} {r['ratio']:>10.4f}")
        else:
            print(f"{r['what']:<52} {'':>10} {'':>9} {r['gflops']:>10.2f}")
    write_results(args.out, {"machine": info, "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
