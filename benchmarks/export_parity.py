"""Search through an export on non-square photos: per model and format, the descriptors of
``finegrain search`` with the checkpoint, with the export folder (``--model EXPORT``) and
with the documented plain client (numpy + PIL + onnxruntime following ``preprocess.json``'s
``search`` steps, ONNX only), on 4:3 and 3:4 views of scikit-image's photos
(``tests/deploy/test_zero_training.make_views``): max |difference| to the checkpoint's
descriptor, the smallest cosine, and the share of queries whose top-5 over the gallery is
the checkpoint's.

Models: the tiny DALG (takes any size), cross-image (CNN), TASN (resizes to its attention size
inside) and DCAL Re-ID (its ViT takes one size: the index records a fixed resize) at the test
size (32 px, seeded weights), and
EfficientNet-Lite0 with its ImageNet weights (``init-model``, 224 px).

    python benchmarks/export_parity.py
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import machine_info, write_results  # noqa: E402
from tests.deploy.helpers import write_checkpoint  # noqa: E402
from tests.deploy.test_zero_training import LITE0, make_views, plain_client  # noqa: E402

import finegrain  # noqa: E402
from finegrain.cli import main as cli  # noqa: E402
from finegrain.errors import FinegrainError  # noqa: E402

MODELS = {"dalg_deit_tiny_patch16_224": ("retrieval", {}),
          "cross_image_resnet18": ("dml", {}),
          "tasn_resnet18": ("classification", {}),
          "dcal_deit_tiny_patch16_224": ("reid", {"task": "reid"})}


def _quiet(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli(argv) == 0, argv


def _top5(q: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ gallery.T), axis=1, kind="stable")[:, :5]


def rows_of(tmp: str, name: str, model: str, listing: str) -> list[dict]:
    photos = os.path.dirname(listing)
    paths = [os.path.join(photos, line.split()[0]) for line in open(listing).read().split("\n")
             if line]
    _quiet(["embed", model, "--images", listing, "--num-workers", "0", "--out",
            os.path.join(tmp, "db")])
    _quiet(["index", "build", os.path.join(tmp, "db"), "--out", os.path.join(tmp, "ix")])
    ref = finegrain.Searcher(os.path.join(tmp, "ix"))
    want = ref.embed(paths)
    gallery = np.asarray(ref.index.reconstruct(np.array(ref.index.ids)))
    rows = []
    for fmt in ("onnx", "exported"):
        out = os.path.join(tmp, fmt)
        _quiet(["export", model, "--format", fmt, "--images", photos, "--out", out])
        row = {"model": name, "format": fmt, "resize": ref.preprocessing["resize"]}
        try:
            got = finegrain.Searcher(os.path.join(tmp, "ix"), model=out).embed(paths)
        except FinegrainError as e:
            row["search"] = "refused at start: " + str(e).split("(")[1].split(")")[0] + " only"
        else:
            row.update(search_max_abs=float(np.abs(got - want).max()),
                       search_top5=float((_top5(got, gallery) == _top5(want, gallery))
                                         .all(1).mean()))
        if fmt == "onnx":
            descriptor = plain_client()
            got = np.stack([descriptor(p, out) for p in paths])
            row.update(client_max_abs=float(np.abs(got - want).max()),
                       client_min_cos=float((got * want).sum(1).min()),
                       client_top5=float((_top5(got, gallery) == _top5(want, gallery))
                                         .all(1).mean()))
        rows.append(row)
    return rows


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = make_views(os.path.join(tmp, "photos"))
        for name, (task, kw) in MODELS.items():
            d = os.path.join(tmp, name)
            os.makedirs(d)
            ck = write_checkpoint(os.path.join(d, "model.ckpt"), name, task, model_kwargs=kw)
            rows += rows_of(d, name, ck, listing)
        d = os.path.join(tmp, "lite0")
        finegrain.init_model("tf_efficientnet_lite0", os.path.join(d, "m"), pretrained=LITE0)
        rows += rows_of(d, "tf_efficientnet_lite0 (ImageNet)",
                        os.path.join(d, "m", "weights.safetensors"), listing)
    head = ("| model | format | resize | export in finegrain: max abs / top-5 | plain client: "
            "max abs / min cos / top-5 |")
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        search = r.get("search") or f"{r['search_max_abs']:.1e} / {r['search_top5']:.2f}"
        client = (f"{r['client_max_abs']:.1e} / {r['client_min_cos']:.7f} / "
                  f"{r['client_top5']:.2f}") if "client_max_abs" in r else "-"
        lines.append(f"| {r['model']} | {r['format']} | {r['resize']} | {search} | {client} |")
    print("\n".join(lines))
    write_results(os.path.join(ROOT, "benchmarks", "results", "export_parity.json"),
                  {"machine": machine_info(), "method": __doc__, "rows": rows,
                   "table": lines})


if __name__ == "__main__":
    main()
