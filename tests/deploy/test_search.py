"""Search by image: ``embed --images`` (unlabelled folders, globs, lists), the
index recording its checkpoint, ``finegrain.load`` / ``Searcher`` and ``finegrain search``."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import finegrain
from finegrain.cli import main
from finegrain.data import build_dataset, read_image
from finegrain.errors import EXIT_USER_ERROR, InputError, MissingFileError
from finegrain.loading import checkpoint_hash
from finegrain.retrieval.descriptors import DescriptorMismatch, load_descriptors
from finegrain.retrieval.index import index_files

from .helpers import DALG, run_retrieval, write_checkpoint


def test_embed_images_names_relative_labels_minus_one_root_recorded(dalg_index):
    d = load_descriptors(dalg_index["descriptors"])
    rel = sorted(os.path.relpath(p, dalg_index["photos"]) for p in dalg_index["files"])
    assert sorted(d.names) == rel and "shoes/p01.png" in d.names
    assert d.labels == [-1] * 8 and d.meta["dataset"] == "images"
    assert d.meta["root"] == os.path.abspath(dalg_index["photos"])
    man = json.load(open(os.path.join(dalg_index["index"], "index.json")))
    assert man["checkpoint"] == os.path.abspath(dalg_index["checkpoint"])
    assert man["checkpoint_hash"] == checkpoint_hash(dalg_index["checkpoint"])
    assert man["dataset"] == "images" and man["preprocessing"]["img_size"] == 32


def test_images_reader_takes_a_glob_and_a_list_file(dalg_index, tmp_path):
    photos = dalg_index["photos"]
    ds = build_dataset("images", os.path.join(photos, "**", "*.png"), "gallery")
    assert all(s.path.endswith(".png") for s in ds.samples) and len(ds) == 5
    lst = tmp_path / "list.txt"
    lst.write_text(f"# name label\n{photos}/p00.jpg 3\n{photos}/shoes/p01.png\n")
    ds = build_dataset("images", str(lst), "query")
    assert ds.labels == [3, -1] and len(ds) == 2
    lst.write_text("missing.jpg\n")
    with pytest.raises(InputError, match="list.txt line 1"):
        build_dataset("images", str(lst), "gallery")
    with pytest.raises(InputError, match="no image"):
        build_dataset("images", str(tmp_path / "*.jpg"), "gallery")


def test_embed_needs_dataset_or_images_not_both(dalg_index, tmp_path):
    with pytest.raises(InputError, match="one of the two"):
        run_retrieval(["embed", dalg_index["checkpoint"], "--images", dalg_index["photos"],
                       "--dataset", "images", "--out", str(tmp_path / "x")])


def test_searcher_finds_each_gallery_image_first_with_the_index_descriptor(dalg_index):
    s = finegrain.Searcher(dalg_index["index"])
    d = load_descriptors(dalg_index["descriptors"])
    files = dalg_index["files"]
    q = s.embed(files)
    rows = [d.names.index(os.path.relpath(p, dalg_index["photos"])) for p in files]
    np.testing.assert_allclose(q, np.asarray(d.vectors)[rows], atol=1e-5)
    res = s.search(files[:2], k=3)
    assert [r.hits[0].name for r in res] == [d.names[rows[0]], d.names[rows[1]]]
    assert res[0].hits[0].score == pytest.approx(1.0, abs=1e-4) and len(res[0].hits) == 3
    assert res[0].hits[0].rank == 1 and res[0].hits[0].label == -1
    assert files[0] in str(res[0]) and "1.0000" in str(res[0])
    # a folder, encoded bytes and a uint8 tensor are queries too
    assert len(s.search(dalg_index["photos"], k=2)) == 8
    with open(files[1], "rb") as f:
        by_bytes = s.search(f.read(), k=1)[0]
    by_tensor = s.search(read_image(files[1]), k=1)[0]
    assert by_bytes.hits[0].name == by_tensor.hits[0].name == res[1].hits[0].name
    # a gallery image as the query, and its file
    g = s.search_gallery(res[0].hits[0].id, k=2)
    assert g.hits[0].id == res[0].hits[0].id
    assert os.path.samefile(s.gallery_path(res[0].hits[0].id), files[0])


def _index_of_edited_descriptors(descriptors: str, tmp_path, edit) -> str:
    """An index built from a copy of ``descriptors`` whose JSON ``edit(path)`` changed."""
    old = str(tmp_path / "old")
    for ext in (".npy", ".json"):
        shutil.copy(descriptors + ext, old + ext)
    edit(old + ".json")
    index = str(tmp_path / "old.index")
    assert run_retrieval(["index", "build", old, "--kind", "Flat", "--out", index]) == 0
    return index


def test_an_index_of_files_saying_image_size_is_searched_alike(dalg_index, tmp_path):
    """Descriptor files and index folders written before 2026-11-30 say
    ``preprocessing.image_size``: they still build an index that ``Searcher`` searches as the
    new one (a query finds the same hits with the same scores)."""
    def with_old_names(path):
        meta = json.load(open(path))
        meta["preprocessing"] = {("image_size" if k == "img_size" else k): v
                                 for k, v in meta["preprocessing"].items()}
        json.dump(meta, open(path, "w"))

    index = _index_of_edited_descriptors(dalg_index["descriptors"], tmp_path, with_old_names)
    for name in ("index.json", "descriptors.json"):  # an index folder of then
        with_old_names(index_files(index)[name])
    assert "image_size" in json.load(open(os.path.join(index, "index.json")))["preprocessing"]
    s, ref = finegrain.Searcher(index), finegrain.Searcher(dalg_index["index"])
    assert s.preprocessing == ref.preprocessing and s.preprocessing["img_size"] == 32
    files = dalg_index["files"][:3]
    got, want = s.search(files, k=4), ref.search(files, k=4)
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want]
    # and the folder is compatible with the new descriptors (index add checks the signature)
    s.index.check(load_descriptors(dalg_index["descriptors"]).meta)


def test_load_gives_the_model_and_its_transform(dalg_index):
    model, transform = finegrain.load(dalg_index["checkpoint"])
    x = transform(read_image(dalg_index["files"][0]))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        assert model(x[None])["embedding"].shape == (1, 16)


def test_search_command_prints_and_writes_json(dalg_index, tmp_path, capsys):
    out = str(tmp_path / "res.json")
    files = dalg_index["files"]
    assert main(["search", dalg_index["index"], files[0], files[3], "-k", "2", "--out",
                 out]) == 0
    text = capsys.readouterr().out
    assert files[0] in text and "p00.jpg" in text
    res = json.load(open(out))
    assert res["k"] == 2 and [q["hits"][0]["name"] for q in res["queries"]] == \
        ["p00.jpg", "shoes/p03.jpg"]
    assert main(["search", dalg_index["index"], dalg_index["photos"], "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["queries"]) == 8


def test_model_override_and_refusal_of_another_checkpoint(dalg_index, tmp_path, capsys):
    other = write_checkpoint(tmp_path / "other.ckpt", DALG, "retrieval", seed=1)
    with pytest.raises(DescriptorMismatch, match="--model"):
        finegrain.Searcher(dalg_index["index"], model=other)
    assert main(["search", dalg_index["index"], dalg_index["files"][0], "--model",
                 other]) == EXIT_USER_ERROR
    assert "not the checkpoint" in capsys.readouterr().err
    # an index that does not say where its model is (older folders): --model is needed
    moved = str(tmp_path / "old.index")
    shutil.copytree(dalg_index["index"], moved)
    for name in ("index.json", "descriptors.json"):
        p = index_files(moved)[name]
        meta = json.load(open(p))
        meta.pop("checkpoint", None)
        json.dump(meta, open(p, "w"))
    with pytest.raises(MissingFileError, match="--model"):
        finegrain.Searcher(moved)
    s = finegrain.Searcher(moved, model=dalg_index["checkpoint"])
    assert s.search(dalg_index["files"][0], k=1)[0].hits[0].name == "p00.jpg"


@pytest.mark.slow  # an ONNX export with its parity check: ~10-20 s on 2 cores
def test_an_export_folder_searches_like_its_checkpoint(dalg_index, tmp_path):
    from finegrain.export import export
    folder = str(tmp_path / "export")
    export(dalg_index["checkpoint"], folder, "onnx", num_images=2)
    s = finegrain.Searcher(dalg_index["index"], model=folder)  # same checkpoint hash
    ref = finegrain.Searcher(dalg_index["index"])
    files = dalg_index["files"]
    np.testing.assert_allclose(s.embed(files), ref.embed(files), atol=1e-4)
    assert not s.can_explain
    model, transform = finegrain.load(folder)
    assert model(transform(read_image(files[0]))[None])["embedding"].shape == (1, 16)


def test_a_model_of_one_input_size_is_embedded_and_searched_at_it(reid_index, tmp_path):
    from .helpers import write_photos
    pre = load_descriptors(reid_index["descriptors"]).meta["preprocessing"]
    assert pre["resize"] == "fixed" and pre["img_size"] == [32, 32]  # DCAL's ViT: 32 x 32
    s = finegrain.Searcher(reid_index["index"])
    query = write_photos(str(tmp_path), n=1, size=(40, 60), seed=3)[0]  # 2:3
    assert tuple(s.transform(read_image(query)).shape) == (3, 32, 32)
    assert len(s.search(query, k=3)[0].hits) == 3  # was: 'Input height (21) doesn't match'


def test_an_export_of_one_size_is_refused_at_start_for_an_index_of_any_size(dalg_index,
                                                                           tmp_path):
    from finegrain.export import export
    folder = str(tmp_path / "pt2")
    export(dalg_index["checkpoint"], folder, "exported", num_images=2)  # .pt2: fixed size
    pre = json.load(open(os.path.join(folder, "preprocess.json")))
    assert pre["search"]["what"].startswith("not reproducible with this export")
    with pytest.raises(InputError, match="takes one image size only .*--format onnx"):
        finegrain.Searcher(dalg_index["index"], model=folder)


def test_an_older_index_of_a_one_size_model_is_refused_at_start(reid_index, tmp_path):
    """Before the fixed record, such a model's gallery was embedded at the longest side (and
    its search failed on the first non-square photo): refused at start, naming the fix."""
    def as_before(path):
        meta = json.load(open(path))
        meta["preprocessing"].update(resize="longest_side", img_size=32)
        json.dump(meta, open(path, "w"))

    index = _index_of_edited_descriptors(reid_index["descriptors"], tmp_path, as_before)
    with pytest.raises(InputError, match=r"takes one image size only \(32x32\).*embed the "
                                         r"gallery again"):
        finegrain.Searcher(index)
