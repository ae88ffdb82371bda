"""Cross-image attention DML: training cost against the baseline twin, and the optional
conditional re-ranker, measured in one run.

Headline: the training-step FLOPs of the cross-image model over its baseline twin at the
recipes' batch 112 (``flops``), for the default width ``attn_dim = min(E, 256)`` and the
former D = E; target <= 1.15x.

0. ``flops``: the training-step FLOPs ratio (forward + backward, FlopCounterMode under the
   MATH SDPA backend, on the meta device: no compute, so batch 112 and 256 at 224 px count in
   seconds) for batch 32, 112 and 256: the branch costs B^2 queries, the backbone B images.
   Each count of the branch is checked against the closed form :func:`branch_train_flops`
   (equal FLOP for FLOP), and one meta count against a real CPU count at a small batch.
1. ``speed``: one training step (forward + backward of the summed losses) of
   ``cross_image_resnet50`` and ``cross_image_vit_small_patch16_224`` at 224 px with and
   without the cross-image branch (``cross_attention: false`` twin), batch 32 = 16 classes x 2:
   wall clock (warm-up dropped, mean and std), and the FLOPs of the step and of the eval
   forward. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` under the MATH
   SDPA backend on the meta device (no compute; the B x B loss arithmetic is left out, it is
   not a matmul). The target is a training-step ratio under 1.15x; the test-time forward is
   identical by construction (ratio 1.00). Wall clock is measured at batch 32 only (a
   ResNet-50 step at 112 takes minutes on 2 CPU cores); the headline is the FLOP count.
2. ``rerank``: the cost of ``conditional_rerank`` per query at full size (ResNet-50 /
   ViT-S at 224 px, top-k), next to the cost of embedding one image; and on generated DML
   data (the ``synthetic_dml`` renderer: classes differ only in small parts; train and test
   classes disjoint) a tiny ViT trained from scratch with and without the branch, each test
   query's top-k neighbours by z re-ordered by the conditional similarity: Recall@1 before /
   after, printed next to the chance level (a tiny model trained from scratch on a CPU may
   stay near it: then the figures say nothing about the method).

    python benchmarks/dml.py                      # all parts, CPU
    python benchmarks/dml.py --parts flops        # the headline only, seconds
    python benchmarks/dml.py --parts flops rerank --rerank-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (count_flops, machine_info, matmul_peak, mean_std, timed,  # noqa: E402
                    write_results)
from finegrain.models import create_model  # noqa: E402
from finegrain.models.cross_image import conditional_rerank  # noqa: E402

BACKBONES = {"resnet50": "cross_image_resnet50",
             "vit_small": "cross_image_vit_small_patch16_224"}
# (tokens N, token width C, embedding E) at 224 px
SHAPES = {"resnet50": (49, 2048, 512), "vit_small": (196, 384, 384)}


def pk_labels(batch: int, per_class: int = 2) -> torch.Tensor:
    return torch.arange(batch) // per_class


# -- 0 / 1: cost ---------------------------------------------------------------------------------
def train_graph(model, x: torch.Tensor) -> None:
    """The training graph the FLOPs count: forward, head, conditional branch, backward (no loss
    arithmetic)."""
    feats = model.forward_features(x)
    z = model.forward_head(feats)
    total = z.sum()
    if model.cross is not None:
        total = total + model.pair_similarity(model.conditional_embeddings(feats, z), z).sum()
    total.backward()


def meta_flops(name: str, batch: int, img: int, train: bool, **kwargs) -> int:
    """FLOPs of the training graph (:func:`train_graph`) or of the eval forward, counted on
    the meta device."""
    with torch.device("meta"):
        model = create_model(name, **kwargs).train(train)
        x = torch.randn(batch, 3, img, img)
    if train:
        return count_flops(lambda: train_graph(model, x))
    with torch.no_grad():
        return count_flops(lambda: model(x))


def branch_train_flops(B: int, N: int, C: int, D: int, E: int, depth: int = 2,
                       mlp_ratio: float = 4.0) -> int:
    """Closed-form FLOPs of the conditional branch in one training step (matmuls; backward
    = 2 x forward, every operand needs a gradient): token projection B N C D, query projection
    B E D; per layer the query projection (B D^2 on the shared first-layer queries, B^2 D^2
    after), keys / values 2 B N D^2, attention 2 B^2 N D, output projection B^2 D^2, MLP
    2 r B^2 D^2; output projection B^2 D E. Multiply-adds x 2 FLOPs x 3 (fwd + bwd).
    Identical in ``stack`` and ``mutual``."""
    macs = B * N * C * D + B * E * D
    for level in range(depth):
        rows = B if level == 0 else B * B
        macs += (rows * D * D + 2 * B * N * D * D + 2 * B * B * N * D + B * B * D * D
                 + 2 * mlp_ratio * B * B * D * D)
    macs += B * B * D * E
    return int(round(3 * 2 * macs))


def branch_times(model, images, labels, args) -> list[float]:
    """Wall clock of the conditional branch alone (c, S, cond loss; forward + backward into
    the backbone tokens): a small difference of two noisy step times measured directly."""
    with torch.no_grad():
        feats0 = model.forward_features(images)

    def branch():
        feats = feats0.detach().requires_grad_(True)
        z = model.forward_head(feats)
        sim = model.pair_similarity(model.conditional_embeddings(feats, z), z)
        model.cond_loss(sim, labels).backward()

    return timed(branch, 1, args.branch_iters)


def part_speed(args) -> dict:
    """Baseline and cross-image steps alternate (after their warm-up), so a machine whose
    load drifts charges both variants alike."""
    rows = {}
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = pk_labels(args.batch)
    for bb in args.backbones:
        name = BACKBONES[bb]
        steps, models = {}, {}
        for variant in ("baseline", "cross_image"):
            torch.manual_seed(0)
            model = create_model(name, cross_attention=variant == "cross_image").train()
            models[variant] = model

            def step(m=model):
                m.zero_grad(set_to_none=True)
                out = m(images, targets=labels)
                sum(out["losses"].values()).backward()

            timed(step, args.warmup, 0)
            steps[variant] = step
        times = {v: [] for v in steps}
        for _ in range(args.iters):
            for v, step in steps.items():
                times[v] += timed(step, 0, 1)
        branch = branch_times(models["cross_image"], images, labels, args)
        for variant in steps:
            ca = variant == "cross_image"
            mean, std = mean_std(times[variant])
            rows[f"{bb}/{variant}"] = {
                "backbone": bb, "variant": variant, "time_s_mean": mean, "time_s_std": std,
                "times_s": times[variant], "images_per_s": args.batch / mean,
                "train_gflops": meta_flops(name, args.batch, args.img_size, True,
                                           cross_attention=ca) / 1e9,
                "eval_gflops": meta_flops(name, args.batch, args.img_size, False,
                                          cross_attention=ca) / 1e9}
        rows[f"{bb}/cross_image"]["branch_s_mean"], rows[f"{bb}/cross_image"]["branch_s_std"] \
            = mean_std(branch)
        del steps, models
    print(f"\n== training step, batch {args.batch} ({args.batch // 2} classes x 2), "
          f"{args.img_size} px, {args.warmup} warm-up + {args.iters} timed ==")
    print(f"{'model':<24}{'time (s)':>18}{'img/s':>8}{'train GFLOPs':>14}{'eval GFLOPs':>13}")
    for key, r in rows.items():
        print(f"{key:<24}{r['time_s_mean']:>10.3f} ± {r['time_s_std']:<5.3f}"
              f"{r['images_per_s']:>8.2f}{r['train_gflops']:>14.1f}{r['eval_gflops']:>13.1f}")
    ratios = {}
    for bb in args.backbones:
        b, c = rows[f"{bb}/baseline"], rows[f"{bb}/cross_image"]
        ratios[bb] = {"wall_clock": c["time_s_mean"] / b["time_s_mean"],
                      "wall_clock_from_branch": 1 + c["branch_s_mean"] / b["time_s_mean"],
                      "train_flops": c["train_gflops"] / b["train_gflops"],
                      "eval_flops": c["eval_gflops"] / b["eval_gflops"]}
        r = ratios[bb]
        print(f"{bb:<10} branch alone (fwd + bwd, {args.branch_iters} timed) "
              f"{c['branch_s_mean']:.3f} ± {c['branch_s_std']:.3f} s")
        print(f"{bb:<10} cross-image / baseline: step wall clock {r['wall_clock']:.3f}x "
              f"(1 + branch / baseline step: {r['wall_clock_from_branch']:.3f}x), "
              f"step FLOPs {r['train_flops']:.3f}x, eval FLOPs {r['eval_flops']:.3f}x "
              f"(target < 1.15x)")
    return {"rows": rows, "ratios": ratios}


def part_flops(args) -> dict:
    out = {"ratios": {}, "closed_form_checks": {}}
    print(f"\n== training-step FLOPs, cross-image / baseline (meta device, {args.img_size} px) ==")
    print(f"{'backbone':<11}{'setting':<30}" + "".join(f"{'B=' + str(b):>9}" for b in
                                                      args.flops_batches))
    headline = {}
    for bb in args.backbones:
        name = BACKBONES[bb]
        N, C, E = SHAPES[bb]
        D0 = min(E, 256)
        settings = {f"default (D = {D0})": {}, "default, mutual": {"hierarchy": "mutual"},
                    f"D = E = {E} (former default)": {"attn_dim": E},
                    f"D = E = {E}, mlp_ratio 2": {"attn_dim": E, "mlp_ratio": 2.0}}
        base = {b: meta_flops(name, b, args.img_size, True, cross_attention=False)
                for b in args.flops_batches}
        for label, kw in settings.items():
            vals = []
            for b in args.flops_batches:
                cross = meta_flops(name, b, args.img_size, True, **kw)
                closed = branch_train_flops(b, N, C, kw.get("attn_dim", D0), E,
                                            mlp_ratio=kw.get("mlp_ratio", 4.0))
                out["closed_form_checks"][f"{bb}/{label}/B{b}"] = (cross - base[b]) / closed
                vals.append(cross / base[b])
                out["ratios"][f"{bb}/{label}/B{b}"] = cross / base[b]
            print(f"{bb:<11}{label:<30}" + "".join(f"{v:>8.3f}x" for v in vals))
            if 112 in args.flops_batches:
                headline.setdefault(bb, {})[label] = out["ratios"][f"{bb}/{label}/B112"]
    checks = list(out["closed_form_checks"].values())
    print(f"branch FLOPs counted / closed form (branch_train_flops): min {min(checks):.6f}, "
          f"max {max(checks):.6f}")
    # one meta-device count against a real count on the CPU (small batch: it computes)
    b = args.flops_verify_batch
    name = BACKBONES[args.backbones[0]]
    torch.manual_seed(0)
    real_model = create_model(name).train()
    x = torch.randn(b, 3, args.img_size, args.img_size)
    out["meta_equals_real"] = {"batch": b, "backbone": args.backbones[0],
                               "real": count_flops(lambda: train_graph(real_model, x)),
                               "meta": meta_flops(name, b, args.img_size, True)}
    print(f"meta-device count == real CPU count ({args.backbones[0]}, batch {b}): "
          f"{out['meta_equals_real']['meta'] == out['meta_equals_real']['real']}")
    out["headline_B112"] = headline
    if headline:
        print("\nHEADLINE (recipes' batch 112, training-step FLOPs, target <= 1.15x): " + "; ".join(
            f"{bb} {h[next(iter(h))]:.3f}x (former D = E: "
            f"{[v for k, v in h.items() if 'former' in k][0]:.3f}x)"
            for bb, h in headline.items()))
    return out


# -- 2: re-ranking on generated DML data ---------------------------------------------------------
def synthetic_dml(num_classes: int, per_class: int, size: int, seed: int = 0):
    """Images (n, 3, size, size) in [0, 1] and labels from the ``synthetic_dml`` renderer;
    the first half of the classes train, the second half test (class-disjoint)."""
    from finegrain.data.synthetic import class_parts, render
    parts = class_parts(num_classes, seed)
    imgs, labels = [], []
    for ci, p in enumerate(parts):
        for k in range(per_class):
            img, _ = render(p, np.random.default_rng([seed, ci, k]), (size, size))
            imgs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
            labels.append(ci)
    x = torch.stack(imgs)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = torch.tensor(labels)
    train = y < num_classes // 2
    return (x[train], y[train]), (x[~train], y[~train] - num_classes // 2)


def train_tiny(cross: bool, data, args, seed: int) -> torch.nn.Module:
    x, y = data
    torch.manual_seed(seed)
    model = create_model(
        "cross_image_deit_tiny_patch16_224", embedding_dim=64, num_heads=4,
        img_size=args.rerank_size, cross_attention=cross, cond_weight=args.cond_weight,
        backbone_kwargs=dict(patch_size=8, embed_dim=args.rerank_width,
                             depth=args.rerank_depth, num_heads=4)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.rerank_lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    classes = y.unique().numpy()
    by_class = {c: np.flatnonzero(y.numpy() == c) for c in classes}
    per_batch = min(args.rerank_batch // 2, len(classes))
    for step in range(args.rerank_steps):
        lr = args.rerank_lr * 0.5 * (1 + np.cos(np.pi * step / args.rerank_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        chosen = rng.choice(classes, per_batch, replace=False)
        idx = np.concatenate([rng.choice(by_class[c], 2, replace=False) for c in chosen])
        xb = x[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        out = model(xb, targets=y[idx])
        opt.zero_grad(set_to_none=True)
        sum(out["losses"].values()).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def recall_at_1(model, data, k: int) -> dict:
    from finegrain.evaluation.dml import evaluate
    x, y = data
    feats = torch.cat([model.forward_features(x[i:i + 64]) for i in range(0, len(x), 64)])
    z = model.forward_head(feats)
    metrics = evaluate(z.numpy(), y.numpy(), ks=(1,), nmi=False)
    res = {"R@1": metrics["R@1"], "MAP@R": metrics["MAP@R"]}
    if model.cross is None:
        return res
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))  # the query itself is not a neighbour
    topk = sim.topk(k, dim=1).indices  # (Q, k)
    for mix in (1.0, 0.5):
        t = time.perf_counter()
        _, ids = conditional_rerank(model, feats, feats, topk, mix=mix)
        dt = time.perf_counter() - t
        res[f"R@1 reranked (mix {mix})"] = (y[ids[:, 0]] == y).float().mean().item()
        res[f"rerank ms/query (mix {mix})"] = 1e3 * dt / len(y)
    t = time.perf_counter()
    for i in range(0, len(x), 64):
        model(x[i:i + 64])
    res["embed ms/image"] = 1e3 * (time.perf_counter() - t) / len(x)
    return res


def rerank_cost(name: str, args) -> dict:
    """Re-ranking cost per query at full size (random weights and inputs: cost does not
    depend on training): ``conditional_rerank`` of ``--cost-queries`` queries against their
    top-k, next to the eval forward (embedding) of one image."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        x = torch.randn(args.cost_queries, 3, args.img_size, args.img_size)
        embed = timed(lambda: model(x), 1, args.cost_iters)
        q_tok = model.forward_features(x)  # (Q, T, C)
    db_tok = q_tok[torch.randint(len(q_tok), (4 * args.rerank_k,))]  # a small database
    topk = torch.stack([torch.randperm(len(db_tok))[:args.rerank_k]
                        for _ in range(len(q_tok))])  # (Q, k)
    rerank = timed(lambda: conditional_rerank(model, q_tok, db_tok, topk), 1, args.cost_iters)
    (e_mean, e_std), (r_mean, r_std) = mean_std(embed), mean_std(rerank)
    Q = args.cost_queries
    return {"embed_ms_per_image": 1e3 * e_mean / Q, "embed_ms_std": 1e3 * e_std / Q,
            "rerank_ms_per_query": 1e3 * r_mean / Q, "rerank_ms_std": 1e3 * r_std / Q,
            "k": args.rerank_k, "tokens": tuple(q_tok.shape[1:])}


def part_rerank(args) -> dict:
    out = {"cost": {}, "synthetic": {}}
    print(f"\n== conditional re-ranking cost, top-{args.rerank_k}, {args.img_size} px, "
          f"{args.cost_queries} queries, {args.cost_iters} timed ==")
    for bb in args.backbones:
        r = rerank_cost(BACKBONES[bb], args)
        out["cost"][bb] = r
        print(f"{bb:<10} tokens {r['tokens']}: re-rank {r['rerank_ms_per_query']:.1f} ± "
              f"{r['rerank_ms_std']:.1f} ms/query vs embedding {r['embed_ms_per_image']:.1f} ± "
              f"{r['embed_ms_std']:.1f} ms/image "
              f"({r['rerank_ms_per_query'] / r['embed_ms_per_image']:.2f} images' worth)")

    train, test = synthetic_dml(args.rerank_classes, args.rerank_per_class, args.rerank_size)
    n_test, per = len(test[1]), args.rerank_per_class
    chance = (per - 1) / (n_test - 1)  # a random neighbour shares the query's class
    print(f"\n== conditional re-ranking accuracy: synthetic DML, {args.rerank_classes // 2} train "
          f"/ {args.rerank_classes // 2} test classes x {per} images, {args.rerank_size} px, "
          f"tiny ViT from scratch, {args.rerank_steps} steps, top-{args.rerank_k}; chance "
          f"R@1 {chance:.3f} ==")
    out["synthetic"]["chance_R@1"] = chance
    for seed in range(args.rerank_seeds):
        for cross in (False, True):
            t = time.perf_counter()
            model = train_tiny(cross, train, args, seed)
            res = recall_at_1(model, test, args.rerank_k)
            res["train_s"] = time.perf_counter() - t
            key = f"seed{seed}/{'cross_image' if cross else 'baseline'}"
            out["synthetic"][key] = res
            print(f"{key:<22}" + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["flops", "speed", "rerank"],
                   choices=["speed", "flops", "rerank"])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--branch-iters", type=int, default=5)
    p.add_argument("--flops-batches", type=int, nargs="+", default=[32, 112, 256])
    p.add_argument("--flops-verify-batch", type=int, default=2)
    p.add_argument("--cost-queries", type=int, default=8)
    p.add_argument("--cost-iters", type=int, default=3)
    p.add_argument("--rerank-classes", type=int, default=32)
    p.add_argument("--rerank-per-class", type=int, default=20)
    p.add_argument("--rerank-size", type=int, default=64)
    p.add_argument("--rerank-steps", type=int, default=1000)
    p.add_argument("--rerank-width", type=int, default=64)
    p.add_argument("--rerank-depth", type=int, default=2)
    p.add_argument("--rerank-batch", type=int, default=32)
    p.add_argument("--rerank-lr", type=float, default=1e-3)
    p.add_argument("--rerank-k", type=int, default=10)
    p.add_argument("--rerank-seeds", type=int, default=1)
    p.add_argument("--cond-weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dml.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak = matmul_peak()
    machine = machine_info("cpu", "cores", "threads", "cuda", "torch", "timm",
                           "pytorch_metric_learning", "python", "matmul_peak_gflops",
                           threads=args.threads, matmul_peak_gflops=round(peak, 1))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({args.threads} threads), "
          f"torch {machine['torch']}, timm {machine['timm']}, pml "
          f"{machine['pytorch_metric_learning']}, matmul peak {peak:.1f} GFLOP/s")

    # each part records its own machine and arguments; parts not run now keep earlier results
    result = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            result = json.load(f)
    stamp = {"machine": machine, "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    parts = {"speed": part_speed, "flops": part_flops, "rerank": part_rerank}
    for part in args.parts:
        result[part] = {**stamp, "results": parts[part](args)}
    write_results(args.out, result)


if __name__ == "__main__":
    main()
