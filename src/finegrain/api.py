"""Search an index by image from Python (what ``finegrain search`` and ``finegrain serve`` run).

::

    import finegrain
    model, transform = finegrain.load("runs/<run>/best.ckpt")   # or an export folder
    searcher = finegrain.Searcher("gallery.index")
    for result in searcher.search(["query.jpg"], k=5):
        print(result)                  # the query, then rank, score, name of each match

:class:`Searcher` embeds images with the index's own model (the checkpoint recorded in the
index folder, or ``model=``) and preprocessing (``index.json``: longest side, scales, mean,
std), exactly as ``finegrain embed`` did for the gallery, then searches the faiss index. The
index folder is only read.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError, MissingFileError
from .meta import ModelMeta

__all__ = ["load", "init_model", "Searcher", "Hit", "QueryResult", "decode_image_bytes",
           "ImageTooLarge", "DEFAULT_MAX_PIXELS"]

#: Largest image accepted from bytes (width x height): 40 megapixels.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLarge(InputError):
    """An image has more pixels than the limit (decoding it would exhaust memory)."""


def load(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, transform)`` of a checkpoint or an export folder: ``model(batch)`` returns the
    output dict (``"logits"`` / ``"embedding"``), ``transform(uint8 (3, H, W))`` gives the
    normalised input of the model's evaluation protocol (``finegrain predict``'s)."""
    from .inference import eval_transform
    from .loading import open_model
    loaded = open_model(path, device=device)
    return loaded.model, eval_transform(loaded.meta)


def init_model(name: str, out: str, pretrained: str | None = None,
               img_size: int | None = None, **model_kwargs: Any) -> str:
    """A finegrain model record made from weights alone, no training: ``out/weights.safetensors``
    + ``out/model.json``, which ``embed``, ``search``, ``serve``, ``predict`` and ``export``
    take like a trained run's. The record's inputs are the weights' own (timm's pretrained
    config of the backbone, :func:`finegrain.models.weights.pretrained_input_config`); a
    classifier of ``task="dml"`` (the default for plain classifiers here) returns the
    L2-normalised pooled features as its ``embedding``: a zero-training visual search.

    Args:
        name: a registered model name (``tf_efficientnet_lite0``, ``resnet50`` ...).
        out: the folder to write.
        pretrained: weights for ``create_model(name, pretrained=...)``.
        img_size: the model's input size (default: the weights' ``input_size``); in retrieval
            the longest side of an embedded image.
        **model_kwargs: further ``create_model`` arguments.

    Returns:
        the path of ``weights.safetensors``.
    """
    from .atomic import save_safetensors, write_json
    from .models import create_model
    from .models.registry import config_meta
    from .models.tiny import family
    from .models.weights import pretrained_input_config
    if family(name) == "classifier":
        model_kwargs.setdefault("task", "dml")
    model = create_model(name, pretrained=pretrained, **model_kwargs).eval()
    arch = getattr(getattr(model, "backbone", None), "pretrained_cfg", {}).get("architecture")
    cfg = pretrained_input_config(pretrained, arch)
    size = img_size or int(getattr(getattr(model, "backbone", None), "pretrained_cfg",
                                   {}).get("input_size", (3, 224, 224))[-1])
    with torch.no_grad():
        out_keys = model(torch.zeros(1, 3, size, size))
    if "embedding" not in out_keys:
        raise InputError(f"{name} returns no 'embedding' (outputs: {', '.join(out_keys)}); "
                         f"pass a model that retrieves, e.g. a plain classifier with "
                         f"task='dml', or a DALG / cross-image model")
    task = model_kwargs.get("task") or getattr(model, "task", "retrieval")
    meta = ModelMeta(**config_meta(model.finegrain_config), task=task, img_size=size,
                     **({} if cfg is None else {"mean": cfg.mean, "std": cfg.std,
                                                "interpolation": cfg.interpolation,
                                                "crop_pct": cfg.crop_pct}))
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, "weights.safetensors")
    save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                     weights)
    write_json(os.path.join(out, "model.json"), meta.to_dict())  # the record names whole weights
    return weights


def decode_image_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       what: str = "the upload") -> torch.Tensor:
    """uint8 (3, H, W) of an encoded image (JPEG, PNG, WebP, GIF, BMP ...).

    The header is read first (Pillow), so an image over ``max_pixels`` is refused before it
    is decoded; a truncated or corrupt file is refused whole (never half-decoded).

    Raises:
        InputError: not an image, or truncated / corrupt.
        ImageTooLarge: more than ``max_pixels`` pixels.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(f"{what} is {w} x {h} = {w * h / 1e6:.1f} megapixels, over "
                                    f"the limit of {max_pixels / 1e6:.1f}; resize it")
            im.load()  # decodes everything: a truncated file raises here
            rgb = np.asarray(im.convert("RGB"))
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{what} has too many pixels (Pillow's decompression-bomb limit); "
                            f"resize it") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image (JPEG, PNG, WebP, GIF or BMP expected)"
                         ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{what} is truncated or corrupt ({e}); send the whole file") from None
    if rgb.size == 0:
        raise InputError(f"{what} has no pixels")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W) uint8


@dataclass
class Hit:
    """One match: its rank (1 = best), index id, image name, score (metric ``cosine``, the
    default: inner product of the L2-normalised descriptors, i.e. their cosine similarity,
    higher is closer; ``--metric euclidean``: squared L2 distance, lower is closer) and
    label (-1 when unknown)."""

    rank: int
    id: int
    name: str
    score: float
    label: int = -1


@dataclass
class QueryResult:
    """The top-k of one query image."""

    query: str
    hits: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "hits": [asdict(h) for h in self.hits]}

    def __str__(self) -> str:
        lines = [self.query]
        lines += [f"  {h.rank:3d}  {h.score:7.4f}  {h.name}" for h in self.hits]
        return "\n".join(lines)


def _find_checkpoint(index_dir: str, manifest: dict, source: dict) -> str:
    """The checkpoint recorded by the index (or its descriptors): as written, or relative to
    a folder above the index."""
    tried = []
    for ck in (manifest.get("checkpoint"), source.get("checkpoint")):
        if not ck:
            continue
        tried.append(ck)
        base = os.path.abspath(index_dir)
        for _ in range(4):
            base = os.path.dirname(base)
            if not os.path.isabs(ck):
                tried.append(os.path.join(base, ck))
    for p in tried:
        if os.path.exists(p):
            return p
    why = f"its checkpoint {tried[0]} is not found" if tried else "it records no checkpoint"
    raise MissingFileError(f"{index_dir}: {why}; pass the checkpoint (or export folder) that "
                           f"'finegrain embed' used: --model CKPT (Python: model=CKPT)")


def _image_files(folder: str) -> list[str]:
    from .data.datasets.images import resolve_images
    return [p for p, _ in resolve_images(folder)[1]]


def confine_to_root(paths: dict[str, str], root: str | None, index_dir: str) -> dict[str, str]:
    """``paths`` (name -> file) with each file resolved, links followed, after checking it
    lies inside ``root`` and is an image file (a ``.jpg``, ``.png`` ... name).

    A gallery's names come from an index folder, which may be edited or foreign: a name like
    ``/etc/passwd`` or ``../../etc/passwd`` must never reach a reader. Raises
    :class:`InputError` naming the first entry that leaves the root.
    """
    from .data.datasets._parsing import IMAGE_EXTENSIONS
    if not paths:
        return {}
    if not root:
        raise InputError(f"{index_dir}: the index records gallery files but no gallery root; "
                         f"pass --gallery-root with the folder (or dataset root) they are in")
    folder = root.split("*")[0].split("?")[0].split("[")[0]  # a glob's fixed head
    base = os.path.realpath(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".")
    out = {}
    for name, path in paths.items():
        real = os.path.realpath(path)
        inside = os.path.commonpath([base, real]) == base
        if not inside or not real.lower().endswith(IMAGE_EXTENSIONS):
            why = (f"resolves to {real}, outside the gallery root {base}" if not inside else
                   f"resolves to {real}, which is not an image file "
                   f"({' '.join(IMAGE_EXTENSIONS)})")
            raise InputError(f"{index_dir}: gallery entry {name!r} {why}; the index folder was "
                             f"edited or comes from elsewhere: nothing outside the gallery root "
                             f"is served. Rebuild the index with 'finegrain index build' from "
                             f"your own descriptors, or pass --gallery-root with the folder "
                             f"that holds its images")
        out[name] = real
    return out


class Searcher:
    """Search an index folder by image (module docstring).

    Args:
        index_dir: a folder of ``finegrain index build``.
        model: a checkpoint or export folder to embed queries with (default: the checkpoint
            the index records); its hash must match the index's.
        device: where the model runs.
        gallery_root: where the gallery images are, when they moved since ``embed`` (the
            folder, glob or list of ``embed --images``, or the dataset root).
    """

    def __init__(self, index_dir: str, model: str | None = None, device: str = "cpu",
                 gallery_root: str | None = None):
        from .loading import NO_FILE_HASHES, open_model
        from .retrieval.descriptors import DescriptorMismatch
        from .retrieval.extract import fixed_input_size, search_transform
        from .retrieval.index import Index
        self.index_dir = index_dir
        self.index = Index.load(index_dir)
        man, src = self.index.manifest, self.index.source_meta
        self.model_path = model or _find_checkpoint(index_dir, man, src)
        loaded = open_model(self.model_path, device=device)
        self.model, self.meta, ck_hash = loaded.model, loaded.meta, loaded.checkpoint_hash
        want = man.get("checkpoint_hash")
        if ck_hash and want not in (None, *NO_FILE_HASHES) and ck_hash != want:
            raise DescriptorMismatch(
                f"{self.model_path} (hash {ck_hash}) is not the checkpoint that embedded "
                f"{index_dir} (hash {want}): its descriptors would not be comparable; pass "
                f"--model with the checkpoint that 'finegrain embed' used")
        pre = man.get("preprocessing") or {}
        if pre.get("resize") not in ("longest_side", "fixed"):
            raise InputError(f"{index_dir}/index.json records no retrieval preprocessing "
                             f"(resize {pre.get('resize')!r}); build the index from "
                             f"'finegrain embed' descriptors")
        fixed = fixed_input_size(self.model) if pre["resize"] == "longest_side" else None
        if fixed is not None:
            fix = ("search it with the checkpoint, or an ONNX export of it (finegrain export "
                   "CKPT --format onnx takes any size when the model does)"
                   if loaded.exported else
                   "embed the gallery again (embed records a fixed resize for such a model) "
                   "and rebuild the index")
            raise InputError(
                f"{self.model_path} takes one image size only ({fixed[0]}x{fixed[1]}), but "
                f"{index_dir} was embedded with photos whole at any aspect ratio (longest "
                f"side {pre['img_size']}): {fix}")
        self.device = torch.device(device)
        self.preprocessing = pre
        self.transform = search_transform(pre)
        self.scales = [float(s) for s in pre.get("scales", [1.0])]
        self.gallery_root = gallery_root
        self._lock = threading.Lock()  # one forward / search at a time (server threads)
        self._paths: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ embed / search
    def _decode(self, item: Any) -> tuple[str, torch.Tensor]:
        from .data.datasets.base import read_image
        if torch.is_tensor(item):
            return "tensor", item
        if isinstance(item, (bytes, bytearray)):
            return "bytes", decode_image_bytes(bytes(item))
        return os.fspath(item), read_image(os.fspath(item))

    def _expand(self, images: Any) -> list[Any]:
        if isinstance(images, (str, os.PathLike, bytes, bytearray)) or torch.is_tensor(images):
            images = [images]
        out = []
        for item in images:
            if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
                files = _image_files(os.fspath(item))
                if not files:
                    raise InputError(f"{item}: no image in the folder")
                out += files
            else:
                out.append(item)
        if not out:
            raise InputError("search: give at least one image")
        return out

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """(n, D) float32 unit descriptors of images (paths, encoded bytes or uint8 (3, H, W)
        tensors), with the index's preprocessing and scales."""
        from .retrieval.extract import embed_batch
        xs = [self.transform(self._decode(i)[1]) for i in self._expand(images)]
        out = np.zeros((len(xs), int(self.index.manifest["dim"])), dtype=np.float32)
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, x in enumerate(xs):
            by_size.setdefault(tuple(x.shape[-2:]), []).append(j)
        with self._lock:
            for rows in by_size.values():
                x = torch.stack([xs[j] for j in rows]).to(self.device)
                out[rows] = embed_batch(self.model, x, self.scales, amp=False).cpu().numpy()
        if not np.isfinite(out).all():
            from .errors import nonfinite_outputs
            raise nonfinite_outputs(self.model_path, int((~np.isfinite(out).all(1)).sum()),
                                    len(out), "descriptors")
        return out

    def search_vectors(self, q: np.ndarray, k: int = 10,
                       query_names: Sequence[str] | None = None) -> list[QueryResult]:
        """Top-``k`` of (n, D) query descriptors."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        with self._lock:
            r = self.index.search(np.asarray(q, dtype=np.float32), k)
        names = query_names or [f"query {i}" for i in range(len(q))]
        rows = self.index.row(np.asarray(r.ids))  # (n, k), -1 where fewer than k results
        out = []
        for i, qn in enumerate(names):
            hits = [Hit(rank=j + 1, id=int(d), name=str(n), score=float(s),
                        label=int(self.index.labels[rows[i, j]]))
                    for j, (d, n, s) in enumerate(zip(r.ids[i], r.names[i], r.scores[i]))
                    if d >= 0]
            out.append(QueryResult(qn, hits))
        return out

    def search(self, images: Any, k: int = 10) -> list[QueryResult]:
        """Top-``k`` gallery images of each image (a path, a folder, encoded bytes, a uint8
        tensor, or a list of them), best first."""
        items = self._expand(images)
        names = [os.fspath(i) if isinstance(i, (str, os.PathLike)) else f"image {j}"
                 for j, i in enumerate(items)]
        return self.search_vectors(self.embed(items), k, names)

    def search_gallery(self, gallery_id: int, k: int = 10) -> QueryResult:
        """Top-``k`` of a gallery image (its stored vector; the image itself comes first)."""
        name = self.name_of(gallery_id)
        try:
            with self._lock:
                q = self.index.reconstruct(np.array([gallery_id]))
        except InputError:  # an index that cannot give its vectors back: embed the file
            q = self.embed([self.require_path(gallery_id)])
        return self.search_vectors(q, k, [name])[0]

    # ------------------------------------------------------------------ gallery images
    def name_of(self, gallery_id: int) -> str:
        from .errors import UnknownNameError
        if gallery_id not in self.index:
            raise UnknownNameError(f"no image with id {gallery_id} in {self.index_dir} "
                                   f"(ids 0..{self.index.next_id - 1}, {len(self)} images)")
        return self.index.names[int(self.index.row(np.array([gallery_id]))[0])]

    def _gallery_paths(self) -> dict[str, str]:
        """Image name -> file, from the dataset the index was embedded from (built once).

        Every file is confined to the gallery root: it must resolve (links followed) inside
        the root folder and be an image file, whatever names the index records; an index
        that names anything else is refused (:func:`confine_to_root`).
        """
        if self._paths is not None:
            return self._paths
        from .data import build_dataset
        from .errors import FinegrainError
        from .retrieval.extract import sample_names
        man, src = self.index.manifest, self.index.source_meta
        dataset = man.get("dataset") or src.get("dataset")
        root = self.gallery_root or man.get("root") or src.get("root")
        split = man.get("split") or src.get("split") or "gallery"
        wanted = set(self.index.names)
        paths: dict[str, str] = {}
        if dataset:
            try:
                ds = build_dataset(dataset, root, split)
                paths = {n: s.path for n, s in zip(sample_names(ds), ds.samples) if n in wanted}
            except FinegrainError:
                paths = {}
        if not paths and root and os.path.isdir(root):  # names relative to a folder
            paths = {n: os.path.join(root, n) for n in self.index.names
                     if os.path.isfile(os.path.join(root, n))}
        self._paths = confine_to_root(paths, root, self.index_dir)
        return self._paths

    def check_gallery(self) -> int:
        """Resolve every gallery file now (``serve`` calls it at start): refuses an index
        whose names lead outside the gallery root; returns how many images are found."""
        return len(self._gallery_paths())

    def gallery_path(self, gallery_id: int) -> str | None:
        """The image file of a gallery id (None when the images are not found)."""
        return self._gallery_paths().get(self.name_of(gallery_id))

    def require_path(self, gallery_id: int) -> str:
        """The image file of a gallery id; :class:`MissingFileError` when it is not found."""
        p = self.gallery_path(gallery_id)
        if p is None or not os.path.isfile(p):
            raise MissingFileError(f"the image of gallery id {gallery_id} "
                                   f"({self.name_of(gallery_id)}) is not found; pass "
                                   f"--gallery-root with the folder or dataset root it is in")
        return p

    # ------------------------------------------------------------------ pictures
    @property
    def can_explain(self) -> bool:
        """The model draws its attention (a checkpoint of a method with ``explain``)."""
        return isinstance(self.model, torch.nn.Module) and hasattr(self.model, "explain") \
            and bool(getattr(self.model, "explainable", True))

    @property
    def can_explain_pair(self) -> bool:
        """The model draws where one image attends in another (DCAL Re-ID, cross-image)."""
        return self.can_explain and bool(getattr(self.model, "pairwise_explain", False))

    def _picture(self, draw) -> bytes:
        with tempfile.TemporaryDirectory(prefix="finegrain-") as tmp:
            path = os.path.join(tmp, "picture.png")
            draw(path)
            with open(path, "rb") as f:
                return f.read()

    def explain(self, image: Any, title: str = "query") -> bytes:
        """PNG of the model's attention on an image (``finegrain explain``'s picture), drawn
        on the image that is searched: the index's preprocessing (:attr:`transform`), whole
        and at its aspect ratio."""
        from .visualize import save_explain
        if not self.can_explain:
            raise InputError(f"{self.model_path} has no attention to draw")
        x = self.transform(self._decode(image)[1])[None]
        with self._lock, torch.no_grad():
            maps = self.model.explain(x.to(self.device))
        return self._picture(lambda p: save_explain(x, maps, p, self.meta.mean,
                                                    self.meta.std, titles=[title]))

    def _pair_score(self, image: torch.Tensor, gallery_id: int) -> float:
        """The score the result list gives ``gallery_id`` for the decoded query ``image``: its
        descriptor (index preprocessing and scales) against the stored vector."""
        q = self.embed([image])
        try:
            with self._lock:
                g = self.index.reconstruct(np.array([gallery_id]))
        except InputError:  # an index that cannot give its vectors back: embed the file
            g = self.embed([self.require_path(gallery_id)])
        return float(q[0] @ np.asarray(g, np.float32)[0])

    def explain_pair(self, image: Any, gallery_id: int, title: str = "query") -> bytes:
        """PNG of where the query attends in a gallery image, with the score the result list
        shows (the query's descriptor, as searched, against the gallery image's stored one):
        why these two match (Re-ID / pair-wise models). Both images go through the index's
        preprocessing (a DCAL model takes one size, so both have it)."""
        from .visualize import save_explain
        if not self.can_explain_pair:
            raise InputError(f"{self.model_path} draws no pair-wise attention (DCAL Re-ID or "
                             f"cross-image models do)")
        img = self._decode(image)[1]
        x = self.transform(img)[None]
        name = self.name_of(gallery_id)
        px = self.transform(self._decode(self.require_path(gallery_id))[1])[None]
        top = f"{title} vs {name}: score {self._pair_score(img, gallery_id):.3f}"
        with self._lock, torch.no_grad():
            maps = self.model.explain(x.to(self.device), pair=px.to(self.device))
        return self._picture(lambda p: save_explain(x, maps, p, self.meta.mean,
                                                    self.meta.std, titles=[title],
                                                    pair_images=px, suptitle=top))
