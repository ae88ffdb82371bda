"""Export benchmark: images/s of PyTorch eager vs ONNX Runtime vs ``torch.compile``.

Per method (one model each; ``--models`` to choose), the same eval-mode model (seeded random
weights, the training-only branch dropped as ``finegrain export`` does), the same batch, the
same thread count: eager ``model(x)`` under ``torch.inference_mode``, the ``finegrain export``
ONNX graph on ONNX Runtime (``--device cuda``: its CUDA provider), and ``torch.compile`` of the
model (inductor; the first calls, which compile, are the warm-up). Each row also gives the
outputs' max |difference| to eager, and the ratios to eager.

    python benchmarks/export.py                            # demo-size models, CPU, ~2 min
    python benchmarks/export.py --scale test --iters 3     # 32 px smoke run
    python benchmarks/export.py --scale full --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, mean_std, timed, write_results  # noqa: E402
from finegrain import create_model  # noqa: E402
from finegrain.export import inference_model, write_onnx  # noqa: E402
from finegrain.models.tiny import tiny_input_size, tiny_kwargs  # noqa: E402

MODELS = ["resnet18", "vit_tiny_patch16_224", "dcal_deit_tiny_patch16_224", "tasn_resnet18",
          "dalg_deit_tiny_patch16_224", "cross_image_resnet18"]


def build(name: str, scale: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The eval-mode inference model of ``name`` and its input size: the tiny table's
    ``test`` / ``demo`` configuration, or the registered (paper) one at 224 px for ``full``."""
    torch.manual_seed(0)
    kw = {} if scale == "full" else tiny_kwargs(name, scale)
    model = create_model(name, num_classes=100, **kw)
    model, _ = inference_model(model, {"model_name": name, "model_kwargs": kw})
    return model, (224, 224) if scale == "full" else tiny_input_size(name, scale)


def images_per_s(fn, batch: int, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """Mean and std of ``batch`` / seconds per call over ``iters`` calls after ``warmup``
    dropped calls."""
    return mean_std([batch / t for t in timed(fn, warmup, iters, device)])


def onnx_runner(model: torch.nn.Module, x: torch.Tensor, keys: list[str], tmp: str,
                device: str, threads: int):
    """A function running ``model``'s ONNX export (``finegrain export``'s writer) on ONNX
    Runtime with ``threads`` intra-op threads; returns ``(fn, provider)``."""
    import onnxruntime as ort

    from finegrain.export import _OutputTuple
    path = str(Path(tmp) / "model.onnx")
    write_onnx(_OutputTuple(model, keys).eval(), x.cpu(), keys, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
    sess = ort.InferenceSession(path, opts, providers=providers)
    if device == "cuda":  # inputs and outputs stay on the GPU (IO binding)
        binding = sess.io_binding()
        binding.bind_input("images", "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
        for k in keys:
            binding.bind_output(k, "cuda")

        def fn():
            sess.run_with_iobinding(binding)
            return [torch.from_numpy(o) for o in binding.copy_outputs_to_cpu()]
    else:
        arr = x.numpy()

        def fn():
            return [torch.from_numpy(o) for o in sess.run(keys, {"images": arr})]
    return fn, sess.get_providers()[0]


def bench(name: str, args) -> dict:
    model, (H, W) = build(name, args.scale)
    model = model.to(args.device)
    x = torch.randn(args.batch, 3, H, W, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    with torch.inference_mode():
        ref = model(x)
    keys = sorted(ref)
    row = {"model": name, "input": [args.batch, 3, H, W], "outputs": keys}

    def eager():
        with torch.inference_mode():
            return model(x)

    timing = (args.batch, args.device, args.warmup, args.iters)
    row["eager"] = images_per_s(eager, *timing)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            t = time.perf_counter()
            fn, provider = onnx_runner(model, x, keys, tmp, args.device, args.threads)
            row["onnx_export_s"] = time.perf_counter() - t
            row["onnx_provider"] = provider
            got = dict(zip(keys, fn()))
            row["onnx_max_abs"] = max(float((got[k] - ref[k].cpu()).abs().max()) for k in keys)
            row["onnxruntime"] = images_per_s(fn, *timing)
        except Exception as e:  # a failure is a result: reported in the table and the JSON
            row["onnxruntime_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        compiled = torch.compile(model)

        def comp():
            with torch.inference_mode():
                return compiled(x)

        t = time.perf_counter()
        got = comp()  # compiles
        row["compile_s"] = time.perf_counter() - t
        row["compile_max_abs"] = max(float((got[k] - ref[k]).abs().max()) for k in keys)
        row["torch_compile"] = images_per_s(comp, *timing)
    except Exception as e:
        row["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for k in ("onnxruntime", "torch_compile"):
        if k in row:
            row[f"{k}_vs_eager"] = row[k][0] / row["eager"][0]
    return row


def _cell(row: dict, k: str) -> str:
    """``images/s +- std`` of one runtime, or ``failed``."""
    return f"{row[k][0]:8.1f} +-{row[k][1]:6.1f}" if k in row else f"{'failed':>16s}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="registered model names")
    p.add_argument("--scale", choices=["test", "demo", "full"], default="demo",
                   help="tiny test (32 px) / demo (64 px) configurations, or the registered "
                        "size at 224 px")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    keys = ["cpu", "cores", "torch_threads", "python", "torch", "onnxruntime", "onnx"]
    info = machine_info(*keys, *(["cuda"] if args.device == "cuda" else []))
    print(json.dumps(info))
    print(f"batch {args.batch}, {args.threads} threads, {args.device}, scale {args.scale}, "
          f"onnxruntime {onnxruntime.__version__}; images/s (mean +- std over {args.iters} "
          f"runs after {args.warmup} warm-up)")
    print(f"{'model':30s} {'eager':>16s} {'onnxruntime':>16s} {'torch.compile':>16s} "
          f"{'ort/eager':>9s} {'comp/eager':>10s}")
    rows = []
    for name in args.models:
        row = bench(name, args)
        rows.append(row)
        print(f"{name:30s} {_cell(row, 'eager')} {_cell(row, 'onnxruntime')} "
              f"{_cell(row, 'torch_compile')} {row.get('onnxruntime_vs_eager', float('nan')):9.2f}"
              f" {row.get('torch_compile_vs_eager', float('nan')):10.2f}", flush=True)
        for k in ("onnxruntime_error", "torch_compile_error"):
            if k in row:
                print(f"  {k}: {row[k]}")
    write_results(args.out, {"machine": info, "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
