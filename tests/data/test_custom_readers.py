"""Plain user formats: ``imagefolder`` and ``reid_csv``."""

import os

import pytest

from finegrain.data import DatasetError, build_dataset
from finegrain.data.datasets.custom import ImageFolder, ReIDCSV
from .files import JPEG, PNG, write_bytes


def test_imagefolder_with_splits(tmp_path):
    for split, cls, name in [("train", "cat", "a.jpg"), ("train", "cat", "sub/b.jpg"),
                             ("train", "dog", "c.png"), ("test", "dog", "d.jpg"),
                             ("val", "cat", "e.jpg")]:
        write_bytes(str(tmp_path / split / cls / name), PNG if name.endswith("png") else JPEG)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    train = build_dataset("imagefolder", str(tmp_path), "train")
    assert train.classes == ["cat", "dog"] and train.labels == [0, 0, 1]
    assert train.samples[1].path == str(tmp_path / "train" / "cat" / "sub" / "b.jpg")
    test = ImageFolder(str(tmp_path), "test")
    assert test.classes == ["cat", "dog"] and test.labels == [1]
    assert ImageFolder(str(tmp_path), "val").labels == [0]
    assert train[2]["image"].shape == (3, 8, 8)
    assert ImageFolder.available_splits(str(tmp_path)) == ("train", "val", "test")
    write_bytes(str(tmp_path / "test" / "bird" / "x.jpg"))
    with pytest.raises(DatasetError, match="class 'bird' is not a folder of"):
        ImageFolder(str(tmp_path), "test")


def test_imagefolder_single_tree(tmp_path):
    write_bytes(str(tmp_path / "oak" / "1.jpg"))
    write_bytes(str(tmp_path / "elm" / "2.jpg"))
    ds = ImageFolder(str(tmp_path), "train")
    assert ds.classes == ["elm", "oak"] and ds.labels == [0, 1]
    assert ImageFolder.available_splits(str(tmp_path)) == ("train",)
    with pytest.raises(DatasetError, match="read as split 'train'"):
        ImageFolder(str(tmp_path), "test")


def test_imagefolder_missing_split_and_empty(tmp_path):
    write_bytes(str(tmp_path / "train" / "oak" / "1.jpg"))
    with pytest.raises(DatasetError, match="no test/ folder"):
        ImageFolder(str(tmp_path), "test")
    os.makedirs(tmp_path / "val" / "oak")
    with pytest.raises(DatasetError, match="empty"):
        ImageFolder(str(tmp_path), "val")


CSV = """path,label,camid,split
imgs/a.jpg,12,0,train
imgs/b.jpg,12,1,train
imgs/c.jpg,40,2,train
imgs/q1.jpg,7,0,query
imgs/g1.jpg,7,1,gallery
imgs/g2.jpg,9,0,gallery
"""


@pytest.fixture
def csv_root(tmp_path):
    (tmp_path / "data.csv").write_text(CSV)
    for line in CSV.splitlines()[1:]:
        write_bytes(str(tmp_path / line.split(",")[0]))
    return tmp_path


def test_reid_csv(csv_root):
    train = build_dataset("reid_csv", str(csv_root), "train")
    assert train.task == "reid" and train.labels == [0, 0, 1] and train.classes == ["12", "40"]
    assert [s.camid for s in train.samples] == [0, 1, 2]
    assert train.samples[0].path == str(csv_root / "imgs" / "a.jpg")
    query = ReIDCSV(str(csv_root), "query")
    gallery = ReIDCSV(str(csv_root), "gallery")
    assert query.labels == [7] and gallery.labels == [7, 9]
    assert gallery[1]["image"].shape == (3, 8, 8) and gallery[1]["camid"] == 0
    assert ReIDCSV.available_splits(str(csv_root)) == ("train", "query", "gallery")


def test_reid_csv_string_labels_no_camid_no_split(tmp_path):
    (tmp_path / "mine.csv").write_text("path,label\nx/1.jpg,zebra\nx/2.jpg,ant\nx/3.jpg,zebra\n")
    ds = ReIDCSV(str(tmp_path), "train", csv_file="mine.csv")
    assert ds.classes == ["ant", "zebra"] and ds.labels == [1, 0, 1]
    assert all(s.camid == -1 for s in ds.samples)
    with pytest.raises(DatasetError, match="no 'split' column"):
        ReIDCSV(str(tmp_path), "query", csv_file="mine.csv")


def test_reid_csv_default_cameras(tmp_path):
    (tmp_path / "data.csv").write_text("path,label,split\nq.jpg,3,query\ng.jpg,3,gallery\n")
    assert ReIDCSV(str(tmp_path), "query").samples[0].camid == 0
    assert ReIDCSV(str(tmp_path), "gallery").samples[0].camid == 1


@pytest.mark.parametrize("text,match", [
    ("file,label\na.jpg,1\n", "line 1: header"),
    ("path,label,split\na.jpg,1,dev\n", "line 2: split 'dev'"),
    ("path,label,camid\na.jpg,1,\n", "line 2: camid"),
    ("path,label\na.jpg,-1\n", "line 2: label -1 is negative"),
])
def test_reid_csv_errors(tmp_path, text, match):
    (tmp_path / "data.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        ReIDCSV(str(tmp_path), "train")


def test_reid_csv_missing(tmp_path):
    with pytest.raises(DatasetError, match="data.csv"):
        ReIDCSV(str(tmp_path), "train")
