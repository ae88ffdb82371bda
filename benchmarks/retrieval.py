"""Retrieval pipeline costs, measured in one run.

1. **Descriptor extraction**: images/s of :func:`finegrain.retrieval.extract.extract` with
   ``dalg_vit_small_patch16_224`` at a fixed 512 px longest side (512 x 384 images, 4:3),
   single scale vs DOLG's 5 scales (0.3535, 0.5, 0.7071, 1, 1.4142).
2. **Search (the ANN table)**: for each generated distribution (``--distributions``):
   *tight clusters* (:func:`clustered_descriptors`, ~1 cluster of ~256 per IVF cell),
   *small clusters* (:func:`small_cluster_descriptors`, ~16 points each, centres in a 24-d
   latent mapped linearly) and *no clusters* (:func:`unclustered_descriptors`, an anisotropic
   Gaussian), ``--n`` x ``--dim`` (default 256) L2-normalised float32 with 1,000 held-out
   queries of the same distribution, top-100, inner product: exact search
   (``IndexFlatIP``, :func:`finegrain.retrieval.search.knn`) and every index kind
   (``--kinds``: IVF-Flat, IVF-SQ8, IVF-PQ, IVF-PQ 4-bit fast-scan + exact refine, HNSW32
   up to ``--hnsw-max``) over a parameter sweep (``--nprobes``, ``--k-factors``, efSearch):
   queries/s, the ratio to the exact queries/s of the same run, recall@100 (overlap with
   the exact top-100), build time (coarse k-means of 10 iterations on the training sample,
   ``default_train_size`` unless ``--train-size``, + encoding and adding), and the share of
   the exact top-100 in the query's own IVF cell. faiss runs on ``--threads`` (2) OpenMP
   threads. ``chosen``: the setting with recall@100 >= 0.9 on every distribution whose worst
   speedup is the largest (what ``default_factory`` follows).
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
versions and one table per distribution; writes JSON (``benchmarks/results/retrieval.json``,
or ``retrieval_quick.json`` with ``--quick``: 100k descriptors, fewer repeats).

    python benchmarks/retrieval.py             # 1M descriptors: ~4 GB RAM, an hour on 2 cores
    python benchmarks/retrieval.py --skip-extraction --kinds SQ8,RFlat --repeats 1
        --nprobes 32,64,128,256,512 --k-factors 8 --train-size 131072  # (one line) 1M table
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
from finegrain.retrieval.index import default_train_size  # noqa: E402
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
#: The generated distributions of the ANN table (``--distributions``), easiest first.
DISTRIBUTIONS = ("tight_clusters", "small_clusters", "no_clusters")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunked(m: int, d: int, draw_rows) -> np.ndarray:
    """(m, d) float32 filled 100k rows at a time by ``draw_rows(count) -> (count, d)``."""
    out = np.empty((m, d), dtype=np.float32)
    for a in range(0, m, 100_000):
        b = min(a + 100_000, m)
        out[a:b] = _unit(draw_rows(b - a))
    return out


def clustered_descriptors(n: int, d: int, nq: int, seed: int = 0, n_clusters: int | None = None,
                          intrinsic: int = 64, noise: float = 0.25
                          ) -> tuple[np.ndarray, np.ndarray]:
    """"Tight clusters": L2-normalised descriptors from a Gaussian mixture in an
    ``intrinsic``-dim latent space (``n_clusters`` "landmarks", default one per 256 vectors,
    sizes drawn from a Dirichlet, per-cluster spreads 0.4-1.0 so neighbouring clusters
    overlap), mapped to ``d`` dims by a random orthonormal matrix, plus isotropic noise. Seeded.
    At 1M: ~3,900 clusters, about one per IVF4096 cell.

    Returns:
        ``(database (n, d), queries (nq, d))`` float32; queries are new draws of the mixture.
    """
    n_clusters = n_clusters or max(16, n // 256)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, intrinsic)).astype(np.float32)
    spread = rng.uniform(0.4, 1.0, n_clusters).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((d, intrinsic)))
    basis = basis.T.astype(np.float32)  # (intrinsic, d), orthonormal rows
    weights = rng.dirichlet(np.full(n_clusters, 2.0))

    def rows(m: int) -> np.ndarray:
        c = rng.choice(n_clusters, m, p=weights)
        z = centres[c] + spread[c, None] * rng.standard_normal((m, intrinsic), dtype=np.float32)
        return z @ basis + noise * rng.standard_normal((m, d), dtype=np.float32) \
            / math.sqrt(d / intrinsic)

    return _chunked(n, d, rows), _chunked(nq, d, rows)


def small_cluster_descriptors(n: int, d: int, nq: int, seed: int = 0, cluster_size: int = 16,
                              latent: int = 24, spread: float = 0.5, noise: float = 0.3
                              ) -> tuple[np.ndarray, np.ndarray]:
    """"Small clusters": ``n / cluster_size`` clusters (Poisson sizes, mean ``cluster_size``:
    instances of one object) whose centres are N(0, I) in a ``latent``-dim space, points
    ``spread`` around them there, mapped to ``d`` dims by a random Gaussian matrix (linear, not
    orthonormal: unequal variances), plus isotropic noise (``noise`` per dim, relative to the
    ~1 per-dim signal), L2-normalised. Seeded.

    Returns:
        ``(database (n, d), queries (nq, d))`` float32; queries are new points of clusters
        drawn uniformly (held out, not copies of database rows).
    """
    n_clusters = max(1, n // cluster_size)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, latent)).astype(np.float32)
    mixing = (rng.standard_normal((latent, d)) / math.sqrt(latent)).astype(np.float32)

    def rows(m: int) -> np.ndarray:
        z = centres[rng.integers(n_clusters, size=m)] + \
            spread * rng.standard_normal((m, latent), dtype=np.float32)
        return z @ mixing + noise * rng.standard_normal((m, d), dtype=np.float32)

    return _chunked(n, d, rows), _chunked(nq, d, rows)


def unclustered_descriptors(n: int, d: int, nq: int, seed: int = 0, decay: float = 0.5
                            ) -> tuple[np.ndarray, np.ndarray]:
    """"No clusters": an anisotropic Gaussian, standard deviation ``(i + 1) ** -decay`` along
    the i-th axis of a random orthonormal basis (a power-law PCA spectrum like real
    descriptors'; 0.5 at 256-d: participation ratio ~23 dims), L2-normalised. Seeded.

    Returns:
        ``(database (n, d), queries (nq, d))`` float32; queries are new draws.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scaled = ((np.arange(d) + 1.0) ** -decay)[:, None] * basis.T  # (d, d): spectrum x rotation
    scaled = scaled.astype(np.float32)

    def rows(m: int) -> np.ndarray:
        return rng.standard_normal((m, d), dtype=np.float32) @ scaled

    return _chunked(n, d, rows), _chunked(nq, d, rows)


GENERATORS = {"tight_clusters": clustered_descriptors,
              "small_clusters": small_cluster_descriptors,
              "no_clusters": unclustered_descriptors}


def recall_at(ids: np.ndarray, gt: np.ndarray) -> float:
    """Mean |approx top-k  intersect  exact top-k| / k; ids (nq, >=k), gt (nq, k)."""
    k = gt.shape[1]
    return float(np.mean([len(np.intersect1d(a[:k], b)) / k for a, b in zip(ids, gt)]))


def timed_search(fn, warmup_fn, repeats: int) -> tuple[float, float, list[float], tuple]:
    """Seconds (mean, std, runs) of ``repeats`` calls of ``fn`` after one dropped
    ``warmup_fn()`` (the same search on 100 queries), and the last result."""
    warmup_fn()
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


def coarse_quantizer(db: np.ndarray, nlist: int, train_size: int, seed: int = 0,
                     niter: int = 10):
    """Spherical k-means (``nlist`` cells, ``niter`` iterations) on a seeded sample of
    ``train_size`` rows and the assignment of every row to its cell.

    Returns:
        ``(quantizer (IndexFlatIP of the centroids), assign (n,) int64, sample, seconds)``.
    """
    n, d = db.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, min(train_size, n), replace=False))
    sample = np.ascontiguousarray(db[rows])
    with _Timer() as t:
        km = faiss.Kmeans(d, nlist, niter=niter, spherical=True, seed=seed + 1)
        km.train(sample)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(km.centroids)
        assign = quantizer.search(db, 1)[1].ravel().astype(np.int64)
    return quantizer, assign, sample, t.s


def own_cell_share(quantizer: faiss.Index, assign: np.ndarray, q: np.ndarray,
                   gt: np.ndarray) -> float:
    """Share of the exact top-k (gt (nq, k) row ids) lying in the query's own IVF cell (the
    cell nprobe=1 visits): near 1, a few cells find everything; low, many must be visited."""
    own = quantizer.search(q, 1)[1]  # (nq, 1)
    return float(np.mean(assign[gt] == own))


def sweeps(nprobes: list[int], k_factors: list[int]) -> dict[str, list[list[dict]]]:
    """Search settings per candidate kind, as series ordered by cost: a series stops at the
    first setting with recall@100 >= ``--stop-recall`` (the later ones only cost more)."""
    return {"Flat": [[{"nprobe": p} for p in nprobes]],
            "SQ8": [[{"nprobe": p} for p in nprobes]],
            "PQ": [[{"nprobe": p} for p in (16, 64)]],
            "RFlat": [[{"nprobe": p, "k_factor_rf": kf} for p in nprobes if p >= 2 * kf]
                      for kf in k_factors],
            "HNSW": [[{"efSearch": e} for e in (64, 128, 256, 512)]]}


def _kind(factory: str) -> str:
    return next(k for k in ("RFlat", "SQ8", "HNSW", "PQ", "Flat") if k in factory)


def build_candidates(db: np.ndarray, quantizer: faiss.Index, assign: np.ndarray,
                     sample: np.ndarray, kinds: set[str], hnsw: bool):
    """Yield ``(factory, index, build_seconds)`` (the coarse quantizer's time not included);
    the IVF variants share ``quantizer`` and ``assign``, so they differ only in how the
    vectors are encoded (what ``index_factory`` builds with the same cells)."""
    n, d = db.shape
    nlist = quantizer.ntotal if quantizer is not None else 0
    ip = faiss.METRIC_INNER_PRODUCT

    def fill(ix):
        ix.train(sample)  # the coarse quantizer is trained: only the encoder is
        ix.add_core(n, faiss.swig_ptr(db), None, faiss.swig_ptr(assign))
        return ix

    M = max(1, d // 8)  # 8-bit PQ: d / 8 bytes; 4-bit fast-scan PQ: d / 4 sub-quantizers,
    M4 = max(2, d // 4)  # the same d / 8 bytes (32 bytes a vector for 256-d)
    if "Flat" in kinds:
        with _Timer() as t:
            ix = fill(faiss.IndexIVFFlat(quantizer, d, nlist, ip))
        yield f"IVF{nlist},Flat", ix, t.s
        del ix
    if "SQ8" in kinds:
        with _Timer() as t:
            ix = fill(faiss.IndexIVFScalarQuantizer(quantizer, d, nlist,
                                                    faiss.ScalarQuantizer.QT_8bit, ip))
        yield f"IVF{nlist},SQ8", ix, t.s
        del ix
    if "PQ" in kinds:
        with _Timer() as t:
            ix = fill(faiss.IndexIVFPQ(quantizer, d, nlist, M, 8, ip))
        yield f"IVF{nlist},PQ{M}", ix, t.s
        del ix
    gc.collect()
    if "RFlat" in kinds:
        with _Timer() as t:
            pq4 = fill(faiss.IndexIVFPQ(quantizer, d, nlist, M4, 4, ip))
            fs = faiss.IndexIVFPQFastScan(pq4)  # same codes, SIMD fast-scan layout
            del pq4
            ix = faiss.IndexRefineFlat(fs, faiss.swig_ptr(db))  # exact re-scoring of a shortlist
        yield f"IVF{nlist},PQ{M4}x4fs,RFlat", ix, t.s
        del ix, fs
        gc.collect()
    if hnsw and "HNSW" in kinds:
        with _Timer() as t:
            ix = build_index(db, "HNSW32", metric="cosine")
        yield "HNSW32", ix, t.s
        del ix
        gc.collect()


def bench_distribution(name: str, db: np.ndarray, q: np.ndarray, args) -> dict:
    """The ANN table of one database / query set: exact, then every candidate's sweep."""
    n, d = db.shape
    nq, k = len(q), 100
    flat = faiss.IndexFlatIP(d)
    flat.add(db)
    m, s, runs, (_, gt) = timed_search(lambda: knn(q, None, k, index=flat),
                                       lambda: knn(q[:100], None, k, index=flat), args.repeats)
    flat.reset()  # frees the copy of the database
    exact_qps = nq / m
    rows = [{"index": "Flat (exact, knn)", "params": {}, "qps": exact_qps,
             "qps_std": exact_qps * s / m, "recall@100": 1.0, "speedup": 1.0, "build_s": 0.0,
             "runs_s": runs}]
    print(f"  {'Flat (exact)':<44} {exact_qps:9.1f} q/s  recall 1.000", flush=True)
    nlist = args.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    ip = faiss.METRIC_INNER_PRODUCT
    train_size = args.train_size or default_train_size(faiss.index_factory(d, f"IVF{nlist},SQ8",
                                                                            ip))
    out = {"n": n, "dim": d, "queries": nq, "k": k, "nlist": nlist,
           "train_size": min(train_size, n), "exact_qps": exact_qps, "rows": rows}
    kinds = set(args.kinds.split(","))
    if kinds - {"HNSW"}:
        quantizer, assign, sample, qs = coarse_quantizer(db, nlist, train_size, niter=10)
        out["coarse_s"] = qs
        out["own_cell_share"] = own_cell_share(quantizer, assign, q, gt)
        print(f"  coarse quantizer IVF{nlist}: k-means (10 iterations) on {len(sample)} + "
              f"assignment of {n} in {qs:.0f} s; own-cell share of the exact top-100: "
              f"{out['own_cell_share']:.3f}", flush=True)
    else:
        quantizer = assign = sample = None
    hnsw = n <= args.hnsw_max
    for factory, ix, build_s in build_candidates(db, quantizer, assign, sample, kinds, hnsw):
        build_s += out.get("coarse_s", 0.0) if factory.startswith("IVF") else 0.0
        for series in sweeps(args.nprobes, args.k_factors)[_kind(factory)]:
            for params in series:
                space = faiss.ParameterSpace()
                for pname, v in params.items():
                    space.set_index_parameter(ix, pname, v)
                m, s, runs, (_, ids) = timed_search(lambda: ix.search(q, k),
                                                    lambda: ix.search(q[:100], k), args.repeats)
                qps = nq / m
                rec = recall_at(ids, gt)
                rows.append({"index": factory, "params": params, "qps": qps,
                             "qps_std": qps * s / m, "recall@100": rec,
                             "speedup": qps / exact_qps, "build_s": build_s, "runs_s": runs})
                ptxt = ",".join(f"{a}={b}" for a, b in params.items())
                print(f"  {factory + ' ' + ptxt:<44} {qps:9.1f} q/s  recall {rec:.3f}  "
                      f"x{qps / exact_qps:.1f}  (build {build_s:.0f} s)", flush=True)
                if rec >= args.stop_recall:
                    break
    if not hnsw and "HNSW" in kinds:
        rows.append({"index": "HNSW32", "params": {}, "skipped":
                     f"not built for n > {args.hnsw_max} (--hnsw-max): its build takes tens "
                     f"of minutes on 2 cores"})
    ok = [r for r in rows[1:] if "qps" in r and r["recall@100"] >= 0.9]
    best = max(ok, key=lambda r: r["qps"]) if ok else None
    out["best"] = None if best is None else {k_: best[k_] for k_ in
                                             ("index", "params", "recall@100", "speedup")}
    return out


def choose(dists: dict[str, dict], min_recall: float = 0.9, stop_recall: float = 0.97
           ) -> dict | None:
    """The setting (index, params) with recall@100 >= ``min_recall`` on every distribution
    whose worst measured speedup over exact is the largest. A setting a distribution did not
    measure because its series stopped earlier (a cheaper setting of the series, same
    ``k_factor_rf``, already reached ``stop_recall`` >= ``min_recall``) counts as meeting the
    recall there; ``implied`` names those distributions."""
    measured: dict[str, dict[str, dict]] = {}  # key -> distribution -> row
    for name, res in dists.items():
        for r in res["rows"][1:]:
            if "qps" in r:
                measured.setdefault(json.dumps([r["index"], r["params"]]), {})[name] = r

    def stopped_below(name: str, index: str, params: dict) -> bool:
        return any(r["index"] == index and r["recall@100"] >= stop_recall and
                   r["params"].get("nprobe", 0) < params.get("nprobe", 0) and
                   {a: b for a, b in r["params"].items() if a != "nprobe"} ==
                   {a: b for a, b in params.items() if a != "nprobe"}
                   for r in dists[name]["rows"][1:] if "qps" in r)

    best = None
    for key, rows in measured.items():
        index, params = json.loads(key)
        if min(r["recall@100"] for r in rows.values()) < min_recall:
            continue
        implied = [name for name in dists if name not in rows]
        if not all(stopped_below(name, index, params) for name in implied):
            continue
        worst = min(r["speedup"] for r in rows.values())
        if best is None or worst > best["min_speedup"]:
            best = {"index": index, "params": params, "min_speedup": worst,
                    "min_recall@100": min(r["recall@100"] for r in rows.values()),
                    "implied": implied}
    return best


def bench_search(args, save=None) -> dict:
    """The ANN table of every distribution; ``save(partial)`` after each one (a long 1M run
    keeps what it measured if stopped)."""
    faiss.omp_set_num_threads(args.threads)
    out: dict = {"threads": args.threads, "distributions": {}}
    if args.descriptors:  # real descriptor files (finegrain embed) instead of generated ones
        from finegrain.retrieval.descriptors import load_descriptors
        sets = {"given": lambda: tuple(np.ascontiguousarray(load_descriptors(a).vectors)
                                       for a in (args.descriptors, args.query_descriptors))}
    else:
        sets = {name: (lambda g=GENERATORS[name]: g(args.n, args.dim, args.queries, seed=0))
                for name in args.distributions.split(",")}
    for name, make in sets.items():
        t = time.perf_counter()
        db, q = make()
        print(f" {name}: data {db.shape} + queries {q.shape} ready in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        out["distributions"][name] = res = bench_distribution(name, db, q, args)
        share = res.get("own_cell_share")
        print(f"\n{name}: {res['n']} x {res['dim']}, IVF{res['nlist']} trained on "
              f"{res['train_size']}, own-cell share of the exact top-100 "
              f"{'-' if share is None else f'{share:.3f}'}, exact {res['exact_qps']:.0f} q/s")
        print(table(res["rows"]), flush=True)
        if save is not None:
            save(out)
        del db, q
        gc.collect()
    out["chosen"] = choose(out["distributions"], stop_recall=args.stop_recall)
    return out


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
    files = _plus1m_files(folder, args.plus1m_distractors, args.plus1m_dim)
    print(f"  files in {folder} ready in {time.perf_counter() - t:.0f} s", flush=True)
    size_gb = os.path.getsize(files["distractors"]) / 2 ** 30
    out: dict = {"distractors": args.plus1m_distractors, "dim": args.plus1m_dim, "queries": 70,
                 "distractor_file_gb": size_gb}
    for mode in ("old", "new"):
        res = subprocess.run([sys.executable, __file__, "--plus1m-worker", mode, "--plus1m-dir",
                              folder, "--plus1m-distractors", str(args.plus1m_distractors),
                              "--plus1m-dim", str(args.plus1m_dim)],
                             capture_output=True, text=True, check=True)
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
    p.add_argument("--dim", type=int, default=256,
                   help="descriptor dim of the search table (the +1M evaluation uses 512)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=None, help="timed search repeats")
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads (search)")
    p.add_argument("--distributions", default=",".join(DISTRIBUTIONS),
                   help="generated sets of the ANN table, comma-separated")
    p.add_argument("--kinds", default="Flat,SQ8,PQ,RFlat,HNSW",
                   help="index kinds measured: Flat (IVF-Flat), SQ8, PQ (IVF-PQ 8-bit), RFlat "
                        "(IVF-PQ 4-bit fast-scan + exact refine), HNSW (HNSW32)")
    p.add_argument("--nprobes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[4, 8, 16, 32, 64, 128, 256, 512], help="IVF nprobe sweep")
    p.add_argument("--k-factors", type=lambda v: [int(x) for x in v.split(",")],
                   default=[4, 8, 16], help="k_factor_rf sweep of the refined fast-scan index")
    p.add_argument("--stop-recall", type=float, default=0.97,
                   help="stop a parameter series at the first setting with this recall@100")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF cells (default ~4 sqrt(n), a power of two: 4096 for 1M)")
    p.add_argument("--train-size", type=int, default=None,
                   help="k-means / encoder training sample (default: default_train_size of "
                        "the index, 64 x nlist and >= 65,536, what `index build` uses)")
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
    p.add_argument("--plus1m-dim", type=int, default=512)
    p.add_argument("--plus1m-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.plus1m_worker:  # one +1M evaluation, in a fresh process (bench_plus1m)
        files = _plus1m_files(args.plus1m_dir, args.plus1m_distractors, args.plus1m_dim)
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

    def write(result: dict) -> None:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    if not args.skip_extraction:
        print("descriptor extraction (512 x 384, longest side 512):", flush=True)
        res["extraction"] = bench_extraction(args)
    if not args.skip_search:
        print(f"search ({args.n} x {args.dim}, {args.queries} queries, top-100, "
              f"{args.threads} faiss threads):", flush=True)
        res["search"] = bench_search(args, save=lambda part: write({**res, "search": part}))
        print("chosen (largest worst-case speedup with recall@100 >= 0.9 on every "
              "distribution):", res["search"]["chosen"])
    if args.plus1m:
        print(f"+1M evaluation (ROxford5k gnd, 70 queries, {args.plus1m_distractors} "
              f"distractors x {args.plus1m_dim}, memory-mapped):", flush=True)
        res["plus1m"] = bench_plus1m(args)
    write(res)
    print("->", out_path)


if __name__ == "__main__":
    main()
