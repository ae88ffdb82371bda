"""Fine-grained classification readers on tiny trees in the published formats: CUB-200-2011,
Stanford Cars (devkit .mat and Kaggle CSV), FGVC-Aircraft, NABirds, iNaturalist 2017."""

import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.io import encode_jpeg

from finegrain.data import DatasetError, build_dataset
from finegrain.data.datasets.aircraft import FGVCAircraft
from finegrain.data.datasets.cars import StanfordCars
from finegrain.data.datasets.cub import CUB200
from finegrain.data.datasets.inat import INat2017
from finegrain.data.datasets.nabirds import NABirds
from .files import write_bytes as write_jpg, write_text as write


# ---------------------------------------------------------------------------------- CUB

@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split, boxes = [], [], [], []
    for i in range(1, 10):
        c = (i - 1) % 3
        rel = f"{classes[c]}/{classes[c].split('.')[1]}_{i:04d}_{i}.jpg"
        write_jpg(str(root / "images" / rel))
        images.append(f"{i} {rel}")
        labels.append(f"{i} {c + 1}")
        split.append(f"{i} {int(i <= 6)}")
        boxes.append(f"{i} 1.0 2.0 4.0 3.0")
    write(str(root / "images.txt"), "\n".join(images) + "\n")
    write(str(root / "image_class_labels.txt"), "\n".join(labels) + "\n")
    write(str(root / "train_test_split.txt"), "\n".join(split) + "\n")
    write(str(root / "bounding_boxes.txt"), "\n".join(boxes) + "\n")
    write(str(root / "classes.txt"), "".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    return root


def test_cub_counts_labels_paths(cub_root):
    train = build_dataset("cub200", str(cub_root), "train")
    test = CUB200(str(cub_root), "test")
    assert (len(train), len(test)) == (6, 3)
    assert train.classes[0] == "001.Black_footed_Albatross" and train.num_classes == 3
    assert train.labels == [0, 1, 2, 0, 1, 2]
    assert train.samples[1].path == str(cub_root / "images" / "002.Laysan_Albatross"
                                        / "Laysan_Albatross_0002_2.jpg")
    assert train.samples[0].bbox is None and train.samples[0].extra["bbox"] == (1, 2, 5, 5)
    item = train[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.uint8
    assert item["label"] == 0


def test_cub_bbox_crop(cub_root):
    ds = CUB200(str(cub_root), "train", use_bbox=True)
    assert ds.samples[0].bbox == (1.0, 2.0, 5.0, 5.0)
    assert ds[0]["image"].shape == (3, 3, 4)


def test_cub_missing_file_named(cub_root):
    os.remove(cub_root / "image_class_labels.txt")
    with pytest.raises(DatasetError, match="image_class_labels.txt"):
        CUB200(str(cub_root), "train")


def test_cub_label_out_of_range_names_line(cub_root):
    p = cub_root / "image_class_labels.txt"
    lines = p.read_text().splitlines()
    lines[2] = "3 201"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt line 3: class_id 201"):
        CUB200(str(cub_root), "train")


def test_cub_non_integer_label(cub_root):
    p = cub_root / "image_class_labels.txt"
    p.write_text(p.read_text().replace("4 1\n", "4 one\n"))
    with pytest.raises(DatasetError, match=r"line 4: class_id 'one' is not an integer"):
        CUB200(str(cub_root), "test")


def test_cub_corrupt_image_raise_and_skip(cub_root):
    bad = CUB200(str(cub_root), "train").samples[0].path
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DatasetError, match=os.path.basename(bad)):
        CUB200(str(cub_root), "train")[0]
    ds = CUB200(str(cub_root), "train", on_error="skip")
    out = ds[0]
    assert ds.skipped == 1 and out["label"] == ds.samples[1].label


def test_cub_empty_split(cub_root):
    p = cub_root / "train_test_split.txt"
    p.write_text("".join(f"{i} 1\n" for i in range(1, 10)))
    with pytest.raises(DatasetError, match="empty"):
        CUB200(str(cub_root), "test")


# ---------------------------------------------------------------------------------- Cars

CAR_NAMES = [f"Make{k} Model {2000 + k % 13}" for k in range(1, 197)]
CAR_NAMES[3] = "Ram C/V Cargo Van Minivan 2012"


def _annos(rows):
    keys = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    arr = np.zeros((1, len(rows)), dtype=[(k, "O") for k in keys])
    for i, (x1, y1, x2, y2, c, f) in enumerate(rows):
        arr[0, i] = (np.array([[x1]], np.uint16), np.array([[y1]], np.uint16),
                     np.array([[x2]], np.uint16), np.array([[y2]], np.uint16),
                     np.array([[c]], np.uint8), np.array([f]))
    return {"annotations": arr}


CAR_TRAIN = [(1, 2, 6, 7, 1, "00001.jpg"), (2, 1, 8, 8, 4, "00002.jpg"),
             (1, 1, 5, 5, 99, "00003.jpg"), (1, 1, 8, 8, 196, "00004.jpg")]
CAR_TEST = [(1, 1, 8, 8, 4, "00001.jpg"), (1, 1, 8, 8, 120, "00002.jpg"),
            (3, 3, 6, 6, 98, "00003.jpg")]


@pytest.fixture
def cars_devkit(tmp_path):
    root = tmp_path / "stanford_cars"
    names = np.empty((1, 196), dtype=object)
    for k, n in enumerate(CAR_NAMES):
        names[0, k] = np.array([n])
    os.makedirs(root / "devkit")
    scipy.io.savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": names})
    scipy.io.savemat(str(root / "devkit" / "cars_train_annos.mat"), _annos(CAR_TRAIN))
    scipy.io.savemat(str(root / "cars_test_annos_withlabels.mat"), _annos(CAR_TEST))
    for r in CAR_TRAIN:
        write_jpg(str(root / "cars_train" / r[5]))
    for r in CAR_TEST:
        write_jpg(str(root / "cars_test" / r[5]))
    return root


@pytest.fixture
def cars_csv(tmp_path):
    root = tmp_path / "stanford-car-dataset-by-classes-folder"
    write(str(root / "names.csv"), "".join(n + "\n" for n in CAR_NAMES))
    for split, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        write(str(root / f"anno_{split}.csv"),
              "".join(f"{f},{x1},{y1},{x2},{y2},{c}\n" for x1, y1, x2, y2, c, f in rows))
        for *_, c, f in rows:
            folder = CAR_NAMES[c - 1].replace("/", "-")
            write_jpg(str(root / "car_data" / "car_data" / split / folder / f))
    return root


@pytest.mark.parametrize("layout", ["devkit", "csv"])
def test_cars_both_layouts(layout, cars_devkit, cars_csv):
    root = cars_devkit if layout == "devkit" else cars_csv
    train = build_dataset("cars196", str(root), "train")
    test = StanfordCars(str(root), "test")
    assert (len(train), len(test)) == (4, 3)
    assert train.num_classes == 196 and train.classes[3] == "Ram C/V Cargo Van Minivan 2012"
    assert train.labels == [0, 3, 98, 195] and test.labels == [3, 119, 97]
    assert train.samples[0].extra["bbox"] == (0, 1, 6, 7)
    assert os.path.basename(test.samples[2].path) == "00003.jpg"
    if layout == "devkit":
        assert train.samples[0].path == str(root / "cars_train" / "00001.jpg")
    else:
        assert "Ram C-V Cargo Van Minivan 2012" in train.samples[1].path
    assert test[1]["image"].shape == (3, 8, 8)
    cropped = StanfordCars(str(root), "train", use_bbox=True)
    assert cropped[0]["image"].shape == (3, 6, 6)


def test_cars_missing_test_labels(cars_devkit):
    os.remove(cars_devkit / "cars_test_annos_withlabels.mat")
    with pytest.raises(DatasetError, match="cars_test_annos_withlabels.mat"):
        StanfordCars(str(cars_devkit), "train")


def test_cars_unlabelled_test_annos(cars_devkit):
    d = _annos(CAR_TEST)["annotations"]
    keys = [k for k in d.dtype.names if k != "class"]
    arr = np.zeros(d.shape, dtype=[(k, "O") for k in keys])
    for k in keys:
        arr[k] = d[k]
    scipy.io.savemat(str(cars_devkit / "cars_test_annos_withlabels.mat"), {"annotations": arr})
    with pytest.raises(DatasetError, match="no field 'class'"):
        StanfordCars(str(cars_devkit), "test")


def test_cars_csv_bad_class(cars_csv):
    p = cars_csv / "anno_test.csv"
    lines = p.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",197"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"anno_test.csv line 2: class 197 outside 1..196"):
        StanfordCars(str(cars_csv), "test")


def test_cars_no_layout(tmp_path):
    with pytest.raises(DatasetError, match="anno_train.csv"):
        StanfordCars(str(tmp_path), "train")


# ---------------------------------------------------------------------------------- Aircraft

@pytest.fixture
def aircraft_root(tmp_path):
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    variants = ["707-320", "Cessna 172", "F/A-18"]
    write(str(data / "variants.txt"), "\n".join(variants) + "\n")
    lists = {"train": [("0034309", "707-320"), ("0056978", "F/A-18")],
             "val": [("1025794", "Cessna 172")],
             "test": [("0062781", "Cessna 172"), ("2230470", "F/A-18"), ("1000123", "707-320")]}
    lists["trainval"] = lists["train"] + lists["val"]
    for name, rows in lists.items():
        write(str(data / f"images_variant_{name}.txt"), "".join(f"{i} {v}\n" for i, v in rows))
        for i, _ in rows:
            write_jpg(str(data / "images" / f"{i}.jpg"))
    big = encode_jpeg(torch.zeros((3, 40, 30), dtype=torch.uint8)).numpy().tobytes()
    write_jpg(str(data / "images" / "0034309.jpg"), big)
    return root


def test_aircraft_splits(aircraft_root):
    train = build_dataset("aircraft", str(aircraft_root), "train")
    val = FGVCAircraft(str(aircraft_root), "val")
    test = FGVCAircraft(str(aircraft_root), "test")
    assert (len(train), len(val), len(test)) == (3, 1, 3)
    assert train.classes == ["707-320", "Cessna 172", "F/A-18"]
    assert train.labels == [0, 2, 1] and test.labels == [1, 2, 0]
    assert train.samples[0].path == str(aircraft_root / "data" / "images" / "0034309.jpg")
    only = FGVCAircraft(str(aircraft_root), "train", train_list="train")
    assert len(only) == 2
    assert train[0]["image"].shape == (3, 40, 30)
    banner = FGVCAircraft(str(aircraft_root), "train", crop_banner=True)
    assert banner[0]["image"].shape == (3, 20, 30)


def test_aircraft_unknown_variant(aircraft_root):
    p = aircraft_root / "data" / "images_variant_test.txt"
    p.write_text(p.read_text() + "0000001 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_test.txt line 4: variant 'Boeing 999'"):
        FGVCAircraft(str(aircraft_root), "test")


def test_aircraft_missing_list(aircraft_root):
    os.remove(aircraft_root / "data" / "images_variant_trainval.txt")
    with pytest.raises(DatasetError, match="images_variant_trainval.txt"):
        FGVCAircraft(str(aircraft_root), "train")


# ---------------------------------------------------------------------------------- NABirds

@pytest.fixture
def nabirds_root(tmp_path):
    root = tmp_path / "nabirds"
    classes = {0: "Birds", 22: "Perching Birds", 295: "Oak Titmouse",
               817: "Tufted Titmouse", 1010: "Western Tanager (Adult Male)"}
    used = [295, 817, 1010, 817]
    images, labels, split, boxes = [], [], [], []
    for k, c in enumerate(used):
        uid = f"0000139e-21dc-4d0c-bfe1-4cae3c85c8{k:02d}"
        rel = f"{c:04d}/{uid.replace('-', '')}.jpg"
        write_jpg(str(root / "images" / rel))
        images.append(f"{uid} {rel}")
        labels.append(f"{uid} {c}")
        split.append(f"{uid} {int(k % 2 == 0)}")
        boxes.append(f"{uid} 1 1 4 5")
    write(str(root / "images.txt"), "\n".join(images) + "\n")
    write(str(root / "image_class_labels.txt"), "\n".join(labels) + "\n")
    write(str(root / "train_test_split.txt"), "\n".join(split) + "\n")
    write(str(root / "bounding_boxes.txt"), "\n".join(boxes) + "\n")
    write(str(root / "classes.txt"), "".join(f"{k} {v}\n" for k, v in classes.items()))
    return root


def test_nabirds_remap(nabirds_root):
    train = build_dataset("nabirds", str(nabirds_root), "train")
    test = NABirds(str(nabirds_root), "test")
    assert train.classes == ["Oak Titmouse", "Tufted Titmouse", "Western Tanager (Adult Male)"]
    assert train.labels == [0, 2] and test.labels == [1, 1]
    assert test.samples[0].extra["class_id"] == 817
    assert NABirds(str(nabirds_root), "train", use_bbox=True)[0]["image"].shape == (3, 5, 4)


def test_nabirds_unknown_class(nabirds_root):
    p = nabirds_root / "image_class_labels.txt"
    p.write_text(p.read_text().replace(" 295\n", " 296\n"))
    with pytest.raises(DatasetError, match=r"image_class_labels.txt line 1: class_id 296"):
        NABirds(str(nabirds_root), "train")


# ---------------------------------------------------------------------------------- iNat2017

@pytest.fixture
def inat_root(tmp_path):
    root = tmp_path / "inat2017"
    cats = [{"id": 0, "name": "Abies concolor", "supercategory": "Plantae"},
            {"id": 1, "name": "Aix sponsa", "supercategory": "Aves"},
            {"id": 2, "name": "Zalophus", "supercategory": "Mammalia"}]
    for name, cids in (("train2017.json", [0, 1, 2, 1]), ("val2017.json", [2, 0])):
        images, anns = [], []
        for k, c in enumerate(cids):
            fn = f"train_val_images/{cats[c]['supercategory']}/{cats[c]['name']}/{name[:3]}{k}.jpg"
            write_jpg(str(root / fn))
            images.append({"id": 100 + k, "file_name": fn, "width": 8, "height": 8})
            anns.append({"id": k, "image_id": 100 + k, "category_id": c})
        write(str(root / name), json.dumps({"images": images, "annotations": anns,
                                            "categories": cats}))
    return root


def test_inat_train_test(inat_root):
    train = build_dataset("inat2017", str(inat_root), "train")
    test = INat2017(str(inat_root), "test")
    assert (len(train), len(test)) == (4, 2)
    assert train.labels == [0, 1, 2, 1] and test.labels == [2, 0]
    assert train.classes == ["Abies concolor", "Aix sponsa", "Zalophus"]
    assert test.samples[1].path.endswith("train_val_images/Plantae/Abies concolor/val1.jpg")
    assert test[0]["image"].shape == (3, 8, 8)


def test_inat_errors(inat_root):
    os.remove(inat_root / "val2017.json")
    with pytest.raises(DatasetError, match="val2017.json"):
        INat2017(str(inat_root), "train")
    (inat_root / "val2017.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid json"):
        INat2017(str(inat_root), "test")
