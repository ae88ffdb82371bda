"""``finegrain data check``: counts per split and the data errors users hit most."""

import json
import os
import shutil

import pytest

from finegrain.data import DatasetError, ImageDataset, Sample, registry
from finegrain.data.check import check_dataset, corrupt_images, format_check
from .files import write_bytes


@pytest.fixture
def market_root(tmp_path):
    root = tmp_path / "Market-1501-v15.09.15"
    for folder, names in {
            "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                                   "0007_c3s1_000476_02.jpg"],
            "query": ["0003_c1s1_000551_00.jpg", "0005_c4s1_000201_00.jpg",
                      "0009_c4s1_000201_00.jpg"],
            "bounding_box_test": ["0003_c2s1_000576_01.jpg", "0005_c4s1_000226_02.jpg",
                                  "0000_c1s1_000000_01.jpg", "-1_c3s1_000026_01.jpg"]}.items():
        for n in names:
            write_bytes(str(root / folder / n))
    return root


def test_check_market(market_root):
    res = check_dataset("market1501", str(market_root))
    assert list(res) == ["train", "query", "gallery"]
    assert res["train"] == {"images": 3, "ids": 2, "cameras": 3}
    assert res["gallery"] == {"images": 3, "ids": 3, "cameras": 3}
    q = res["query"]
    assert q["ids_in_gallery"] == 2 and q["queries_without_gallery_id"] == 1
    assert q["queries_with_valid_match"] == 1  # 0005 only matches on its own camera
    json.dumps(res)
    table = format_check(res)
    assert table.splitlines()[0].split() == ["split", "images", "ids", "cameras", "notes"]
    assert "ids_in_gallery=2" in table and table.splitlines()[2].split()[:4] == ["train", "3",
                                                                              "2", "3"]


def test_check_verify_images(market_root):
    res = check_dataset("market1501", str(market_root), splits=["query"], verify_images=False)
    assert "verified" not in res["query"]
    res = check_dataset("market1501", str(market_root), splits=["train"], verify_images=True)
    assert res["train"]["verified"] == 3
    assert res["train"]["corrupt"] == []
    bad = [market_root / "bounding_box_test" / "0005_c4s1_000226_02.jpg",
           market_root / "query" / sorted(os.listdir(market_root / "query"))[0]]
    for b in bad:
        b.write_bytes(b"\xff\xd8 truncated")
    res = check_dataset("market1501", str(market_root), verify_images=True)
    found = sorted(b["image"] for b in corrupt_images(res))
    assert found == sorted(str(b) for b in bad)  # every bad file, not the first only
    assert res["gallery"]["verified"] == 2 and len(res["gallery"]["corrupt"]) == 1
    assert "corrupt (gallery): " in format_check(res)
    plain = check_dataset("market1501", str(market_root))
    assert not any("verified" in r for r in plain.values())
    assert "not decoded: --verify-images decodes every one" in format_check(plain)


def test_check_single_camera(tmp_path):
    (tmp_path / "data.csv").write_text("path,label,camid,split\n"
                                       "a.jpg,1,0,query\nb.jpg,1,0,gallery\nc.jpg,2,0,gallery\n")
    with pytest.raises(DatasetError, match="one camera"):
        check_dataset("reid_csv", str(tmp_path))


def test_check_no_query_id_in_gallery(tmp_path):
    (tmp_path / "data.csv").write_text("path,label,camid,split\n"
                                       "a.jpg,1,0,query\nb.jpg,2,1,gallery\n")
    with pytest.raises(DatasetError, match="no query identity appears in the gallery"):
        check_dataset("reid_csv", str(tmp_path))


def test_check_no_valid_match(tmp_path):
    (tmp_path / "data.csv").write_text("path,label,camid,split\n"
                                       "a.jpg,1,0,query\nb.jpg,1,0,gallery\nc.jpg,2,1,gallery\n")
    with pytest.raises(DatasetError, match="no query has a gallery image of its identity"):
        check_dataset("reid_csv", str(tmp_path))


def test_check_reid_csv_train_only(tmp_path):
    (tmp_path / "people.csv").write_text("path,label\na.jpg,5\nb.jpg,6\n")
    for name in ("a.jpg", "b.jpg"):
        write_bytes(str(tmp_path / name))
    res = check_dataset("reid_csv", str(tmp_path), csv_file="people.csv")
    assert res == {"train": {"images": 2, "ids": 2}}


def test_check_empty_split_named(tmp_path):
    write_bytes(str(tmp_path / "train" / "oak" / "1.jpg"))
    os.makedirs(tmp_path / "val" / "oak")
    with pytest.raises(DatasetError, match="imagefolder split 'val'.*empty"):
        check_dataset("imagefolder", str(tmp_path))
    assert check_dataset("imagefolder", str(tmp_path), splits=["train"]) == {
        "train": {"images": 1, "classes": 1}}


def test_check_msmt_version_mismatch(tmp_path):
    root = tmp_path / "MSMT17_V1"
    for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
    write_bytes(str(root / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg"))
    os.makedirs(root / "test")
    res = check_dataset("msmt17", str(root), splits=["train"])
    assert res["train"]["version"] == "MSMT17_V1"
    with pytest.raises(DatasetError, match="msmt17 split 'query'.*lists do not match"):
        check_dataset("msmt17", str(root))


def test_check_revisited(tmp_path, shared_data):
    root = tmp_path / "roxford5k"
    os.makedirs(root / "jpg")
    shutil.copy(shared_data / "revisitop" / "gnd_roxford5k.pkl", root)
    for split in ("query", "gallery"):  # every listed image exists (data check stats them)
        for s in registry.build_dataset("roxford5k", str(root), split).samples:
            write_bytes(s.path)
    res = check_dataset("roxford5k", str(root))
    assert res == {"query": {"images": 70, "cropped": True}, "gallery": {"images": 4993}}
    with pytest.warns(UserWarning):
        with pytest.raises(DatasetError, match="not cropped"):
            check_dataset("roxford5k", str(root), crop_queries=False)


class _BadLabels(ImageDataset):
    task = "classification"
    splits = ("train", "test")

    def load(self):
        n = 3 if self.split == "train" else 2
        return [Sample("x.jpg", n - 1 + (self.split == "train"))], [str(i) for i in range(n)]


def test_check_label_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._DATASETS, "bad_labels_test", _BadLabels)
    with pytest.raises(DatasetError, match=r"split 'train': sample 0 \(x.jpg\) has label 3 "
                                           r"outside 0..2"):
        check_dataset("bad_labels_test", str(tmp_path))


class _Mismatch(_BadLabels):
    def load(self):
        n = 3 if self.split == "train" else 2
        return [Sample("x.jpg", 0)], [str(i) for i in range(n)]


def test_check_class_lists_differ(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._DATASETS, "bad_lists_test", _Mismatch)
    with pytest.raises(DatasetError, match="different class lists"):
        check_dataset("bad_lists_test", str(tmp_path))


def test_check_unknown_dataset():
    with pytest.raises(DatasetError, match="closest names: market1501"):
        check_dataset("market1502", "/nonexistent")
