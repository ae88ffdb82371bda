"""``finegrain serve`` under a bounded load, on localhost only.

The server runs in its own process (``python -m finegrain serve INDEX --port P``); this script
sends a fixed number of ``POST /search`` uploads (default 2,000 at concurrency 8, each client
thread on one keep-alive connection), cycling over a few query photos, then stops by itself.
Reported: requests/s (mean and std over ``--rounds`` equal rounds), p50 / p95 / p99 latency
over every request, the error count (any status but 200; must be 0), and the server's resident
memory (``VmRSS``) after the warm-up and after the load: growth must stay under
``--rss-bound-mb`` (default 50 MB; uploads are decoded in memory and dropped).

Without ``--index``, a demo-style index is built first in a temporary folder: generated
landmarks, a tiny DALG (demo scale, 64 px, random weights: speed does not depend on training),
``retrieval_eval`` writing the gallery descriptors as ``finegrain demo`` does, ``index build``.

    python benchmarks/serve.py                               # 2,000 requests, concurrency 8
    python benchmarks/serve.py --requests 400 --rounds 2     # a quick run on a busy machine
    python benchmarks/serve.py --index runs/demo/gallery.index --gallery-root DIR --queries q.jpg

Prints the machine and versions and a table; writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, mean_std  # noqa: E402


def build_demo_index(folder: str) -> tuple[str, str, list[str]]:
    """(index folder, dataset root, query image paths) of a demo-style index."""
    import torch

    from finegrain import create_model
    from finegrain.data import build_dataset
    from finegrain.data.synthetic_landmarks import generate_landmarks
    from finegrain.models.tiny import tiny_kwargs
    from finegrain.retrieval.index import Index
    from finegrain.retrieval.pipeline import ExtractOptions, PictureOptions, retrieval_eval

    root = generate_landmarks(os.path.join(folder, "data"))
    name = "dalg_vit_tiny_r_s16_p8_224"
    kwargs = {**tiny_kwargs(name, "demo"), "num_classes": 8}
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    meta = {"model_name": name, "model_kwargs": kwargs, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "img_size": 64, "task": "retrieval",
            "dataset": "synthetic_landmarks", "class_names": []}
    run = os.path.join(folder, "run")
    os.makedirs(run)
    ckpt = os.path.join(run, "last.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta, "hyper_parameters": {"meta": meta}}, ckpt)
    retrieval_eval(ckpt, "synthetic_landmarks", root, out=run,
                   extract=ExtractOptions(progress=False), picture=PictureOptions("none"))
    index = os.path.join(folder, "gallery.index")
    Index.build(os.path.join(run, "gallery")).save(index)
    queries = [s.path for s in build_dataset("synthetic_landmarks", root, "query").samples]
    return index, root, queries


def multipart(path: str, k: int) -> tuple[bytes, str]:
    """(body, content type) of a ``POST /search`` upload."""
    boundary = uuid.uuid4().hex
    with open(path, "rb") as f:
        data = f.read()
    ctype = "image/png" if path.lower().endswith(".png") else "image/jpeg"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: {ctype}\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def rss_mb(pid: int) -> float:
    """Resident memory of a process (``VmRSS``), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int, bodies: list[tuple[bytes, str]], n: int, concurrency: int
         ) -> tuple[list[float], int, float]:
    """Send ``n`` uploads from ``concurrency`` threads; (latencies s, errors, wall s)."""
    lock = threading.Lock()
    counter = iter(range(n))
    latencies: list[float] = []
    errors = [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - t0


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            if resp.status == 200:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", default=None, help="index folder (default: a demo-style one)")
    p.add_argument("--gallery-root", default=None, help="passed to finegrain serve")
    p.add_argument("--queries", nargs="*", default=None, help="query images (default: the "
                                                               "demo-style index's queries)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests in all")
    p.add_argument("--rounds", type=int, default=4, help="equal rounds (req/s mean +- std)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--warmup", type=int, default=50, help="requests dropped before timing")
    p.add_argument("-k", type=int, default=10, help="results per request")
    p.add_argument("--port", type=int, default=8765, help="localhost port of the server")
    p.add_argument("--threads", type=int, default=1, help="server's torch / OpenMP threads")
    p.add_argument("--rss-bound-mb", type=float, default=50.0,
                   help="largest allowed growth of the server's memory over the load")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="finegrain-bench-serve-")
    index, root, queries = args.index, args.gallery_root, args.queries
    if index is None:
        index, root, demo_queries = build_demo_index(tmp.name)
        queries = queries or demo_queries
    if not queries:
        raise SystemExit("--queries: give query images for an --index of your own")
    bodies = [multipart(q, args.k) for q in queries]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "finegrain", "serve", index, "--port", str(args.port)]
    if root:
        cmd += ["--gallery-root", root]
    proc = subprocess.Popen(cmd, env=env)
    try:
        health = wait_healthy(args.port, proc)
        _, warm_errors, _ = load(args.port, bodies, args.warmup, args.concurrency)
        rss_before = rss_mb(proc.pid)
        per_round = args.requests // args.rounds
        latencies, errors, rates = [], warm_errors, []
        for _ in range(args.rounds):
            lat, err, wall = load(args.port, bodies, per_round, args.concurrency)
            latencies += lat
            errors += err
            rates.append(per_round / wall)
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()
    ms = np.asarray(latencies) * 1000
    rate, rate_std = mean_std(rates)
    growth = rss_after - rss_before
    res = {"requests": len(latencies), "concurrency": args.concurrency, "k": args.k,
           "images": health["images"], "model_name": health["model_name"],
           "requests_per_s": rate, "requests_per_s_std": rate_std,
           "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
           "p99_ms": float(np.percentile(ms, 99)), "errors": errors,
           "rss_before_mb": rss_before, "rss_after_mb": rss_after, "rss_growth_mb": growth,
           "rss_bound_mb": args.rss_bound_mb, "rss_ok": growth <= args.rss_bound_mb}
    info = machine_info(server_threads=args.threads, load_avg=os.getloadavg())
    print(json.dumps(info))
    print(f"finegrain serve, {res['images']} images ({res['model_name']}), {len(latencies)} "
          f"uploads at concurrency {args.concurrency}, k={args.k}")
    print("| req/s | p50 ms | p95 ms | p99 ms | errors | RSS before -> after (MB) |")
    print("|---|---|---|---|---|---|")
    print(f"| {rate:.1f} +- {rate_std:.1f} | {res['p50_ms']:.1f} | {res['p95_ms']:.1f} | "
          f"{res['p99_ms']:.1f} | {errors} | {rss_before:.0f} -> {rss_after:.0f} "
          f"({growth:+.1f}, bound {args.rss_bound_mb:g}) |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "args": vars(args), "results": res}, f, indent=1)
    if errors or not res["rss_ok"]:
        raise SystemExit(f"FAILED: {errors} errors, memory growth {growth:.1f} MB")


if __name__ == "__main__":
    main()
