"""Extraction: size-grouped batches equal one-by-one forwards; multi-scale = mean of scales."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finegrain import create_model
from finegrain.data import build_dataset
from finegrain.data.synthetic_landmarks import LandmarksConfig, generate_landmarks
from finegrain.data.transforms import longest_side_size
from finegrain.models.tiny import tiny_kwargs
from finegrain.retrieval.extract import (embed_dataset, extract, model_mean_std,
                                         resolve_img_size, retrieval_transform, sample_names)

SMALL = LandmarksConfig(num_landmarks=3, queries_per_landmark=1, easy_per_landmark=2,
                        hard_per_landmark=2, junk_per_landmark=1, num_distractors=4,
                        train_per_landmark=2, extra_train=0)
# the shared tiny DALG at 64 px, the scale of the generated landmark images
TINY = {**tiny_kwargs("dalg_deit_tiny_patch16_224"), "num_classes": 4, "img_size": 64}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_landmarks(str(tmp_path_factory.mktemp("lm")), SMALL)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dalg_deit_tiny_patch16_224", **TINY).eval()


def _one_by_one(model, ds, scales):
    out = []
    for i in range(len(ds)):
        x = ds[i]["image"][None]
        acc = 0
        for s in scales:
            xs = x if s == 1 else F.interpolate(
                x, size=[int(x.shape[2] * s), int(x.shape[3] * s)], mode="bilinear",
                align_corners=False, antialias=s < 1)
            with torch.no_grad():
                acc = acc + model(xs)["embedding"][0]
        out.append(F.normalize(acc, dim=0).numpy())
    return np.stack(out)


@pytest.mark.parametrize("scales", [(1.0,), (0.7071, 1.0, 1.4142)])
def test_grouped_batches_equal_single_images(root, model, scales):
    mean, std = model_mean_std(model)
    ds = build_dataset("synthetic_landmarks", root, "gallery",
                       transform=retrieval_transform(48, mean, std))
    stats = {}
    got = extract(model, ds, scales=scales, batch_size=4, max_pending=6, progress=False,
                  stats=stats)
    ref = _one_by_one(model, ds, scales)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert got.shape == (len(ds), 16) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert stats["images"] == len(ds) and stats["images_per_s"] > 0
    assert stats["batches"] < len(ds)  # images of one size share a forward pass


def test_longest_side_and_preprocessing_record(root, model):
    vectors, names, labels, pre, ds = embed_dataset(model, "synthetic_landmarks", root, "query",
                                                    img_size=40, scales=(1.0,),
                                                    progress=False)
    crop, full = ds.load_image_and_full_size(0)
    assert max(crop.shape[1:]) < full  # a crop, scaled by its full image's factor 40 / full
    assert tuple(ds[0]["image"].shape[1:]) == longest_side_size(*crop.shape[1:], 40, full)
    assert max(ds[0]["image"].shape[1:]) < 40 and pre["crop_scale"] == "full_image"
    assert names == ds.qimlist and labels == [-1] * len(ds)
    assert pre["img_size"] == 40 and pre["scales"] == [1.0] and pre["crop_query_bbx"]
    assert pre["resize"] == "longest_side" and len(pre["mean"]) == 3
    assert sample_names(build_dataset("synthetic_landmarks", root, "train"))[0].startswith("train/")


def test_model_without_embedding_is_refused(root):
    class Classifier(torch.nn.Module):  # logits only, like a plain FGVC classifier
        def forward(self, x):
            return {"logits": x.mean((2, 3))}

    clf = Classifier()
    ds = build_dataset("synthetic_landmarks", root, "query",
                       transform=retrieval_transform(32, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ValueError, match="no 'embedding'"):
        extract(clf, ds, progress=False)


def test_img_size_defaults_to_the_training_size():
    from finegrain.meta import ModelMeta
    assert resolve_img_size(300, ModelMeta(img_size=64)) == 300
    assert resolve_img_size(None, ModelMeta(img_size=64)) == 64
    assert resolve_img_size(None, ModelMeta(img_size=(256, 128))) == 256
    assert resolve_img_size(None, None) == 512
    # the Revisited protocol's size (cirtorch / DELG: 1024) unless --img-size says otherwise
    assert resolve_img_size(None, ModelMeta(img_size=512), "roxford5k") == 1024
    assert resolve_img_size(512, ModelMeta(img_size=512), "rparis6k") == 512
    assert resolve_img_size(None, ModelMeta(img_size=64), "synthetic_landmarks") == 64


def test_skipped_image_drops_its_row_and_name_together(root, model, tmp_path):
    """on_error='skip': a corrupt image in the middle loses its row and its name; every
    other image keeps its own descriptor (no shift onto the next name)."""
    import shutil
    copy = tmp_path / "lm"
    shutil.copytree(root, copy)
    ref, names, _, _, _ = embed_dataset(model, "synthetic_landmarks", str(copy), "gallery",
                                        img_size=48, progress=False)
    bad = len(names) // 2
    with open(copy / "jpg" / f"{names[bad]}.jpg", "wb") as f:
        f.write(b"not a jpeg")
    stats = {}
    with pytest.warns(UserWarning, match="skipped"):
        got, got_names, labels, _, _ = embed_dataset(
            model, "synthetic_landmarks", str(copy), "gallery", img_size=48,
            on_error="skip", progress=False, batch_size=3, stats=stats)
    assert stats["skipped"] == [bad]
    assert got_names == names[:bad] + names[bad + 1:] and len(labels) == len(got_names)
    np.testing.assert_allclose(got, np.delete(ref, bad, axis=0), atol=1e-5)
    with pytest.raises(Exception, match="cannot decode"):  # the default still fails loudly
        embed_dataset(model, "synthetic_landmarks", str(copy), "gallery", img_size=48,
                      progress=False)
