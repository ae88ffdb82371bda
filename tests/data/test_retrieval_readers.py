"""Landmark retrieval readers: Revisited Oxford / Paris on the real ground-truth pickles,
the R1M distractor list, GLDv2 (full and clean)."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

from finegrain.data import DatasetError, build_dataset, read_image
from finegrain.data.datasets.gldv2 import GLDv2
from finegrain.data.datasets.revisited import ROxford5k, RevisitOP1M, RParis6k
from .files import write_bytes


@pytest.fixture
def roxford_root(tmp_path, shared_data):
    root = tmp_path / "roxford5k"
    os.makedirs(root / "jpg")
    shutil.copy(shared_data / "revisitop" / "gnd_roxford5k.pkl", root)
    return root


@pytest.mark.parametrize("name,cls,n_db", [("roxford5k", ROxford5k, 4993),
                                           ("rparis6k", RParis6k, 6322)])
def test_revisited_real_gnd(tmp_path, shared_data, name, cls, n_db):
    root = tmp_path / name
    os.makedirs(root / "jpg")
    shutil.copy(shared_data / "revisitop" / f"gnd_{name}.pkl", root)
    gallery = build_dataset(name, str(root), "gallery")
    query = cls(str(root), "query")
    assert len(gallery) == n_db and len(query) == 70
    assert len(gallery.imlist) == n_db and len(query.qimlist) == 70 and len(query.gnd) == 70
    assert gallery.samples[0].path == str(root / "jpg" / (gallery.imlist[0] + ".jpg"))
    assert all(s.bbox is None for s in gallery.samples)
    for s, g, q in zip(query.samples, query.gnd, query.qimlist):
        assert s.bbox == tuple(float(v) for v in g["bbx"])
        assert s.extra["name"] == q
    assert set(query.gnd[0]) >= {"bbx", "easy", "hard", "junk"}


def test_revisited_query_crop_math(roxford_root):
    query = ROxford5k(str(roxford_root), "query")
    i = 0
    x1, y1, x2, y2 = query.gnd[i]["bbx"]  # [136.5, 34.1, 648.5, 955.7]
    h, w = int(y2) + 5, int(x2) + 5
    ramp = (torch.arange(h * w) % 251).reshape(1, h, w).expand(3, h, w).to(torch.uint8)
    write_bytes(query.samples[i].path, encode_jpeg(ramp.contiguous()).numpy().tobytes())
    full = read_image(query.samples[i].path)
    crop = query[i]["image"]
    r = [int(round(v)) for v in (x1, y1, x2, y2)]  # PIL's crop rounding
    assert crop.shape == (3, r[3] - r[1], r[2] - r[0]) == (3, 922, 512)
    assert torch.equal(crop, full[:, r[1]:r[3], r[0]:r[2]])
    gallery = ROxford5k(str(roxford_root), "gallery")
    write_bytes(gallery.samples[5].path)
    assert gallery[5]["image"].shape == (3, 8, 8)


def test_revisited_uncropped_warns(roxford_root):
    with pytest.warns(UserWarning, match="requires queries cropped"):
        q = ROxford5k(str(roxford_root), "query", crop_queries=False)
    assert q.samples[0].bbox is None and q.samples[0].extra["bbx"] == (136.5, 34.1, 648.5, 955.7)


def test_revisited_unsafe_pickle_rejected(tmp_path):
    root = tmp_path / "roxford5k"
    os.makedirs(root / "jpg")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(DatasetError, match="refuses to load global (posix|os).system"):
        ROxford5k(str(root), "gallery")


def test_revisited_missing_files(tmp_path, shared_data):
    root = tmp_path / "rparis6k"
    os.makedirs(root)
    with pytest.raises(DatasetError, match="gnd_rparis6k.pkl"):
        RParis6k(str(root), "query")
    shutil.copy(shared_data / "revisitop" / "gnd_rparis6k.pkl", root)
    with pytest.raises(DatasetError, match="jpg"):
        RParis6k(str(root), "query")


def test_revisitop1m(tmp_path):
    root = tmp_path / "revisitop1m"
    rels = ["0/00/00000a1b2c3d.jpg", "0/00/00000e4f5a6b.jpg", "f/ff/ffff01234567.jpg"]
    for r in rels:
        write_bytes(str(root / "jpg" / r))
    (root / "revisitop1m.txt").write_text("\n".join(rels) + "\n")
    ds = build_dataset("revisitop1m", str(root), "gallery")
    assert len(ds) == 3 and ds.samples[2].path == str(root / "jpg" / rels[2])
    assert ds[1]["image"].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="unknown split"):
        RevisitOP1M(str(root), "query")
    (root / "revisitop1m.txt").write_text("/etc/passwd\n")
    with pytest.raises(DatasetError, match="revisitop1m.txt line 1"):
        RevisitOP1M(str(root), "gallery")


# ---------------------------------------------------------------------------------- GLDv2

IDS = {"6e158a47eb2ca3f6": 142820, "202cd79556f30760": 104169, "3ad87684c99c06e1": 37914,
       "e7f70e9c61e66af3": 102140, "4072182eddd0100e": 142820}


@pytest.fixture
def gld_root(tmp_path):
    root = tmp_path / "gldv2"
    for i in IDS:
        write_bytes(str(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"))
    rows = "".join(f"{i},http://upload.wikimedia.org/x/{i}.jpg,{lid}\n" for i, lid in IDS.items())
    (root / "train.csv").write_text("id,url,landmark_id\n" + rows)
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n142820,6e158a47eb2ca3f6 4072182eddd0100e\n37914,3ad87684c99c06e1\n")
    return root


def test_gldv2_full_and_clean(gld_root):
    full = build_dataset("gldv2", str(gld_root), "train", subset="full")
    assert len(full) == 5 and full.classes == ["37914", "102140", "104169", "142820"]
    assert full.labels == [3, 2, 0, 1, 3]
    assert full.samples[0].path == str(gld_root / "train" / "6" / "e" / "1"
                                       / "6e158a47eb2ca3f6.jpg")
    clean = GLDv2(str(gld_root), "train")
    assert len(clean) == 3 and clean.labels == [1, 1, 0] and clean.classes == ["37914", "142820"]
    assert clean[2]["image"].shape == (3, 8, 8)


def test_gldv2_errors(gld_root):
    (gld_root / "train_clean.csv").write_text("landmark_id,images\nabc,6e158a47eb2ca3f6\n")
    with pytest.raises(DatasetError, match=r"train_clean.csv line 2: landmark_id 'abc'"):
        GLDv2(str(gld_root), "train")
    (gld_root / "train.csv").write_text("id,landmark_id\n")
    with pytest.raises(DatasetError, match=r"train.csv line 1: header"):
        GLDv2(str(gld_root), "train", subset="full")
    os.remove(gld_root / "train_clean.csv")
    with pytest.raises(DatasetError, match="train_clean.csv"):
        GLDv2(str(gld_root), "train")


# ---- query crop scale on the real ground truth (cirtorch / DELG convention) --------------
def _cirtorch_size(crop_h, crop_w, full, imsize):
    """cirtorch ImagesFromList: ``imresize(crop, imsize * max(crop.size) / imfullsize)`` with
    PIL's (<7) ``thumbnail``: int truncation, never enlarges. Returns (h, w)."""
    target = imsize * max(crop_w, crop_h) / full
    x, y = crop_w, crop_h
    if x > target:
        y, x = int(max(y * target / x, 1)), int(target)
    if y > target:
        x, y = int(max(x * target / y, 1)), int(target)
    return y, x


def _delg_size(crop_h, crop_w, full, max_image_size):
    """DELG extract_features.py + utils.ResizeImage: ``resize_factor = max(crop) / max(full)``,
    ``max_size = round(max_image_size * resize_factor)``, shrink only, rounded sides."""
    largest = max(crop_h, crop_w)
    m = int(round(max_image_size * largest / full))
    if largest <= m:
        return crop_h, crop_w
    s = m / largest
    return int(round(crop_h * s)), int(round(crop_w * s))


def _crop_hw(bbx):
    x1, y1, x2, y2 = (int(round(v)) for v in bbx)  # PIL's crop rounding
    return y2 - y1, x2 - x1


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
@pytest.mark.parametrize("size", [1024, 512])
def test_query_crop_scale_follows_cirtorch_and_delg_on_real_gnd(shared_data, name, size):
    """Every real query crop is scaled by its full image's factor: its size is within 1 px of
    cirtorch's and DELG's (rounding vs truncation), never its own longest side = size. The
    Oxford / Paris originals have a longest side of 1024 (bbx coordinates reach 1024)."""
    from finegrain.data.transforms import longest_side_size
    with open(shared_data / "revisitop" / f"gnd_{name}.pkl", "rb") as f:
        gnd = pickle.load(f)["gnd"]
    full = 1024
    before, after = [], []
    for g in gnd:
        h, w = _crop_hw(g["bbx"])
        got = longest_side_size(h, w, size, full)
        for ref in (_cirtorch_size(h, w, full, size), _delg_size(h, w, full, size)):
            assert abs(got[0] - ref[0]) <= 1 and abs(got[1] - ref[1]) <= 1, (g["bbx"], got, ref)
        db_factor = size / full  # the factor of every database image of that size
        before.append((size / max(h, w)) / db_factor)  # old: crop's own side -> size
        after.append((max(got) / max(h, w)) / db_factor)
    assert np.median(before) > 1.5 and max(before) > 4  # the old scale: crops enlarged
    np.testing.assert_allclose(after, 1.0, atol=1.0 / 100)  # same scale as the database


def test_query_crop_scale_on_generated_originals(roxford_root):
    """Queries of the real gnd, images generated at the original 1024 x 768 / 768 x 1024 size:
    the retrieval transform gives the cirtorch / DELG crop size, the database its own."""
    from finegrain.data.transforms import longest_side_size
    from finegrain.retrieval.extract import extract, retrieval_transform

    query = ROxford5k(str(roxford_root), "query",
                      transform=retrieval_transform(512, (0.5,) * 3, (0.5,) * 3))
    picked = [0, 7, 33]
    for i in picked:
        x1, y1, x2, y2 = query.gnd[i]["bbx"]
        H, W = (768, 1024) if x2 > 768 else (1024, 768)
        assert y2 <= H and x2 <= W
        img = torch.randint(0, 255, (3, H, W), dtype=torch.uint8)
        write_bytes(query.samples[i].path, encode_jpeg(img).numpy().tobytes())
    query.samples = [query.samples[i] for i in picked]
    shapes = []

    class Shapes(torch.nn.Module):
        def forward(self, x):
            shapes.extend([tuple(x.shape[-2:])] * len(x))
            return {"embedding": x.flatten(1)[:, :4] + 1.0}

    extract(Shapes(), query, batch_size=1, progress=False)
    for i, got in zip(picked, shapes):
        h, w = _crop_hw(query.gnd[i]["bbx"])
        assert got == longest_side_size(h, w, 512, 1024)
        ref = _cirtorch_size(h, w, 1024, 512)
        assert abs(got[0] - ref[0]) <= 1 and abs(got[1] - ref[1]) <= 1
        assert max(got) < 512  # the old convention gave the crop a longest side of 512
