"""Re-ID readers on tiny trees in the published layouts: Market-1501, DukeMTMC-reID, MSMT17
(V1 / V2), VeRi-776."""

import os

import pytest

from finegrain.data import DatasetError, build_dataset
from finegrain.data.datasets.market import DukeMTMCreID, Market1501
from finegrain.data.datasets.msmt import MSMT17
from finegrain.data.datasets.veri import VeRi776
from .files import JPEG_TALL, write_bytes, write_text as write


def write_jpg(path):
    write_bytes(path, JPEG_TALL)  # 8 x 4: a person crop's aspect


# ---------------------------------------------------------------------------- Market / Duke

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                           "0007_c3s1_000476_02.jpg", "1500_c6s4_001002_01.jpg"],
    "query": ["0003_c1s1_000551_00.jpg", "0005_c4s1_000201_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000576_01.jpg", "0005_c4s1_000226_02.jpg",
                          "0005_c5s2_000226_02.jpg", "0000_c1s1_000000_01.jpg",
                          "-1_c3s1_000026_01.jpg", "-1_c1s1_000031_04.jpg"],
}


@pytest.fixture
def market_root(tmp_path):
    root = tmp_path / "Market-1501-v15.09.15"
    for folder, names in MARKET.items():
        for n in names:
            write_jpg(str(root / folder / n))
    write(str(root / "bounding_box_test" / "Thumbs.db"), "x")
    return root


def test_market_splits(market_root):
    train = build_dataset("market1501", str(market_root), "train")
    query = Market1501(str(market_root), "query")
    gallery = Market1501(str(market_root), "gallery")
    assert (len(train), len(query), len(gallery)) == (4, 2, 4)  # two junk -1 dropped
    assert train.labels == [0, 0, 1, 2] and train.classes == ["2", "7", "1500"]
    assert [s.camid for s in train.samples] == [0, 1, 2, 5]
    assert query.labels == [3, 5]
    assert sorted(gallery.labels) == [0, 3, 5, 5]  # pid 0 distractor kept
    assert {s.camid for s in gallery.samples} == {0, 1, 3, 4}
    assert train.samples[0].path == str(market_root / "bounding_box_train"
                                        / "0002_c1s1_000451_03.jpg")
    item = query[1]
    assert item["image"].shape == (3, 8, 4) and item["label"] == 5 and item["camid"] == 3


def test_market_missing_folder(market_root):
    os.rename(market_root / "query", market_root / "queries")
    with pytest.raises(DatasetError, match="query"):
        Market1501(str(market_root), "train")


def test_market_bad_name(market_root):
    write_jpg(str(market_root / "query" / "holiday.jpg"))
    with pytest.raises(DatasetError, match="holiday.jpg.*grammar"):
        Market1501(str(market_root), "query")


def test_duke(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    for folder, names in {"bounding_box_train": ["0001_c2_f0046182.jpg", "0005_c8_f0000001.jpg"],
                          "query": ["0005_c2_f0046985.jpg"],
                          "bounding_box_test": ["0005_c5_f0051341.jpg",
                                                "0019_c1_f0058090.jpg"]}.items():
        for n in names:
            write_jpg(str(root / folder / n))
    train = build_dataset("dukemtmcreid", str(root), "train")
    assert train.labels == [0, 1] and [s.camid for s in train.samples] == [1, 7]
    assert DukeMTMCreID(str(root), "gallery").labels == [5, 19]
    write_jpg(str(root / "query" / "0005_c9_f0046985.jpg"))
    with pytest.raises(DatasetError, match="camera c9 outside 1..8"):
        DukeMTMCreID(str(root), "query")


# ---------------------------------------------------------------------------------- MSMT17

MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                       "0000/0000_001_05_0303morning_0016_1.jpg 0",
                       "0001/0001_000_15_0303noon_0001_0.jpg 1"],
    "list_val.txt": ["0002/0002_000_03_0303afternoon_0100_0.jpg 2"],
    "list_query.txt": ["0000/0000_000_02_0303morning_0861_0.jpg 0",
                       "0003/0003_001_07_0303noon_0862_1.jpg 3"],
    "list_gallery.txt": ["0000/0000_001_04_0303morning_0870_0.jpg 0",
                         "0003/0003_002_07_0303noon_0870_1.jpg 3",
                         "0004/0004_000_11_0303noon_0870_2.jpg 4"],
}


def make_msmt(root, version="MSMT17_V1"):
    train_dir, test_dir = {"MSMT17_V1": ("train", "test"),
                           "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}[version]
    for name, lines in MSMT_LISTS.items():
        write(str(root / name), "\n".join(lines) + "\n")
        d = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        for line in lines:
            write_jpg(str(root / d / line.split()[0]))
    return root


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt_versions(tmp_path, version):
    root = make_msmt(tmp_path / version, version)
    train = build_dataset("msmt17", str(root), "train")
    assert train.version == version
    assert len(train) == 4 and train.labels == [0, 0, 1, 2]
    assert [s.camid for s in train.samples] == [0, 4, 14, 2]
    assert len(MSMT17(str(root), "train", train_only=True)) == 3
    query = MSMT17(str(root), "query")
    gallery = MSMT17(str(root), "gallery")
    assert query.labels == [0, 3] and gallery.labels == [0, 3, 4]
    assert [s.camid for s in query.samples] == [1, 6]
    sub = "mask_test_v2" if version == "MSMT17_V2" else "test"
    assert gallery.samples[2].path == str(root / sub / "0004"
                                          / "0004_000_11_0303noon_0870_2.jpg")
    assert gallery[0]["image"].shape == (3, 8, 4)


def test_msmt_lists_do_not_match_folders(tmp_path):
    root = make_msmt(tmp_path / "MSMT17_V2", "MSMT17_V2")
    write(str(root / "list_gallery.txt"), "0009/0009_000_01_0303morning_0001_0.jpg 9\n")
    with pytest.raises(DatasetError, match=r"list_gallery.txt line 1: .*lists do not match "
                                           r"the image folders \(detected MSMT17_V2"):
        MSMT17(str(root), "gallery")


def test_msmt_no_folders_and_missing_list(tmp_path):
    root = make_msmt(tmp_path / "MSMT17_V1")
    os.rename(root / "train", root / "images")
    with pytest.raises(DatasetError, match="MSMT17_V1.*MSMT17_V2"):
        MSMT17(str(root), "query")
    os.remove(root / "list_val.txt")
    with pytest.raises(DatasetError, match="list_val.txt"):
        MSMT17(str(root), "query")


def test_msmt_bad_pid(tmp_path):
    root = make_msmt(tmp_path / "MSMT17_V1")
    write(str(root / "list_query.txt"), "0000/0000_000_02_0303morning_0861_0.jpg zero\n")
    with pytest.raises(DatasetError, match=r"list_query.txt line 1: pid 'zero'"):
        MSMT17(str(root), "query")


# ---------------------------------------------------------------------------------- VeRi

def test_veri(tmp_path):
    root = tmp_path / "VeRi"
    splits = {"train": ("image_train", ["0001_c001_00016450_0.jpg", "0001_c002_00016460_0.jpg",
                                        "0776_c020_00030600_1.jpg"]),
              "query": ("image_query", ["0002_c002_00030600_0.jpg"]),
              "test": ("image_test", ["0002_c003_00084270_1.jpg", "0002_c004_00084280_0.jpg"])}
    for key, (folder, names) in splits.items():
        for n in names:
            write_jpg(str(root / folder / n))
        write(str(root / f"name_{key}.txt"), "\n".join(names) + "\n")
    write_jpg(str(root / "image_test" / "0009_c009_00000000_0.jpg"))  # not in name_test.txt
    train = build_dataset("veri776", str(root), "train")
    assert train.labels == [0, 0, 1] and [s.camid for s in train.samples] == [0, 1, 19]
    gallery = VeRi776(str(root), "gallery")
    assert len(gallery) == 2 and gallery.labels == [2, 2]
    assert VeRi776(str(root), "query")[0]["camid"] == 1
    os.remove(root / "name_test.txt")  # without the list the folder is listed
    assert len(VeRi776(str(root), "gallery")) == 3
    write(str(root / "name_query.txt"), "car.jpg\n")
    with pytest.raises(DatasetError, match=r"name_query.txt line 1: 'car.jpg'"):
        VeRi776(str(root), "query")
