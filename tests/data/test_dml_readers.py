"""DML readers: SOP, In-Shop, and the class-disjoint CUB / Cars splits."""

import os

import numpy as np
import pytest
import scipy.io

from finegrain.data import DatasetError, build_dataset
from finegrain.data.datasets.dml_splits import Cars196DML, CUB200DML
from finegrain.data.datasets.sop import InShop, StanfordOnlineProducts
from .files import write_bytes as write_jpg, write_text as write


# ---------------------------------------------------------------------------------- SOP

@pytest.fixture
def sop_root(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    train = [(1, 1, 1, "bicycle_final/111085122871_0.JPG"),
             (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
             (3, 7, 2, "cabinet_final/111186235601_0.JPG")]
    test = [(59552, 11319, 1, "bicycle_final/111265328556_0.JPG"),
            (59553, 11320, 12, "toaster_final/111263855361_0.JPG"),
            (59554, 11319, 1, "bicycle_final/111265328556_1.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        write(str(root / name), "image_id class_id super_class_id path\n"
              + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rows))
        for *_, p in rows:
            write_jpg(str(root / p))
    return root


def test_sop(sop_root):
    train = build_dataset("sop", str(sop_root), "train")
    test = StanfordOnlineProducts(str(sop_root), "test")
    assert train.task == "dml"
    assert train.labels == [0, 0, 1] and train.classes == ["1", "7"]
    assert test.labels == [0, 1, 0] and test.classes == ["11319", "11320"]
    assert test.samples[1].extra["super_class_id"] == 12
    assert train.samples[2].path == str(sop_root / "cabinet_final" / "111186235601_0.JPG")
    assert test[0]["image"].shape == (3, 8, 8)


def test_sop_bad_line(sop_root):
    p = sop_root / "Ebay_test.txt"
    p.write_text(p.read_text() + "59555 x 1 a/b.JPG\n")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt line 5: class_id 'x'"):
        StanfordOnlineProducts(str(sop_root), "test")


# ---------------------------------------------------------------------------------- In-Shop

@pytest.fixture
def inshop_root(tmp_path):
    root = tmp_path / "InShop"
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
            ("img/WOMEN/Skirts/id_00000001/02_1_front.jpg", "id_00000001", "query"),
            ("img/WOMEN/Skirts/id_00000001/02_3_back.jpg", "id_00000001", "gallery"),
            ("img/MEN/Shirts/id_00000007/01_1_front.jpg", "id_00000007", "gallery"),
            ("img/MEN/Shirts/id_00000009/01_1_front.jpg", "id_00000009", "query")]
    write(str(root / "Eval" / "list_eval_partition.txt"),
          f"{len(rows)}\nimage_name item_id evaluation_status\n"
          + "".join(f"{a}   {b}   {c}\n" for a, b, c in rows))
    for p, *_ in rows:
        write_jpg(str(root / "Img" / p))
    return root


def test_inshop(inshop_root):
    train = build_dataset("inshop", str(inshop_root), "train")
    query = InShop(str(inshop_root), "query")
    gallery = InShop(str(inshop_root), "gallery")
    assert (len(train), len(query), len(gallery)) == (3, 2, 2)
    assert train.labels == [0, 0, 1] and train.classes == ["id_00000002", "id_00000080"]
    assert query.classes == gallery.classes == ["id_00000001", "id_00000007", "id_00000009"]
    assert query.labels == [0, 2] and gallery.labels == [0, 1]
    assert query.samples[0].path == str(inshop_root / "Img" / "img" / "WOMEN" / "Skirts"
                                        / "id_00000001" / "02_1_front.jpg")
    assert gallery[1]["image"].shape == (3, 8, 8)


def test_inshop_truncated(inshop_root):
    p = inshop_root / "Eval" / "list_eval_partition.txt"
    p.write_text("\n".join(p.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: announces 7 images but lists 6"):
        InShop(str(inshop_root), "train")


# ---------------------------------------------------------------------------- CUB / Cars DML

@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = [f"{k:03d}.Bird_{k}" for k in range(1, 201)]
    images, labels, split = [], [], []
    for i, c in enumerate([1, 100, 101, 200, 1, 150], start=1):
        rel = f"{classes[c - 1]}/Bird_{c}_{i:04d}.jpg"
        write_jpg(str(root / "images" / rel))
        images.append(f"{i} {rel}")
        labels.append(f"{i} {c}")
        split.append(f"{i} {i % 2}")  # the classification split is ignored
    write(str(root / "images.txt"), "\n".join(images) + "\n")
    write(str(root / "image_class_labels.txt"), "\n".join(labels) + "\n")
    write(str(root / "train_test_split.txt"), "\n".join(split) + "\n")
    write(str(root / "classes.txt"), "".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    return root


def test_cub_dml(cub_root):
    train = build_dataset("cub200_dml", str(cub_root), "train")
    test = CUB200DML(str(cub_root), "test")
    assert train.task == "dml" and len(train.classes) == len(test.classes) == 100
    assert train.labels == [0, 99, 0]
    assert test.labels == [0, 99, 49]  # classes 101, 200, 150 relabelled from 0
    assert test.classes[0] == "101.Bird_101"
    assert test.samples[1].extra["class_index"] == 199
    assert test[0]["image"].shape == (3, 8, 8)


def test_cars_dml(tmp_path):
    root = tmp_path / "stanford_cars"
    names = np.empty((1, 196), dtype=object)
    for k in range(196):
        names[0, k] = np.array([f"Car {k + 1}"])
    keys = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    os.makedirs(root / "devkit")
    scipy.io.savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": names})
    for mat, folder, cls in (("devkit/cars_train_annos.mat", "cars_train", [1, 98, 99]),
                             ("cars_test_annos_withlabels.mat", "cars_test", [196, 50])):
        arr = np.zeros((1, len(cls)), dtype=[(k, "O") for k in keys])
        for i, c in enumerate(cls):
            f = f"{i + 1:05d}.jpg"
            arr[0, i] = (np.array([[1]]), np.array([[1]]), np.array([[8]]), np.array([[8]]),
                         np.array([[c]]), np.array([f]))
            write_jpg(str(root / folder / f))
        scipy.io.savemat(str(root / mat), {"annotations": arr})
    train = build_dataset("cars196_dml", str(root), "train")
    test = Cars196DML(str(root), "test")
    assert train.labels == [0, 97, 49] and test.labels == [0, 97]
    assert test.classes[0] == "Car 99" and len(train.classes) == 98
    with pytest.raises(DatasetError, match="anno_train.csv"):
        Cars196DML(str(tmp_path), "train")
