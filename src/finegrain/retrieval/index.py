"""An index folder: a faiss index, its id / name map and the descriptor JSON it came from.

Layout (``finegrain index build DESCRIPTORS --kind FACTORY --out INDEX``)::

    INDEX/
        index.G.faiss      faiss.write_index of the index (ids are stable integers)
        ids.G.json         {"ids": [...], "names": [...], "labels": [...], "next_id": n,
                            "removed": [...]}   (one entry per searchable vector)
        descriptors.G.json the JSON of the descriptor file the index was built from
        index.json         manifest, written last (the commit of a save): generation G and
                           the three file names ("files"; folders without them use
                           index.faiss, ids.json, descriptors.json), factory, metric
                           ("cosine" or "euclidean"; folders written before 2026-11-30
                           say "ip" / "l2", read as those two), mode, dim,
                           count, search parameters, model_name, checkpoint_hash,
                           preprocessing, files added later,
                           and where the vectors came from: checkpoint (path), dataset,
                           split, root (``finegrain search`` / ``serve`` read them)

**Ids.** Every vector gets an integer id when added (0, 1, 2 ... in add order); search results
carry ids and names, and ``remove`` takes names. How faiss keeps the ids depends on the index:

- IVF indexes (``IVF4096,SQ8``, ``PCA128,IVF1024,Flat`` ...) store the ids themselves
  (``add_with_ids``) with a hash-table direct map, so ``remove`` deletes vectors and
  ``reconstruct`` works (mode ``"ivf"``). IVF fast-scan (``IVF4096,PQ64x4fs``): faiss cannot
  remove through the direct map of its packed code blocks, so ``remove`` drops the map, removes
  by a scan of the lists and rebuilds it; ``reconstruct`` is refused (faiss 1.15 crashes on a
  loaded fast-scan index), so ``--aqe`` / ``--rerank`` need ``...x4fs,RFlat`` there;
- every other index is wrapped in ``IndexIDMap2``; flat storage deletes for real (mode
  ``"idmap"``), indexes without deletion (HNSW, IVF-PQ with a refine stage, PQ...) keep the
  vector and mark the id removed: searches then ask faiss for ``k + #removed`` and drop the
  removed ids (mode ``"idmap"`` with a non-empty ``removed`` list; rebuild to compact).
  (``IndexIDMap2`` over IVF is avoided: faiss's IVF keeps its internal numbering on removal
  while the id map is compacted, which would mislabel results.)

**Refusal.** ``add`` and ``search`` check that the descriptors come from the same model
checkpoint and preprocessing as the index (``descriptors.check_compatible``) and raise
``descriptors.DescriptorMismatch`` naming what differs.

**Training** of IVF / PQ / SQ runs on a seeded random sample: ``train_size`` or, by default,
64 vectors per IVF cell (faiss recommends 30-256) and at least 65,536 (``IVF4096``: 262,144 of
a 1M gallery, not the whole 2 GB); the size used is stored as ``train_size`` in ``index.json``.

**Factory choice** (``--kind auto``, :func:`default_factory`; the ANN tables of
benchmarks/retrieval.py and their reading in docs/retrieval.md, "Choosing an index"): exact
``Flat`` below :data:`FLAT_MAX` (200k) vectors, else ``IVF{nlist},PQ{dim/4}x4fs,RFlat`` with
nlist ~ 4 sqrt(n) (1M: 4096), ``nprobe`` max(256, nlist / 16) and ``k_factor_rf`` 16
(stored in ``index.json`` and in the index): the fastest setting measured that keeps
recall@100 >= 0.9 on all three generated distributions (tight clusters, small clusters, no
clusters), not only on the tightly clustered one (where nprobe 4 suffices but gives recall
0.29-0.39 on the others at 100k).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import faiss
import numpy as np

from ..atomic import write_json, write_with
from ..errors import InputError, MissingFileError, UnknownNameError
from .descriptors import Descriptors, check_compatible, load_descriptors, read_json, signature
from .search import create_index, metric_name, set_search_params, train_index
from .search import search as faiss_search

__all__ = ["Index", "SearchResult", "LARGE_GALLERY_FACTORY", "LARGE_GALLERY_PARAMS",
           "default_factory"]

FORMAT = "finegrain-index"
VERSION = 1
#: the data files of an index folder (``index.json`` names the generation in use)
_DATA_FILES = {"index": "faiss", "ids": "json", "descriptors": "json"}
_DATA_NAME = re.compile(r"(index|ids|descriptors)(\.\d+)?\.(faiss|json)|"
                        r"\.(index|ids|descriptors)(\.\d+)?\.(faiss|json)\.tmp-\d+")
#: ``--kind auto`` picks exact search (``Flat``) below this many vectors.
FLAT_MAX = 200_000
#: Default factory for 1M 256-d descriptors (``default_factory(1_000_000)``;
#: benchmarks/retrieval.py, docs/retrieval.md "Choosing an index").
LARGE_GALLERY_FACTORY = "IVF4096,PQ64x4fs,RFlat"
#: Its search parameters: IVF cells visited, and shortlist size / k re-scored exactly.
LARGE_GALLERY_PARAMS = {"nprobe": 256, "k_factor_rf": 16}
#: IVF cells ``--kind auto`` visits: at least this many ...
MIN_NPROBE = 256
#: ... and this share of the cells (the share measured at 1M, kept for larger sets).
NPROBE_SHARE = 1 / 16
#: Shortlist of the fast-scan codes re-scored exactly: ``k_factor_rf`` x k.
K_FACTOR_RF = 16
#: Default training sample: this many vectors per IVF cell (faiss recommends 30-256) ...
TRAIN_PER_CELL = 64
#: ... and at least this many (PQ / SQ encoders, indexes without cells).
MIN_TRAIN_SIZE = 65536


def default_train_size(index: faiss.Index) -> int:
    """Training sample of an untrained index: ``max(64 x nlist, 65536)`` vectors."""
    ivf = faiss.try_extract_index_ivf(index)
    return max(TRAIN_PER_CELL * (ivf.nlist if ivf is not None else 0), MIN_TRAIN_SIZE)


def _is_fast_scan_ivf(index: faiss.Index) -> bool:
    """An IVF fast-scan index stored as such (mode "ivf"; not one under a refine stage)."""
    ix = faiss.downcast_index(index)
    while isinstance(ix, faiss.IndexPreTransform):
        ix = faiss.downcast_index(ix.index)
    return isinstance(ix, faiss.IndexIVFFastScan)


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: the power of two nearest ``4 sqrt(n)`` (1M: 4096), at most
    ``n / 39`` (faiss wants >= 39 training vectors per cell)."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    return max(1, min(nlist, 2 ** int(math.log2(max(n // 39, 1)))))


def default_nprobe(nlist: int) -> int:
    """IVF cells ``--kind auto`` visits: ``max(256, nlist / 16)``, at most ``nlist``."""
    return min(nlist, max(MIN_NPROBE, round(nlist * NPROBE_SHARE)))


def fast_scan_subquantizers(dim: int) -> int:
    """4-bit sub-quantizers of ``--kind auto``'s fast-scan PQ for ``dim``-d descriptors:
    ``dim / 4`` (2 bits a dimension, ``dim / 8`` bytes a vector: what was measured at 256-d),
    or the largest divisor of ``dim`` below that."""
    return next(m for m in range(max(dim // 4, 1), 0, -1) if dim % m == 0)


def default_factory(n: int, dim: int = 256) -> tuple[str, dict[str, int]]:
    """Index kind and search parameters ``index build --kind auto`` uses for ``n`` vectors.

    ``("Flat", {})`` (exact) below :data:`FLAT_MAX` (200k) vectors; above,
    ``IVF{nlist},PQ{dim/4}x4fs,RFlat``: IVF with ``nlist`` = :func:`default_nlist` (~4 sqrt(n):
    2048 up to ~520k, 4096 at 1M) whose 4-bit fast-scan PQ codes (``dim / 8`` bytes) rank
    ``nprobe`` = :func:`default_nprobe` cells (256 up to 4096 cells, nlist / 16 above), and
    whose best ``k_factor_rf`` x k (16 x k) are re-scored on the exact float vectors
    (``RFlat``: memory of the flat index + the codes). :meth:`Index.build` sizes the PQ to the
    descriptors (:func:`fast_scan_subquantizers`); ``dim`` does it here.

    Chosen from benchmarks/retrieval.py (2026-11-30; 1M x 256, 1,000 held-out queries, 2 CPU
    threads; tables in docs/retrieval.md): the setting with recall@100 >= 0.9 on all three
    generated distributions (tight clusters; small clusters of ~16 in a 24-d latent; no
    clusters) and the largest worst-case speed-up over exact search: at 1M, recall@100
    0.997 / 0.951 / 0.942 at 17x / 37x / 24x the exact queries/s. At 1M only 9-11% of a
    query's exact top-100 lie in its own cell on the last two, so nprobe 128 reaches 0.88
    (small clusters) and 256 is needed; ``IVF4096,SQ8`` at nprobe 256 also holds recall
    (0.955 / 0.971) but is 5-6x slower; shortlists of 8 x k cap recall at 0.87 without clusters. The
    former default (``IVF4096,SQ8``, nprobe 16, chosen on tight clusters only) gave recall@100
    0.64 on the others at 100k. At 100k no index reached 0.9 on all three at 10x exact (best:
    this kind, nprobe 128, 7.7x), so exact search stays the default below 200k. Sizes between
    200k and 1M (2048 cells: nprobe 256, 12.5% of the cells) were not measured; their share
    of cells visited is above the 1M one.
    """
    if n < FLAT_MAX:
        return "Flat", {}
    nlist = default_nlist(n)
    return (f"IVF{nlist},PQ{fast_scan_subquantizers(dim)}x4fs,RFlat",
            {"nprobe": default_nprobe(nlist), "k_factor_rf": K_FACTOR_RF})


class SearchResult:
    """Results of :meth:`Index.search`: ``scores`` (nq, k) float32 (metric ``"cosine"``: inner
    products of the L2-normalised descriptors, higher is closer; ``"euclidean"``: squared L2
    distances, lower is closer), ``ids`` (nq, k) int64 (``-1``: no result), ``names`` (nq lists
    of k names, ``None`` for -1)."""

    def __init__(self, scores: np.ndarray, ids: np.ndarray, names: list[list[str | None]]):
        self.scores, self.ids, self.names = scores, ids, names

    def to_json(self, query_names: Sequence[str] | None = None) -> dict[str, Any]:
        q = list(query_names) if query_names is not None else [str(i) for i in
                                                               range(len(self.ids))]
        return {"queries": [{"query": qn, "ids": self.ids[i].tolist(),
                             "names": self.names[i],
                             "scores": [round(float(s), 6) for s in self.scores[i]]}
                            for i, qn in enumerate(q)]}


def _check_unique(d: Descriptors) -> None:
    """Refuse a descriptor file that holds an image name twice (``remove NAME`` would leave
    the other copy searchable)."""
    seen: set[str] = set()
    for i, n in enumerate(d.names):
        if n in seen:
            raise InputError(f"{d.path or 'the descriptors'}: image name {n!r} appears twice "
                             f"(again at row {i}); names must be unique: write the file again "
                             f"from a list without duplicates (`finegrain embed` names each "
                             f"image once)")
        seen.add(n)


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """Where the vectors came from, for ``finegrain search`` / ``serve`` to embed queries the
    same way and show the images: the checkpoint (absolute when it exists from here), the
    dataset, split and root."""
    ck = meta.get("checkpoint")
    if ck and os.path.isfile(ck):
        ck = os.path.abspath(ck)
    out = {"checkpoint": ck}
    out.update({k: meta[k] for k in ("dataset", "split", "root") if meta.get(k) is not None})
    return out


def _inner_kind(index: faiss.Index) -> tuple[str, bool]:
    """``(mode, native_remove)`` of a freshly built (empty) faiss index."""
    ix = faiss.downcast_index(index)
    if faiss.try_extract_index_ivf(index) is not None and isinstance(
            ix, (faiss.IndexIVF, faiss.IndexPreTransform)):
        return "ivf", True
    while isinstance(ix, faiss.IndexPreTransform):
        ix = faiss.downcast_index(ix.index)
    return "idmap", isinstance(ix, faiss.IndexFlat)


def index_files(folder: str) -> dict[str, str]:
    """Paths of an index folder's files in use, by role: ``index.json`` and the generation it
    names (``index.faiss``, ``ids.json``, ``descriptors.json`` -> ``index.G.faiss`` ...; the
    fixed names in folders written before generations)."""
    head = os.path.join(folder, "index.json")
    if not os.path.isfile(head):
        raise MissingFileError(f"{head} not found: {folder} is not a finegrain index "
                               f"folder (build one with 'finegrain index build')")
    files = read_json(head, "rebuild the index with 'finegrain index build'").get("files") or \
        {k: f"{k}.{ext}" for k, ext in _DATA_FILES.items()}
    out = {f"{k}.{ext}": os.path.join(folder, files[k]) for k, ext in _DATA_FILES.items()}
    return {**out, "index.json": head}


class Index:
    """A searchable, growable descriptor index (see the module docstring).

    Build with :meth:`build`, open with :meth:`load`; :meth:`save` writes the folder.
    """

    def __init__(self, index: faiss.Index, manifest: dict[str, Any], ids: Sequence[int],
                 names: Sequence[str], labels: Sequence[int], removed: Sequence[int] = (),
                 next_id: int | None = None, source_meta: dict[str, Any] | None = None):
        self.index = index
        self.manifest = manifest
        self.ids = [int(i) for i in ids]
        self.names = [str(n) for n in names]
        self.labels = [int(v) for v in labels]
        self.removed = set(int(i) for i in removed)
        self.next_id = max(self.ids, default=-1) + 1 if next_id is None else int(next_id)
        self.source_meta = source_meta or {}
        self._reindex()

    def _reindex(self) -> None:
        self._row = {i: r for r, i in enumerate(self.ids)}
        self._by_name = {n: i for i, n in zip(self.ids, self.names)}

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def build(cls, descriptors: Descriptors | str, factory: str = "Flat",
              metric: str = "cosine", train_size: int | None = None,
              nprobe: int | None = None, ef_search: int | None = None,
              seed: int = 0) -> "Index":
        """Train (when the factory needs it) and fill an index from a descriptor file.

        Args:
            descriptors: a :class:`Descriptors` or the ``NAME`` of ``NAME.npy`` / ``NAME.json``.
            factory: faiss ``index_factory`` string (``"Flat"``, ``"IVF4096,SQ8"``,
                ``"HNSW32"``, ``"IVF4096,PQ64x4fs,RFlat"`` ...). ``"auto"``:
                :func:`default_factory` of the database size.
            metric: ``"cosine"`` (inner product of the L2-normalised descriptors: their
                cosine similarity, higher = closer) or ``"euclidean"`` (squared L2 distance,
                lower = closer); ``"ip"`` / ``"l2"``, the older names, are accepted
                (:func:`~.search.metric_name`) and stored as today's.
            train_size: train IVF / PQ on this many rows drawn at random (seeded); ``None``:
                :func:`default_train_size` (64 per IVF cell, at least 65,536), so a 1M
                gallery is not read whole; a size >= the count trains on every row.
            nprobe: IVF cells visited per query (stored, used by every later search);
                ``factory="auto"`` keeps it (its own default only fills a missing one).
            ef_search: HNSW search depth (stored).
            seed: seed of the training sample.
        """
        metric = metric_name(metric)
        d = descriptors if isinstance(descriptors, Descriptors) else load_descriptors(descriptors)
        _check_unique(d)
        auto_params: dict[str, int] = {}  # auto's parameters other than nprobe (k_factor_rf)
        if factory == "auto":
            factory, params = default_factory(len(d))
            factory = re.sub(r"PQ\d+x4fs", f"PQ{fast_scan_subquantizers(d.dim)}x4fs", factory)
            auto_params = {k: v for k, v in params.items() if k != "nprobe"}
            if nprobe is not None and "nprobe" not in params:
                raise InputError(f"--kind auto chose {factory} for {len(d)} vectors (exact: it "
                                 f"has no nprobe); drop --nprobe, or pass --kind "
                                 f"{LARGE_GALLERY_FACTORY} to use an IVF index")
            nprobe = params.get("nprobe") if nprobe is None else nprobe
        inner = create_index(d.dim, factory, metric)
        size = default_train_size(inner) if train_size is None else train_size
        trained_on = train_index(inner, d.vectors, size, seed, d.path or "the file")
        mode, native = _inner_kind(inner)
        if mode == "ivf":
            faiss.extract_index_ivf(inner).set_direct_map_type(faiss.DirectMap.Hashtable)
            index = inner
        else:
            index = faiss.IndexIDMap2(inner)
        pre = {k: d.meta.get(k) for k in ("model_name", "checkpoint_hash", "preprocessing")}
        pre.update(_provenance(d.meta))
        manifest = {"format": FORMAT, "version": VERSION, "factory": factory, "metric": metric,
                    "mode": mode, "native_remove": native, "dim": d.dim,
                    "train_size": trained_on,
                    "params": {**{k: v for k, v in (("nprobe", nprobe), ("efSearch", ef_search))
                                  if v is not None}, **auto_params},
                    **pre, "sources": [d.path]}
        set_search_params(index, manifest["params"], factory)  # refuses ones it lacks
        out = cls(index, manifest, [], [], [], source_meta=d.meta)
        out._add_vectors(d)
        return out

    def save(self, folder: str) -> str:
        """Write the index folder (created if needed); returns it.

        A kill or a full disk at any instant leaves the folder's previous index usable: the
        data files of this save get new names (``index.G.faiss``, ``ids.G.json``,
        ``descriptors.G.json``, generation G), each written whole (:mod:`finegrain.atomic`);
        ``index.json``, replaced last in one rename, names them, and only then are the files
        of the previous generation removed."""
        os.makedirs(folder, exist_ok=True)
        gen = int(self.manifest.get("generation", 0)) + 1
        files = {k: f"{k}.{gen}.{ext}" for k, ext in _DATA_FILES.items()}
        write_with(os.path.join(folder, files["index"]),
                   lambda tmp: faiss.write_index(self.index, tmp))
        write_json(os.path.join(folder, files["ids"]),
                   {"ids": self.ids, "names": self.names, "labels": self.labels,
                    "next_id": self.next_id, "removed": sorted(self.removed)}, indent=None)
        write_json(os.path.join(folder, files["descriptors"]), self.source_meta, indent=None)
        manifest = {**self.manifest, "count": len(self), "generation": gen, "files": files}
        write_json(os.path.join(folder, "index.json"), manifest)  # the commit
        self.manifest = manifest
        keep = set(files.values()) | {"index.json"}
        for name in os.listdir(folder):  # earlier generations, and unnamed ones of a kill
            if name not in keep and _DATA_NAME.fullmatch(name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass
        return folder

    @classmethod
    def load(cls, folder: str) -> "Index":
        """Open an index folder written by :meth:`save`.

        Raises:
            FileNotFoundError: a file of the folder is missing (named).
        """
        fix = "rebuild the index with 'finegrain index build'"
        paths = index_files(folder)
        manifest = read_json(paths["index.json"], fix)
        for p in paths.values():
            if not os.path.isfile(p):
                raise MissingFileError(f"{p} not found: {folder} is not a whole finegrain "
                                       f"index folder; {fix}")
        if manifest.get("format") != FORMAT:
            raise InputError(f"{paths['index.json']} is not a finegrain index manifest")
        if "metric" in manifest:  # "ip" / "l2" in folders written before 2026-11-30
            manifest["metric"] = metric_name(manifest["metric"])
        idmap = read_json(paths["ids.json"], fix)
        source = read_json(paths["descriptors.json"], fix)
        try:
            index = faiss.read_index(paths["index.faiss"])
        except RuntimeError as e:
            raise InputError(f"{paths['index.faiss']} is truncated or damaged (faiss: "
                             f"{str(e).strip().splitlines()[-1][:160]}); {fix}") from None
        out = cls(index, manifest, idmap["ids"], idmap["names"], idmap["labels"],
                  idmap.get("removed", ()), idmap.get("next_id"), source)
        if index.ntotal != len(out) + len(out.removed):
            raise InputError(f"{folder}: index.faiss holds {index.ntotal} vectors but ids.json "
                             f"{len(out)} (+{len(out.removed)} removed); the folder is "
                             f"inconsistent: rebuild it")
        return out

    # ------------------------------------------------------------------ add / remove
    def _add_vectors(self, d: Descriptors) -> int:
        _check_unique(d)
        clash = [n for n in d.names if n in self._by_name]
        if clash:
            raise InputError(f"{len(clash)} names of {d.path or 'the descriptors'} are already "
                             f"in the index (first: {clash[0]!r}); remove them first")
        n = len(d)
        new_ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        for a in range(0, n, 65536):
            chunk = np.ascontiguousarray(d.vectors[a:a + 65536], dtype=np.float32)
            self.index.add_with_ids(chunk, new_ids[a:a + 65536])
        self.ids += new_ids.tolist()
        self.names += d.names
        self.labels += d.labels
        self.next_id += n
        self._reindex()
        return n

    def add(self, descriptors: Descriptors | str) -> int:
        """Add a descriptor file (same model and preprocessing); returns how many were added.

        Raises:
            DescriptorMismatch: other model / checkpoint / preprocessing.
            ValueError: a name is already in the index.
        """
        d = descriptors if isinstance(descriptors, Descriptors) else load_descriptors(descriptors)
        check_compatible(self.manifest, d.meta, "the index", f"descriptors {d.path or ''}")
        n = self._add_vectors(d)
        self.manifest.setdefault("sources", []).append(d.path)
        return n

    def remove(self, names: Sequence[str]) -> int:
        """Remove images by name; returns how many were removed.

        Raises:
            KeyError: a name is not in the index (nothing is removed then).
        """
        missing = [n for n in names if n not in self._by_name]
        if missing:
            raise UnknownNameError(f"{len(missing)} names are not in the index (first: "
                                   f"{missing[0]!r})")
        ids = np.array(sorted({self._by_name[n] for n in names}), dtype=np.int64)
        if len(ids) == 0:
            return 0
        if self.manifest.get("native_remove", False):
            if _is_fast_scan_ivf(self.index):
                removed = self._remove_fast_scan(ids)
            else:
                sel = faiss.IDSelectorArray(ids) if self.manifest["mode"] == "ivf" else \
                    faiss.IDSelectorBatch(ids)
                removed = self.index.remove_ids(sel)
            if removed != len(ids):
                raise InputError(f"faiss removed {removed} of {len(ids)} vectors; the index "
                                 f"in memory is inconsistent (the folder is not changed): "
                                 f"rebuild it with 'finegrain index build'")
        else:
            self.removed.update(ids.tolist())
        drop = set(ids.tolist())
        keep = [r for r, i in enumerate(self.ids) if i not in drop]
        self.ids = [self.ids[r] for r in keep]
        self.names = [self.names[r] for r in keep]
        self.labels = [self.labels[r] for r in keep]
        self._reindex()
        return len(ids)

    def _remove_fast_scan(self, ids: np.ndarray) -> int:
        """Remove from an IVF fast-scan index (``IVF4096,PQ64x4fs``): faiss cannot remove
        through its hash-table direct map there (packed code blocks), so the map is dropped,
        the ids removed by a scan of the lists, and the map rebuilt."""
        ivf = faiss.extract_index_ivf(self.index)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        try:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        finally:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    # ------------------------------------------------------------------ search
    def check(self, meta: dict[str, Any], what: str = "the queries") -> None:
        """Raise :class:`DescriptorMismatch` unless ``meta`` matches the index."""
        check_compatible(self.manifest, meta, "the index", what)

    def search(self, queries: Descriptors | np.ndarray, k: int = 100, nprobe: int | None = None,
               ef_search: int | None = None) -> SearchResult:
        """Top-``k`` database entries of every query.

        Args:
            queries: a :class:`Descriptors` (checked against the index) or an (nq, D) array
                (trusted to come from the same model).
            k: results per query.
            nprobe, ef_search: override the stored search parameters.
        """
        if isinstance(queries, Descriptors):
            self.check(queries.meta, f"query descriptors {queries.path}")
            q = queries.vectors
        else:
            q = queries
        if len(self) == 0:
            raise InputError("the index is empty")
        params = self.manifest.get("params", {})
        nprobe = params.get("nprobe") if nprobe is None else nprobe
        ef_search = params.get("efSearch") if ef_search is None else ef_search
        kk = min(int(k) + len(self.removed), self.index.ntotal)
        scores, ids = faiss_search(self.index, np.asarray(q, dtype=np.float32), kk, nprobe=nprobe,
                                   ef_search=ef_search)
        if self.removed:  # drop marked ids, keep the best k of the rest
            bad = np.isin(ids, np.fromiter(self.removed, dtype=np.int64)) | (ids < 0)
            order = np.argsort(bad, axis=1, kind="stable")
            ids = np.where(np.take_along_axis(bad, order, 1), -1, np.take_along_axis(ids, order, 1))
            scores = np.take_along_axis(scores, order, 1)
        k = min(int(k), len(self))
        ids, scores = ids[:, :k], scores[:, :k]
        names = [[self.names[self._row[int(i)]] if i >= 0 else None for i in row] for row in ids]
        return SearchResult(scores, ids, names)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (approximate for compressed indexes) of ids (m,) -> (m, D)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if _is_fast_scan_ivf(self.index):  # faiss 1.15 crashes on a loaded one: refuse
            raise InputError(f"index {self.manifest.get('factory')!r} (IVF fast-scan) cannot "
                             f"give back its vectors (faiss crashes reconstructing a loaded "
                             f"fast-scan index), which --aqe / --rerank need: build it with an "
                             f"exact refine stage (',RFlat') or use IVF...,SQ8")
        out = np.empty((len(ids), self.index.d), dtype=np.float32)
        for r, i in enumerate(ids):
            out[r] = self.index.reconstruct(int(i))
        return out

    def __contains__(self, gallery_id: int) -> bool:
        """Whether the index holds the id."""
        return int(gallery_id) in self._row

    def row(self, ids: np.ndarray) -> np.ndarray:
        """Positions in ``names`` / ``labels`` of ids (m,) (``-1`` for -1)."""
        return np.array([self._row[int(i)] if i >= 0 else -1 for i in np.ravel(ids)],
                        dtype=np.int64).reshape(np.shape(ids))

    def signature(self) -> dict[str, Any]:
        return signature(self.manifest)
