"""Retrieval pipeline costs, measured in one run.

1. **Descriptor extraction**: images/s of :func:`finegrain.retrieval.extract.extract` with
   ``dalg_vit_small_patch16_224`` at a fixed 512 px longest side (512 x 384 images, 4:3),
   single scale vs DOLG's 5 scales (0.3535, 0.5, 0.7071, 1, 1.4142).
2. **Search**: queries/s and recall@100 (overlap with the exact top-100) of approximate faiss
   indexes against exact search (``IndexFlatIP``, :func:`finegrain.retrieval.search.knn`) on
   1M x 512 clustered synthetic float32 descriptors (:func:`clustered_descriptors`) with
   1,000 queries drawn from the same distribution. Target: >= 10x the exact queries/s at
   recall@100 >= 0.9.
3. **+1M evaluation memory and time** (``--plus1m``): ROxford5k's real ground truth, 70
   queries, 4,993 gallery + 1,001,001 memory-mapped distractor descriptors (512-d, generated),
   scored by the former all-in-memory path (``np.concatenate``, a faiss flat index, the
   complete (n, 70) ranking, ``evaluate``) and by ``retrieval_eval``'s blockwise path
   (:func:`finegrain.retrieval.pipeline.rank_positions` +
   ``evaluate_positions``), each in its own process, once: wall time, peak RSS (``VmHWM``,
   which counts the mapped file's pages) and peak anonymous RSS (sampled every 10 ms: the
   memory above the mapped files), also as the increase over the process after its imports.
   Metrics agree up to near-ties (the former path scored in float32, the new in float64).

Warm-up runs are dropped; mean and std over the timed repeats. Prints the machine and
versions and a table; writes JSON (``benchmarks/results/retrieval.json``, or
``retrieval_quick.json`` with ``--quick``: 100k descriptors, fewer repeats).

    python benchmarks/retrieval.py             # ~1M descriptors: needs ~6 GB RAM, minutes
    python benchmarks/retrieval.py --quick     # 100k smoke run
    python benchmarks/retrieval.py --skip-extraction --skip-search --plus1m  # +1M eval only
    python benchmarks/retrieval.py --skip-extraction --descriptors db --query-descriptors q
                                               # tune the index on your own descriptors
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no OpenMP spinning on a shared machine

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, mean_std  # noqa: E402
from finegrain.models import create_model  # noqa: E402
from finegrain.retrieval.extract import MULTI_SCALES, extract  # noqa: E402
from finegrain.retrieval.search import build_index, knn  # noqa: E402


# --------------------------------------------------------------------------- extraction
class _Images(torch.utils.data.Dataset):
    """``n`` normalised random images of one size (what the retrieval transform yields)."""

    def __init__(self, n: int, h: int, w: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, h, w, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "index": i}


def bench_extraction(args) -> dict:
    model = create_model(args.model, num_classes=10, img_size=512).eval()
    ds = _Images(args.images, 384, 512)
    out = {"model": args.model, "image_hw": [384, 512], "images": args.images,
           "batch_size": args.batch_size}
    for name, scales in (("single_scale", (1.0,)), ("five_scales", MULTI_SCALES)):
        extract(model, _Images(args.batch_size, 384, 512), scales=scales,
                batch_size=args.batch_size, progress=False)  # warm-up
        rates = []
        for _ in range(args.extract_repeats):
            st: dict = {}
            extract(model, ds, scales=scales, batch_size=args.batch_size, progress=False,
                    stats=st)
            rates.append(st["images_per_s"])
        m, s = mean_std(rates)
        out[name] = {"scales": list(scales), "images_per_s": m, "std": s, "runs": rates}
        print(f"  extraction {name:<12} {m:7.2f} +- {s:.2f} images/s", flush=True)
    out["five_over_single_time"] = out["single_scale"]["images_per_s"] / \
        out["five_scales"]["images_per_s"]
    return out


# --------------------------------------------------------------------------- search
def clustered_descriptors(n: int, d: int, nq: int, seed: int = 0, n_clusters: int | None = None,
                          intrinsic: int = 64, noise: float = 0.25
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic L2-normalised descriptors that look like image descriptors: a Gaussian
    mixture in an ``intrinsic``-dim latent space (``n_clusters`` "landmarks", default one per
    256 vectors, sizes drawn from a Dirichlet, per-cluster spreads 0.4-1.0 so neighbouring
    clusters overlap), mapped to ``d`` dims by a random orthonormal matrix, plus isotropic
    noise. Seeded.

    Returns:
        ``(database (n, d), queries (nq, d))`` float32; queries come from the same mixture.
    """
    n_clusters = n_clusters or max(16, n // 256)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, intrinsic)).astype(np.float32)
    spread = rng.uniform(0.4, 1.0, n_clusters).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((d, intrinsic)))
    basis = basis.T.astype(np.float32)  # (intrinsic, d), orthonormal rows
    weights = rng.dirichlet(np.full(n_clusters, 2.0))

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for a in range(0, m, 100_000):
            b = min(a + 100_000, m)
            c = rng.choice(n_clusters, b - a, p=weights)
            z = centres[c] + spread[c, None] * rng.standard_normal((b - a, intrinsic),
                                                                   dtype=np.float32)
            x = z @ basis + noise * rng.standard_normal((b - a, d), dtype=np.float32) \
                / math.sqrt(d / intrinsic)
            out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(nq)


def recall_at(ids: np.ndarray, gt: np.ndarray) -> float:
    """Mean |approx top-k  intersect  exact top-k| / k."""
    k = gt.shape[1]
    return float(np.mean([len(np.intersect1d(a[:k], b)) / k for a, b in zip(ids, gt)]))


def timed_search(fn, repeats: int) -> tuple[float, float, list[float], tuple]:
    fn()  # warm-up, dropped
    secs, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        secs.append(time.perf_counter() - t)
    return *mean_std(secs), secs, res


class _Timer:
    def __init__(self):
        self.s = 0.0

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t


def build_candidates(db: np.ndarray, nlist: int, train_size: int, hnsw: bool, seed: int = 0):
    """Yield ``(factory, index, build_seconds)``; the IVF variants share one coarse quantizer
    (spherical k-means on a seeded sample) and one assignment of the database to its cells,
    so they differ only in how the vectors are encoded (what ``index_factory`` would build
    with the same cells). Training runs on one thread (faiss's small k-means suffer from
    OpenMP spinning on a shared machine); adding uses all threads."""
    n, d = db.shape
    ip = faiss.METRIC_INNER_PRODUCT
    rows = np.sort(np.random.default_rng(seed).choice(n, min(train_size, n), replace=False))
    sample = np.ascontiguousarray(db[rows])
    threads = faiss.omp_get_max_threads()
    with _Timer() as t_shared:
        faiss.omp_set_num_threads(1)
        km = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed + 1)
        km.train(sample)
        faiss.omp_set_num_threads(threads)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(km.centroids)
        assign = quantizer.search(db, 1)[1].ravel().astype(np.int64)
    print(f"  coarse quantizer IVF{nlist}: k-means on {len(rows)} + assignment of {n} "
          f"in {t_shared.s:.0f} s", flush=True)

    def fill(ix):
        faiss.omp_set_num_threads(1)
        ix.train(sample)  # the coarse quantizer is trained: only the encoder is
        faiss.omp_set_num_threads(threads)
        ix.add_core(n, faiss.swig_ptr(db), None, faiss.swig_ptr(assign))
        return ix

    M = max(1, d // 8)  # PQ sub-quantizers: 64 bytes for 512-d (8 bits) / 32 bytes (4 bits)
    with _Timer() as t:
        ix = fill(faiss.IndexIVFPQ(quantizer, d, nlist, M, 8, ip))
    yield f"IVF{nlist},PQ{M}", ix, t_shared.s + t.s
    del ix
    with _Timer() as t:
        ix = fill(faiss.IndexIVFScalarQuantizer(quantizer, d, nlist,
                                                faiss.ScalarQuantizer.QT_8bit, ip))
    yield f"IVF{nlist},SQ8", ix, t_shared.s + t.s
    del ix
    gc.collect()
    with _Timer() as t:
        pq4 = fill(faiss.IndexIVFPQ(quantizer, d, nlist, M, 4, ip))
        fs = faiss.IndexIVFPQFastScan(pq4)  # same codes, SIMD fast-scan layout
        del pq4
        ix = faiss.IndexRefineFlat(fs, faiss.swig_ptr(db))  # exact re-scoring of a shortlist
    yield f"IVF{nlist},PQ{M}x4fs,RFlat", ix, t_shared.s + t.s
    del ix, fs
    gc.collect()
    if hnsw:
        with _Timer() as t:
            ix = build_index(db, "HNSW32", metric="ip")
        yield "HNSW32", ix, t.s


SEARCH_PARAMS = {  # search parameters tried per candidate
    "PQ": [{"nprobe": 32}],
    "SQ8": [{"nprobe": 4}, {"nprobe": 8}, {"nprobe": 16}, {"nprobe": 32}],
    "RFlat": [{"nprobe": 8, "k_factor_rf": 2}, {"nprobe": 16, "k_factor_rf": 4},
              {"nprobe": 32, "k_factor_rf": 4}],
    "HNSW32": [{"efSearch": 128}, {"efSearch": 256}],
}


def bench_search(args) -> dict:
    t = time.perf_counter()
    if args.descriptors:  # real descriptor files (finegrain embed) instead of synthetic ones
        from finegrain.retrieval.descriptors import load_descriptors
        db = np.ascontiguousarray(load_descriptors(args.descriptors).vectors)
        q = np.ascontiguousarray(load_descriptors(args.query_descriptors).vectors)
        args.n, args.dim, args.queries = db.shape[0], db.shape[1], q.shape[0]
    else:
        db, q = clustered_descriptors(args.n, args.dim, args.queries, seed=0)
    print(f"  data {db.shape} + {q.shape} ready in {time.perf_counter() - t:.1f} s",
          flush=True)
    k = 100
    m, s, runs, (_, gt) = timed_search(lambda: knn(q, db, k), args.repeats)
    exact_qps = args.queries / m
    rows = [{"index": "Flat (exact, knn)", "params": {}, "qps": exact_qps,
             "qps_std": exact_qps * s / m, "recall@100": 1.0, "speedup": 1.0, "build_s": 0.0,
             "runs_s": runs}]
    print(f"  {'Flat (exact)':<44} {exact_qps:9.1f} q/s  recall 1.000", flush=True)
    gc.collect()
    nlist = args.nlist or 2 ** round(math.log2(4 * math.sqrt(args.n)))
    train_size = args.train_size or 32 * nlist
    hnsw = args.n <= args.hnsw_max
    for factory, ix, build_s in build_candidates(db, nlist, train_size, hnsw):
        key = next(kk for kk in ("RFlat", "SQ8", "HNSW32", "PQ") if kk in factory)
        for params in SEARCH_PARAMS[key]:
            space = faiss.ParameterSpace()
            for name, v in params.items():
                space.set_index_parameter(ix, name, v)
            m, s, runs, (_, ids) = timed_search(lambda: ix.search(q, k), args.repeats)
            qps = args.queries / m
            rec = recall_at(ids, gt)
            rows.append({"index": factory, "params": params, "qps": qps,
                         "qps_std": qps * s / m, "recall@100": rec, "speedup": qps / exact_qps,
                         "build_s": build_s, "runs_s": runs})
            ptxt = ",".join(f"{a}={b}" for a, b in params.items())
            print(f"  {factory + ' ' + ptxt:<44} {qps:9.1f} q/s  recall {rec:.3f}  "
                  f"x{qps / exact_qps:.1f}  (build {build_s:.0f} s)", flush=True)
    if not hnsw:
        rows.append({"index": "HNSW32", "params": {}, "skipped":
                     f"not built for n > {args.hnsw_max} (--hnsw-max): its build takes tens "
                     f"of minutes on 2 cores"})
    ok = [r for r in rows[1:] if "qps" in r and r["recall@100"] >= 0.9 and r["speedup"] >= 10]
    best = max(ok, key=lambda r: r["qps"]) if ok else None
    return {"n": args.n, "dim": args.dim, "queries": args.queries, "k": k, "nlist": nlist,
            "train_size": train_size, "rows": rows,
            "chosen": None if best is None else {"index": best["index"],
                                                 "params": best["params"]}}


# --------------------------------------------------------------------------- +1M evaluation
def _plus1m_files(folder: str, n_distractors: int, dim: int) -> dict:
    """Gallery / query descriptors for ROxford5k's real gnd and a memory-mappable distractor
    file (random unit vectors written in chunks), created once in ``folder``."""
    from finegrain.evaluation.revisited import load_gnd
    gnd_path = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop" / \
        "gnd_roxford5k.pkl"
    cfg = load_gnd(gnd_path)
    paths = {k: os.path.join(folder, f"{k}.npy") for k in ("gallery", "queries", "distractors")}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((11, dim))
        n_db = len(cfg["imlist"])

        def unit(x: np.ndarray) -> np.ndarray:
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        np.save(paths["gallery"], unit(centres[np.arange(n_db) % 11] +
                                       rng.standard_normal((n_db, dim))))
        np.save(paths["queries"], unit(centres[np.arange(70) % 11] +
                                       0.5 * rng.standard_normal((70, dim))))
        out = np.lib.format.open_memmap(paths["distractors"] + ".tmp.npy", "w+", np.float32,
                                        (n_distractors, dim))
        for a in range(0, n_distractors, 100_000):
            b = min(a + 100_000, n_distractors)
            out[a:b] = unit(rng.standard_normal((b - a, dim), dtype=np.float32))
        out.flush()
        del out
        os.replace(paths["distractors"] + ".tmp.npy", paths["distractors"])
    return {**paths, "gnd": str(gnd_path)}


def _rss_sampler(stop, peak: dict) -> None:
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak["anon_kb"] = max(peak.get("anon_kb", 0), int(line.split()[1]))
        time.sleep(0.01)


def plus1m_worker(mode: str, files: dict) -> dict:
    """One +1M evaluation in this process ('old' or 'new'); time, peak RSS, metrics."""
    import threading

    from finegrain.evaluation.revisited import evaluate, evaluate_positions, load_gnd
    from finegrain.retrieval.pipeline import rank_positions
    peak: dict = {}
    stop = threading.Event()
    th = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    th.start()
    gnd = load_gnd(files["gnd"])["gnd"]
    q = np.load(files["queries"])
    time.sleep(0.05)
    base_kb = peak.get("anon_kb", 0)  # after the imports: the interpreter, torch, faiss ...
    t = time.perf_counter()
    gv = np.load(files["gallery"])
    dis = np.load(files["distractors"], mmap_mode="r")
    if mode == "old":  # the former retrieval_eval: concatenate, flat faiss, complete ranking
        database = np.concatenate([gv, np.asarray(dis)], axis=0)
        _, ids = knn(q, database, database.shape[0])
        metrics = evaluate(np.ascontiguousarray(ids.T), gnd)
    else:
        labelled = [np.unique(np.concatenate([g["easy"], g["hard"], g["junk"]]).astype(np.int64))
                    for g in gnd]
        _, pos = rank_positions(q, [gv, dis], labelled, k=100)
        metrics = evaluate_positions(list(zip(labelled, pos)), gnd)
    seconds = time.perf_counter() - t
    stop.set()
    th.join()
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    return {"mode": mode, "seconds": seconds, "peak_rss_gb": hwm / 2 ** 20,
            "peak_anon_rss_gb": peak.get("anon_kb", 0) / 2 ** 20,
            "peak_anon_increase_gb": (peak.get("anon_kb", 0) - base_kb) / 2 ** 20,
            "metrics": metrics}


def bench_plus1m(args) -> dict:
    """Former vs blockwise +1M evaluation, each in a fresh process (see the module doc)."""
    import subprocess
    folder = args.plus1m_dir
    t = time.perf_counter()
    files = _plus1m_files(folder, args.plus1m_distractors, args.dim)
    print(f"  files in {folder} ready in {time.perf_counter() - t:.0f} s", flush=True)
    size_gb = os.path.getsize(files["distractors"]) / 2 ** 30
    out: dict = {"distractors": args.plus1m_distractors, "dim": args.dim, "queries": 70,
                 "distractor_file_gb": size_gb}
    for mode in ("old", "new"):
        res = subprocess.run([sys.executable, __file__, "--plus1m-worker", mode, "--plus1m-dir",
                              folder, "--plus1m-distractors", str(args.plus1m_distractors),
                              "--dim", str(args.dim)], capture_output=True, text=True,
                             check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[mode]
        print(f"  {mode:<4} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_gb']:.2f} GiB  "
              f"peak anonymous RSS {r['peak_anon_rss_gb']:.2f} GiB "
              f"(+{r['peak_anon_increase_gb']:.2f} over the imports)  medium mAP "
              f"{100 * r['metrics']['medium']['mAP']:.3f}", flush=True)
    old, new = out["old"]["metrics"], out["new"]["metrics"]
    out["max_metric_diff"] = max(abs(old[s][m] - new[s][m]) for s in old for m in old[s])
    out["speedup"] = out["old"]["seconds"] / out["new"]["seconds"]
    print(f"  largest metric difference {out['max_metric_diff']:.1e} (float32 faiss vs float64 "
          f"scores: near-ties); new is {out['speedup']:.1f}x faster", flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| index | params | queries/s | x exact | recall@100 | build s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        p = ", ".join(f"{a}={b}" for a, b in r["params"].items())
        if "skipped" in r:
            lines.append(f"| {r['index']} | {p} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['index']} | {p} | {r['qps']:.0f} +- {r['qps_std']:.0f} | "
                     f"{r['speedup']:.1f} | {r['recall@100']:.3f} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100k descriptors, fewer repeats")
    p.add_argument("--n", type=int, default=None, help="database size (default 1M / 100k)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=None, help="timed search repeats")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF cells (default ~4 sqrt(n), a power of two: 4096 for 1M)")
    p.add_argument("--train-size", type=int, default=None,
                   help="k-means / encoder training sample (default 32 x nlist)")
    p.add_argument("--hnsw-max", type=int, default=200_000,
                   help="skip HNSW above this size (its build takes long on few cores)")
    p.add_argument("--descriptors", default=None,
                   help="benchmark on a real database descriptor NAME (finegrain embed) ...")
    p.add_argument("--query-descriptors", default=None, help="... with these queries")
    p.add_argument("--model", default="dalg_vit_small_patch16_224")
    p.add_argument("--images", type=int, default=None, help="images per extraction run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--extract-repeats", type=int, default=None)
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--plus1m", action="store_true",
                   help="+1M evaluation: former vs blockwise path, time and peak RSS")
    p.add_argument("--plus1m-dir", default="/tmp/finegrain_plus1m",
                   help="where the +1M descriptor files are written (about 2 GB)")
    p.add_argument("--plus1m-distractors", type=int, default=1_001_001)
    p.add_argument("--plus1m-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.plus1m_worker:  # one +1M evaluation, in a fresh process (bench_plus1m)
        files = _plus1m_files(args.plus1m_dir, args.plus1m_distractors, args.dim)
        print(json.dumps(plus1m_worker(args.plus1m_worker, files)))
        return
    if bool(args.descriptors) != bool(args.query_descriptors):
        p.error("--descriptors and --query-descriptors go together")
    args.n = args.n or (100_000 if args.quick else 1_000_000)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.images = args.images or (4 if args.quick else 8)
    args.extract_repeats = args.extract_repeats or (1 if args.quick else 3)
    name = "retrieval_quick.json" if args.quick else "retrieval.json"
    if args.plus1m and args.skip_extraction and args.skip_search:
        name = "retrieval_plus1m.json"  # keep the search table's file
    out_path = args.out or str(Path(__file__).parent / "results" / name)
    machine = machine_info("cpu", "cores", "torch_threads", "faiss_threads", "python", "torch",
                           "faiss", "numpy", "timm")
    print("machine:", json.dumps(machine), flush=True)
    res: dict = {"machine": machine, "args": vars(args)}
    if not args.skip_extraction:
        print("descriptor extraction (512 x 384, longest side 512):", flush=True)
        res["extraction"] = bench_extraction(args)
    if not args.skip_search:
        print(f"search ({args.n} x {args.dim}, {args.queries} queries, top-100):", flush=True)
        res["search"] = bench_search(args)
        print(table(res["search"]["rows"]))
        print("chosen (fastest with recall@100 >= 0.9 and >= 10x exact):",
              res["search"]["chosen"])
    if args.plus1m:
        print(f"+1M evaluation (ROxford5k gnd, 70 queries, {args.plus1m_distractors} "
              f"distractors x {args.dim}, memory-mapped):", flush=True)
        res["plus1m"] = bench_plus1m(args)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print("->", out_path)


if __name__ == "__main__":
    main()
