"""Shared by the benchmark scripts: machine description, timing statistics, FLOP counting,
matmul peak.

The scripts run as ``python benchmarks/<name>.py`` and import this module as ``common``
(they put ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# machine_info() with no keys: these, library versions only where importable
DEFAULT_KEYS = ("cpu", "cores", "torch_threads", "python",
                "torch", "timm", "lightning", "numpy", "faiss")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _probe(key: str) -> Any:
    if key == "cpu":
        return cpu_name()
    if key == "cores":
        return os.cpu_count()
    if key == "cores_visible":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
    if key == "torch_threads":
        return torch.get_num_threads()
    if key == "faiss_threads":
        return importlib.import_module("faiss").omp_get_max_threads()
    if key == "python":
        return platform.python_version()
    if key == "load_avg":
        return os.getloadavg()
    if key == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return importlib.import_module(key).__version__  # a library: its version


def machine_info(*keys: str, **values: Any) -> dict[str, Any]:
    """The machine and library versions, as a dict in the order of ``keys``.

    A key is ``cpu``, ``cores`` (``os.cpu_count()``), ``cores_visible`` (CPU affinity),
    ``torch_threads``, ``faiss_threads``, ``python``, ``load_avg``, ``cuda`` (device name or
    None), a name given in ``values`` (the script's own entries, e.g. ``threads=4``; those not
    in ``keys`` follow them), or else a module whose ``__version__`` is reported (imported
    here). No keys: :data:`DEFAULT_KEYS`, leaving out the libraries that cannot be imported.
    """
    if not keys:
        info = {}
        for k in DEFAULT_KEYS:
            try:
                info[k] = _probe(k)
            except ImportError:
                pass
        return {**info, **values}
    info = {k: values[k] if k in values else _probe(k) for k in keys}
    return {**info, **{k: v for k, v in values.items() if k not in info}}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def timed(fn: Callable[[], Any], warmup: int, iters: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``iters`` calls of ``fn`` after ``warmup`` dropped calls (on a
    CUDA ``device`` each call is bracketed by synchronisations)."""
    sync = (lambda: torch.cuda.synchronize(device)) if str(device).startswith("cuda") \
        else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``FlopCounterMode``), attention run by the MATH SDPA
    backend so that its matmuls are counted (fused CPU kernels are invisible to the counter)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def matmul_rates(n: int = 2048, dtype: torch.dtype = torch.float32, iters: int = 5
                 ) -> tuple[list[float], list[float]]:
    """GFLOP per wall second and per process-CPU second of each of ``iters`` timed
    (n x n) @ (n x n) matmuls in ``dtype``, after one warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    wall, cpu = [], []
    for _ in range(iters):
        c = time.process_time()
        t = time.perf_counter()
        a @ b
        w = time.perf_counter() - t
        cpu.append(2 * n ** 3 / max(time.process_time() - c, 1e-9) / 1e9)
        wall.append(2 * n ** 3 / w / 1e9)
    return wall, cpu


def matmul_peak(n: int = 2048, dtype: torch.dtype = torch.float32, iters: int = 5) -> float:
    """GFLOP/s (wall clock) of an (n x n) @ (n x n) matmul in ``dtype``: best of ``iters``,
    after one warm-up."""
    return max(matmul_rates(n, dtype, iters)[0])


def write_results(path: str, result: dict[str, Any]) -> None:
    """Write a benchmark's JSON (creating its folder) and say where."""
    import json
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
