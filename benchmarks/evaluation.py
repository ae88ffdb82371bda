"""Benchmark of finegrain.evaluation at the sizes of the real protocols.

Cases (all on generated data, seeded):

a. Re-ID, Market-1501 size (3,368 x 15,913 float32 distance matrix, 751 ids, 6 cameras,
   distractors and junk ids): ``reid.evaluate`` against the per-query numpy loop over a full
   argsort that torchreid's python evaluator runs (and a leaner loop that argsorts inside the
   loop), in the same run.
b. Re-ID, MSMT17 size (11,659 x 82,161, 256-d descriptors): ``reid.evaluate_features`` time
   and the peak resident-memory increase during the call (the full matrix would be 3.8 GB).
c. Revisited Oxford + 1M distractors: ``revisited.evaluate`` on (1,001,001 x 70) ranks (argsort
   of random scores, generated a column at a time) with the real ROxford5k ground truth, time
   and peak memory increase, against a port of revisitop's ``compute_map`` loop (Medium only).
d. DML: ``dml.evaluate`` on 10,000 x 128 embeddings (100 classes), with and without NMI, and
   pytorch-metric-learning's AccuracyCalculator (precision_at_1 + MAP@R) for reference.
e. Re-ranking at Market-1501 size: ``reid.re_rank`` (k1=20, k2=6, lambda=0.3) time and peak
   memory increase over its three input matrices.

Each timing drops one warm-up run and reports mean and std over ``--repeats`` runs. Memory is
the peak RSS during the call minus the RSS before it, sampled every 2 ms.

Usage::

    python benchmarks/evaluation.py [--quick] [--repeats 3] [--threads 1]
        [--out benchmarks/results/evaluation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, mean_std, timed  # noqa: E402
from finegrain.evaluation import dml, reid, revisited  # noqa: E402

FULL = {
    "market": (3368, 15913),
    "msmt": (11659, 82161),
    "roxf_db": 1_001_001,
    "dml": 10_000,
    "rerank": (3368, 15913),
}
QUICK = {
    "market": (400, 2000),
    "msmt": (1500, 10000),
    "roxf_db": 50_000,
    "dml": 2_000,
    "rerank": (300, 1500),
}


# ----------------------------------------------------------------------------- measuring
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn`` once; return (result, seconds, peak RSS increase in MiB)."""
    start, peak, done = _rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return out, seconds, max(peak[0], _rss()) - start


def timeit(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Mean and std of ``repeats`` timed runs after one dropped warm-up run."""
    return _stats(timed(fn, 1, repeats))


def _stats(times: list[float]) -> dict[str, float]:
    mean, std = mean_std(times)
    return {"mean_s": mean, "std_s": std, "runs": len(times)}


def machine() -> dict[str, Any]:
    return machine_info(
        "cpu", "cpu_flags_avx512", "load_average_1min", "cores_visible", "torch_threads",
        "faiss_threads", "python", "numpy", "torch", "faiss", "pytorch_metric_learning",
        cpu_flags_avx512=(
            "avx512f" in Path("/proc/cpuinfo").read_text()
            if Path("/proc/cpuinfo").exists()
            else None
        ),
        load_average_1min=os.getloadavg()[0],
    )


# ----------------------------------------------------------------------------- baselines
def torchreid_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's python ``eval_market1501`` (+ fast-reid's mINP): full argsort, then a loop
    over queries (AP vectorised with numpy instead of its Python list comprehension)."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw = matches[q][~remove]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.flatnonzero(raw)[-1]
        all_inp.append(cmc[last] / (last + 1.0))
        all_ap.append((cmc / np.arange(1.0, len(raw) + 1) * raw).sum() / raw.sum())
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
    return (
        np.asarray(all_cmc, dtype=np.float32).mean(0),
        float(np.mean(all_ap)),
        float(np.mean(all_inp)),
    )


def lean_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The same per-query loop, argsorting one row at a time (no (Q, G) index matrix)."""
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q])
        same = g_pids[order] == q_pids[q]
        raw = same[~(same & (g_camids[order] == q_camids[q]))]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        pos = np.flatnonzero(raw)
        all_inp.append(cmc[pos[-1]] / (pos[-1] + 1.0))
        all_ap.append((cmc[pos] / (pos + 1.0)).mean())
        all_cmc.append(cmc[:max_rank] > 0)
    return np.mean(all_cmc, 0), float(np.mean(all_ap)), float(np.mean(all_inp))


def revisitop_loop(ranks: np.ndarray, gnd: list[dict]) -> float:
    """revisitop's ``compute_map`` structure: np.isin over each column, junk shifted in a loop."""
    total, nonempty = 0.0, 0
    for i, g in enumerate(gnd):
        if len(g["ok"]) == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[:, i], g["ok"]))
        junk = np.flatnonzero(np.isin(ranks[:, i], g["junk"]))
        k = ij = 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = 0.0
        for j, r in enumerate(pos):
            ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(g["ok"])
        total += ap
        nonempty += 1
    return total / nonempty


# ----------------------------------------------------------------------------- data
def reid_ids(rng, num_q, num_g, num_ids, num_cams, distractor_frac=0.175, junk_frac=0.24):
    n_dis, n_junk = int(num_g * distractor_frac), int(num_g * junk_frac)
    g_pids = np.concatenate(
        [
            rng.integers(1, num_ids + 1, num_g - n_dis - n_junk),
            np.zeros(n_dis, int),
            -np.ones(n_junk, int),
        ]
    )
    g_cams = rng.integers(0, num_cams, num_g)
    q_pids = rng.integers(1, num_ids + 1, num_q)
    q_cams = rng.integers(0, num_cams, num_q)
    return q_pids, g_pids, q_cams, g_cams


def case_market(size, repeats, rng) -> dict[str, Any]:
    num_q, num_g = size
    ids = reid_ids(rng, num_q, num_g, 751, 6)
    dist = rng.random((num_q, num_g), dtype=np.float32)
    dist -= 0.3 * (ids[0][:, None] == ids[1][None, :])  # true matches a bit closer
    ours = timeit(lambda: reid.evaluate(dist, *ids), repeats)
    ref = timeit(lambda: torchreid_loop(dist, *ids), repeats)
    lean = timeit(lambda: lean_loop(dist, *ids), repeats)
    out, cmc, m_ap, m_inp = reid.evaluate(dist, *ids), *torchreid_loop(dist, *ids)
    return {
        "shape": [num_q, num_g],
        "ours": ours,
        "torchreid_loop": ref,
        "lean_loop": lean,
        "speedup_vs_torchreid_loop": ref["mean_s"] / ours["mean_s"],
        "speedup_vs_lean_loop": lean["mean_s"] / ours["mean_s"],
        "mAP": out["mAP"],
        # float32 random distances have ties, which np.argsort (quicksort) orders arbitrarily
        "max_abs_diff_vs_torchreid_loop": float(
            max(abs(out["mAP"] - m_ap), abs(out["mINP"] - m_inp), np.abs(out["cmc"] - cmc).max())
        ),
    }


def case_msmt(size, repeats, rng) -> dict[str, Any]:
    num_q, num_g = size
    ids = reid_ids(rng, num_q, num_g, 3060, 15, distractor_frac=0.0, junk_frac=0.0)
    centres = rng.standard_normal((3061, 256)).astype(np.float32)
    q = torch.from_numpy(centres[ids[0]] + 2 * rng.standard_normal((num_q, 256), dtype=np.float32))
    g = torch.from_numpy(centres[ids[1]] + 2 * rng.standard_normal((num_g, 256), dtype=np.float32))
    reid.evaluate_features(
        q[:256], g[:4096], ids[0][:256], ids[1][:4096], ids[2][:256], ids[3][:4096]
    )  # warm-up
    runs = [
        peak_memory(lambda: reid.evaluate_features(q, g, *ids, metric="cosine"))
        for _ in range(repeats)
    ]
    times = [r[1] for r in runs]
    return {
        "shape": [num_q, num_g],
        "dim": 256,
        "ours": _stats(times),
        "peak_rss_increase_mib": max(r[2] for r in runs) / 2**20,
        "full_distmat_mib": num_q * num_g * 4 / 2**20,
        "mAP": runs[-1][0]["mAP"],
    }


def _roxford_gnd(n_db: int, rng) -> tuple[list[dict], str]:
    path = ROOT.parent / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"
    if path.is_file():
        return revisited.load_gnd(path)["gnd"], str(path.name)
    gnd = []
    for _ in range(70):  # stand-in with ROxford-like list sizes
        idx = rng.choice(4993, 120, replace=False)
        gnd.append({"easy": idx[:40], "hard": idx[40:80], "junk": idx[80:]})
    return gnd, "generated"


def case_revisited(n_db, repeats, rng) -> dict[str, Any]:
    gnd, source = _roxford_gnd(n_db, rng)
    ranks = np.empty((n_db, len(gnd)), dtype=np.int64)
    for i in range(len(gnd)):  # one column at a time: never (n_db, 70) float scores
        scores = rng.random(n_db, dtype=np.float32)
        scores[gnd[i]["easy"]] += 0.5
        ranks[:, i] = np.argsort(-scores)
    revisited.evaluate(ranks[:10000], gnd)  # warm-up
    runs = [peak_memory(lambda: revisited.evaluate(ranks, gnd)) for _ in range(repeats)]
    times = [r[1] for r in runs]
    medium = revisited.setting_gnd(gnd, "medium")
    t0 = time.perf_counter()
    ref_map = revisitop_loop(ranks, medium)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_map = revisited.compute_map(ranks, medium)[0]
    ours_s = time.perf_counter() - t0
    return {
        "ranks_shape": list(ranks.shape),
        "ranks_mib": ranks.nbytes / 2**20,
        "gnd": source,
        "ours_3_settings": _stats(times),
        "peak_rss_increase_mib": max(r[2] for r in runs) / 2**20,
        "medium_ours_s": ours_s,
        "medium_revisitop_loop_s": ref_s,
        "medium_abs_diff": abs(ours_map - ref_map),
        "mAP": {k: v["mAP"] for k, v in runs[-1][0].items()},
    }


def case_rerank(size, repeats, rng) -> dict[str, Any]:
    num_q, num_g = size
    ids = rng.integers(0, (num_q + num_g) // 10, num_q + num_g)
    x = torch.from_numpy(rng.standard_normal((ids.max() + 1, 64), dtype=np.float32))[ids] * 2
    x += torch.from_numpy(rng.standard_normal((num_q + num_g, 64), dtype=np.float32))
    q, g = x[:num_q], x[num_q:]
    qg = reid.compute_distance(q, g).clamp_min(0).sqrt().numpy()
    qq = reid.compute_distance(q, q).clamp_min(0).sqrt().numpy()
    gg = reid.compute_distance(g, g).clamp_min(0).sqrt().numpy()
    reid.re_rank(qg[:100, :500], qq[:100, :100], gg[:500, :500])  # warm-up
    runs = [peak_memory(lambda: reid.re_rank(qg, qq, gg)) for _ in range(repeats)]
    times = [r[1] for r in runs]
    n = num_q + num_g
    return {
        "shape": [num_q, num_g],
        "ours": _stats(times),
        "peak_rss_increase_mib": max(r[2] for r in runs) / 2**20,
        "inputs_mib": (qg.nbytes + qq.nbytes + gg.nbytes) / 2**20,
        "reference_estimate_mib": 24 * n * n / 2**20,  # five (N, N) matrices + argsort indices
    }


def case_dml(n, repeats, rng) -> dict[str, Any]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    labels = rng.integers(0, 100, n)
    x = rng.standard_normal((100, 128)).astype(np.float32)[labels] + 1.5 * rng.standard_normal(
        (n, 128), dtype=np.float32
    )
    ks = (1, 2, 4, 8)
    with_nmi = timeit(lambda: dml.evaluate(x, labels, ks=ks, nmi=True), repeats)
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    # ours (Recall@K + MAP@R) and PML (P@1 + MAP@R) alternate, so machine noise hits both
    ours_fn = lambda: dml.evaluate(x, labels, ks=ks, nmi=False)  # noqa: E731
    pml_fn = lambda: calc.get_accuracy(xn, torch.from_numpy(labels))  # noqa: E731
    ours_fn(), pml_fn()  # warm-up, dropped
    ours_t, pml_t = [], []
    for _ in range(max(repeats, 5)):
        ours_t += timed(ours_fn, 0, 1)
        pml_t += timed(pml_fn, 0, 1)
    no_nmi, pml = _stats(ours_t), _stats(pml_t)
    out, ref = dml.evaluate(x, labels, ks=ks, nmi=True), calc.get_accuracy(
        xn, torch.from_numpy(labels)
    )
    return {
        "shape": [n, 128],
        "classes": 100,
        "ours_no_nmi": no_nmi,
        "ours_with_nmi": with_nmi,
        "pml_p1_mapr": pml,
        "pml_over_ours_time": pml["mean_s"] / no_nmi["mean_s"],
        "pml_over_ours_median_pair": float(np.median(np.array(pml_t) / np.array(ours_t))),
        "metrics": out,
        "abs_diff_vs_pml": max(
            abs(out["R@1"] - ref["precision_at_1"]),
            abs(out["MAP@R"] - ref["mean_average_precision_at_r"]),
        ),
    }


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per case after one warm-up"
    )
    parser.add_argument(
        "--cases", default="market,msmt,revisited,dml,rerank", help="comma-separated subset"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluation.json"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and faiss threads (default: theirs); 1 on a shared, oversubscribed machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    info = machine()
    print("machine:", json.dumps(info))
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "repeats": args.repeats}
    cases = args.cases.split(",")
    rng = np.random.default_rng(args.seed)
    if "market" in cases:
        results["market"] = case_market(sizes["market"], args.repeats, rng)
    if "msmt" in cases:
        results["msmt"] = case_msmt(sizes["msmt"], args.repeats, rng)
    if "revisited" in cases:
        results["revisited"] = case_revisited(sizes["roxf_db"], args.repeats, rng)
    if "dml" in cases:
        results["dml"] = case_dml(sizes["dml"], args.repeats, rng)
    if "rerank" in cases:
        results["rerank"] = case_rerank(sizes["rerank"], args.repeats, rng)

    rows = []
    if "market" in results:
        r = results["market"]
        shape = "x".join(map(str, r["shape"]))
        rows.append(("reid.evaluate", shape, r["ours"], "-"))
        rows.append(
            (
                "torchreid-style loop",
                shape,
                r["torchreid_loop"],
                f"ours {r['speedup_vs_torchreid_loop']:.1f}x faster",
            )
        )
        rows.append(
            (
                "lean per-query loop",
                shape,
                r["lean_loop"],
                f"ours {r['speedup_vs_lean_loop']:.1f}x faster",
            )
        )
    if "msmt" in results:
        r = results["msmt"]
        rows.append(
            (
                "reid.evaluate_features",
                "x".join(map(str, r["shape"])) + "x256",
                r["ours"],
                f"peak +{r['peak_rss_increase_mib']:.0f} MiB "
                f"(full distmat {r['full_distmat_mib']:.0f} MiB)",
            )
        )
    if "revisited" in results:
        r = results["revisited"]
        rows.append(
            (
                "revisited.evaluate (E/M/H)",
                "x".join(map(str, r["ranks_shape"])),
                r["ours_3_settings"],
                f"peak +{r['peak_rss_increase_mib']:.0f} MiB; Medium {r['medium_ours_s']:.2f}s "
                f"vs revisitop loop {r['medium_revisitop_loop_s']:.2f}s",
            )
        )
    if "dml" in results:
        r = results["dml"]
        shape = "x".join(map(str, r["shape"]))
        rows.append(("dml.evaluate (no NMI)", shape, r["ours_no_nmi"], "-"))
        rows.append(("dml.evaluate (+NMI)", shape, r["ours_with_nmi"], "-"))
        rows.append(
            (
                "PML AccuracyCalculator",
                shape,
                r["pml_p1_mapr"],
                f"P@1 + MAP@R; |diff| {r['abs_diff_vs_pml']:.1e}; PML / ours time "
                f"{r['pml_over_ours_time']:.2f} (median of pairs "
                f"{r['pml_over_ours_median_pair']:.2f})",
            )
        )
    if "rerank" in results:
        r = results["rerank"]
        rows.append(
            (
                "reid.re_rank",
                "x".join(map(str, r["shape"])),
                r["ours"],
                f"peak +{r['peak_rss_increase_mib']:.0f} MiB over {r['inputs_mib']:.0f} MiB inputs "
                f"(reference ~{r['reference_estimate_mib']:.0f} MiB)",
            )
        )
    print(f"\n{'case':<30} {'size':<22} {'mean s':>9} {'std s':>8}  note")
    for name, size, t, note in rows:
        print(f"{name:<30} {size:<22} {t['mean_s']:>9.3f} {t['std_s']:>8.3f}  {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
