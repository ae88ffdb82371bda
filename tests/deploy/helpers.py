"""Helpers of the deploy tests: tiny checkpoints (32 px), a folder of generated photos, and an
index built from them by the real commands (``embed --images``, ``index build``)."""

import argparse
import os

import numpy as np
import torch
from PIL import Image

from finegrain import create_model
from finegrain.models.tiny import tiny_kwargs
from finegrain.retrieval.commands import register

DALG = "dalg_deit_tiny_patch16_224"
DCAL = "dcal_deit_tiny_patch16_224"


def run_retrieval(argv: list[str]) -> int:
    """A retrieval sub-command (``embed``, ``index ...``) in-process."""
    parser = argparse.ArgumentParser(prog="finegrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_checkpoint(path, name: str, task: str, seed: int = 0,
                     model_kwargs: dict | None = None) -> str:
    """A finegrain checkpoint of a tiny model, as the engine writes it."""
    torch.manual_seed(seed)
    kwargs = {**tiny_kwargs(name), "num_classes": 4, **(model_kwargs or {})}
    model = create_model(name, **kwargs)
    meta = {"model_name": name, "model_kwargs": kwargs, "mean": [0.5] * 3, "std": [0.5] * 3,
            "img_size": 32, "task": task, "dataset": "images", "class_names": []}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta, "hyper_parameters": {"meta": meta}}, path)
    return str(path)


def write_photos(folder, n: int = 8, size=(40, 40), seed: int = 0) -> list[str]:
    """``n`` distinct PNG / JPEG photos (coloured blocks), half of them in a sub-folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, "shoes" if i % 2 else "")
        os.makedirs(sub, exist_ok=True)
        img = np.zeros((size[0], size[1], 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        img[y:y + size[0] // 2, x:x + size[1] // 2] = rng.integers(0, 255, 3)
        p = os.path.join(sub, f"p{i:02d}." + ("jpg" if i % 3 == 0 else "png"))
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def build_index(tmp, name: str = DALG, task: str = "retrieval",
                model_kwargs: dict | None = None) -> dict:
    """Photos -> ``embed --images`` -> ``index build``; returns the paths."""
    photos = str(tmp / "photos")
    files = write_photos(photos)
    ck = write_checkpoint(tmp / "model.ckpt", name, task, model_kwargs=model_kwargs)
    out = str(tmp / "db")
    assert run_retrieval(["embed", ck, "--images", photos, "--out", out, "--img-size", "32",
                          "--num-workers", "0"]) == 0
    index = str(tmp / "gallery.index")
    assert run_retrieval(["index", "build", out, "--kind", "Flat", "--out", index]) == 0
    return {"photos": photos, "files": files, "checkpoint": ck, "descriptors": out,
            "index": index}
