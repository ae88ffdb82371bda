"""The data pipeline end to end: generated trees in the published layouts, read back by the
real readers; image errors named by path; per-task transform sizes (DESIGN.md); samplers that
shard across ranks and resume mid-epoch."""

import os
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from finegrain.data import DatasetError, build_dataset
from finegrain.data.samplers import PKBatchSampler, RandomBatchSampler, ShardSampler
from finegrain.data.synthetic import FGVCConfig, ReIDConfig, generate_cub, generate_market, render
from finegrain.data.transforms import build_transform

CUB = FGVCConfig(num_classes=4, train_per_class=3, test_per_class=2, size=32)
REID = ReIDConfig(num_train_ids=3, num_test_ids=2, num_cameras=2, images_per_camera=3,
                  height=32, width=16)


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


# ---- generator ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cub_tree(tmp_path_factory) -> str:
    return generate_cub(str(tmp_path_factory.mktemp("cache")), CUB)


def test_generator_is_deterministic(tmp_path, cub_tree):
    again = generate_cub(str(tmp_path / "b"), CUB)
    a, b = _files(cub_tree), _files(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".jpg")]) == 4 * (3 + 2)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"same config, different bytes: {diff[:3]}"
    other = _files(generate_cub(str(tmp_path / "c"), replace(CUB, seed=1)))
    assert sorted(other) != sorted(a) or any(other[k] != a[k] for k in a)


def test_render_is_a_function_of_the_rng():
    x1, box1 = render((0, 1, 2), np.random.default_rng([0, 1]), (48, 40))
    x2, box2 = render((0, 1, 2), np.random.default_rng([0, 1]), (48, 40))
    assert x1.shape == (48, 40, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and box1 == box2
    x3, _ = render((0, 1, 3), np.random.default_rng([0, 1]), (48, 40))  # only the tail differs
    assert not np.array_equal(x1, x3)


def test_synthetic_fgvc_read_by_cub_reader(tmp_path, cub_tree):
    root = os.path.dirname(os.path.dirname(cub_tree))  # the cache folder
    train = build_dataset("synthetic_fgvc", root, "train", config=CUB)
    test = build_dataset("synthetic_fgvc", root, "test", config=CUB)
    assert type(train).__name__ == "CUB200" and train.root == cub_tree
    assert len(train) == 4 * 3 and len(test) == 4 * 2
    assert train.num_classes == 4 and sorted(set(train.labels)) == [0, 1, 2, 3]
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8


def test_synthetic_reid_read_by_market_reader(tmp_path):
    sets = {s: build_dataset("synthetic_reid", str(tmp_path), s, config=REID)
            for s in ("train", "query", "gallery")}
    assert type(sets["train"]).__name__ == "Market1501"
    cams, per_cam = REID.num_cameras, REID.images_per_camera
    assert len(sets["train"]) == REID.num_train_ids * cams * per_cam
    assert sets["train"].num_classes == REID.num_train_ids
    assert sorted(set(sets["train"].labels)) == list(range(REID.num_train_ids))  # relabelled
    assert len(sets["query"]) == REID.num_test_ids * cams  # first image of each camera
    test_pids = set(range(REID.num_train_ids + 1, REID.num_train_ids + REID.num_test_ids + 1))
    assert set(sets["query"].labels) == test_pids  # raw pids
    gallery = Counter(sets["gallery"].labels)
    assert gallery.pop(0) == 2, "the two distractors (pid 0) stay in the gallery"
    assert -1 not in gallery, "junk (pid -1) is dropped"
    assert set(gallery) == test_pids
    assert sum(gallery.values()) == REID.num_test_ids * cams * (per_cam - 1)
    folder = generate_market(str(tmp_path), REID)  # cached: the same tree
    on_disk = os.listdir(os.path.join(folder, "bounding_box_test"))
    assert sum(n.startswith("-1_") for n in on_disk) == 2
    assert {s.camid for s in sets["gallery"].samples} == set(range(cams))


# ---- image errors -------------------------------------------------------------------------
@pytest.fixture
def cub_copy(tmp_path, cub_tree) -> str:
    dst = str(tmp_path / "CUB_200_2011")
    shutil.copytree(cub_tree, dst)
    return dst


def test_missing_image_named(cub_copy):
    ds = build_dataset("cub200", cub_copy, "train")
    os.remove(ds.samples[2].path)
    with pytest.raises(DatasetError, match="not found") as e:
        ds[2]
    assert ds.samples[2].path in str(e.value)


def test_corrupt_image_named_or_skipped(cub_copy):
    ds = build_dataset("cub200", cub_copy, "train")
    bad = ds.samples[1].path
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg" * 8)
    with pytest.raises(DatasetError, match="cannot decode") as e:
        ds[1]
    assert bad in str(e.value) and "on_error='skip'" in str(e.value)
    skip = build_dataset("cub200", cub_copy, "train", on_error="skip")
    item = skip[1]  # replaced by the next readable image, and counted
    assert skip.skipped == 1
    assert torch.equal(item["image"], skip[2]["image"]) and item["label"] == skip.samples[2].label
    assert skip[0]["image"].shape == (3, 32, 32) and skip.skipped == 1


def test_wrong_root_named(tmp_path):
    nowhere = str(tmp_path / "no_such_cub")
    with pytest.raises(DatasetError, match="does not exist") as e:
        build_dataset("cub200", nowhere, "train")
    assert nowhere in str(e.value)
    with pytest.raises(DatasetError, match="images.txt") as e:  # a folder, but not CUB
        build_dataset("cub200", str(tmp_path), "train")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DatasetError, match="bounding_box_train"):
        build_dataset("market1501", str(tmp_path), "query")


# ---- transforms (DESIGN.md: eval transforms per task) -------------------------------------
def _img(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("task,img_size,resize,shape_in,shape_out", [
    ("classification", 224, None, (300, 400), (224, 224)),   # resize 256 + centre crop 224
    ("classification", 448, 550, (500, 380), (448, 448)),    # the FGVC 550 -> 448 recipe
    ("reid", (256, 128), None, (100, 37), (256, 128)),       # plain resize, persons
    ("reid", (256, 256), None, (90, 160), (256, 256)),       # vehicles
    ("dml", 224, None, (300, 200), (224, 224)),              # resize 256 + centre crop 224
])
def test_transform_output_sizes(task, img_size, resize, shape_in, shape_out, train):
    tf = build_transform(task, train, img_size, resize)
    out = tf(_img(*shape_in))
    assert out.shape == (3, *shape_out) and out.dtype == torch.float32


@pytest.mark.parametrize("shape_in,shape_out", [((300, 200), (64, 43)), ((200, 300), (43, 64)),
                                                ((50, 50), (50, 50))])  # smaller: never enlarged
def test_retrieval_eval_keeps_aspect_ratio(shape_in, shape_out):
    out = build_transform("retrieval", False, 64)(_img(*shape_in))  # longest side S = 64
    assert out.shape == (3, *shape_out)


def test_eval_transforms_are_deterministic_and_normalised():
    img = _img(120, 90)
    for task, size in (("classification", 64), ("reid", (64, 32)), ("dml", 64)):
        tf = build_transform(task, False, size)
        a, b = tf(img), tf(img)
        assert torch.equal(a, b)
    flat = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    out = build_transform("classification", False, 32)(flat)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[:, 0, 0], expected)


# ---- samplers -----------------------------------------------------------------------------
LABELS = [i // 5 for i in range(40)]  # 8 identities x 5 images
LONG_LABELS = [i // 12 for i in range(96)]  # 8 identities x 12 images


def _epoch(sampler, epoch: int) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def test_pk_batches_hold_p_labels_k_each():
    labels = LABELS + [8, 8]  # a short identity (2 < K): padded by sampling with replacement
    s = PKBatchSampler(labels, batch_size=12, num_instances=3, seed=0)
    for epoch in range(3):
        batches = _epoch(s, epoch)
        assert batches and len(batches) == len(s)
        for b in batches:
            counts = Counter(labels[i] for i, _ in b)
            assert len(b) == 12 and len(counts) == 4 and set(counts.values()) == {3}, counts
    with pytest.raises(ValueError, match="multiple of num_instances"):
        PKBatchSampler(labels, batch_size=10, num_instances=3)
    with pytest.raises(ValueError, match="identities"):
        PKBatchSampler(LABELS, batch_size=40, num_instances=4)  # P = 10 > 8 identities


def test_epochs_differ_and_repeat_with_seed():
    a = RandomBatchSampler(40, 8, seed=3)
    e0, e1 = _epoch(a, 0), _epoch(a, 1)
    assert e0 != e1
    assert _epoch(RandomBatchSampler(40, 8, seed=3), 1) == e1
    assert _epoch(RandomBatchSampler(40, 8, seed=4), 1) != e1
    assert sorted(i for b in e0 for i, _ in b) == list(range(40))  # 40 // 8 full batches


@pytest.mark.parametrize("make", [
    lambda r, w: RandomBatchSampler(43, 4, seed=5, rank=r, world_size=w),
    lambda r, w: PKBatchSampler(LONG_LABELS, 8, 2, seed=5, rank=r, world_size=w),
], ids=["random", "pk"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_split_the_single_process_batches(make, world):
    whole = _epoch(make(0, 1), 2)  # batches (index, sample seed) of world_size 1
    shards = [_epoch(make(r, world), 2) for r in range(world)]
    n = len(whole) // world * world  # equal step counts on every rank
    assert n >= 2 * world
    assert {len(s) for s in shards} == {n // world}
    # rank r takes global batches r, r + world, ...: same indices, same augmentation seeds
    for r, shard in enumerate(shards):
        assert shard == whole[r:n:world]
    seen = [i for s in shards for b in s for i, _ in b]
    if isinstance(make(0, 1), RandomBatchSampler):  # a permutation: indices disjoint too
        assert len(seen) == len(set(seen))
    seeds = [sd for s in shards for b in s for _, sd in b]
    assert len(seeds) == len(set(seeds)), "every sample slot has its own augmentation seed"


@pytest.mark.parametrize("make", [
    lambda: RandomBatchSampler(40, 4, seed=1),
    lambda: PKBatchSampler(LONG_LABELS, 8, 2, seed=1, rank=1, world_size=2),
], ids=["random", "pk-rank1"])
def test_load_state_dict_skips_exactly_the_consumed_batches(make):
    full = _epoch(make(), 1)
    assert len(full) >= 5
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "consumed": 3})
    resumed.set_epoch(1)  # Lightning calls set_epoch at the epoch start: the skip survives
    rest = list(iter(resumed))
    assert rest == full[3:]
    assert resumed.state_dict() == {"epoch": 1, "consumed": len(full)}
    assert _epoch(resumed, 2) == _epoch(make(), 2)  # the next epoch starts from 0


def test_state_dict_mid_epoch_counts_the_batches_taken():
    s = RandomBatchSampler(40, 4, seed=1)
    s.set_epoch(1)
    it = iter(s)
    taken = [next(it) for _ in range(3)]
    state = s.state_dict()
    resumed = RandomBatchSampler(40, 4, seed=1)
    resumed.load_state_dict(state)
    assert taken + list(iter(resumed)) == _epoch(RandomBatchSampler(40, 4, seed=1), 1)


@pytest.mark.parametrize("n,world", [(10, 3), (7, 4), (2, 3), (12, 1)])
def test_shard_sampler_covers_each_index_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)), "every index exactly once, no padding"
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_pk_epochs_have_one_length():
    """Every epoch of the P x K sampler has the same number of batches (Lightning sizes its
    validation interval from the first epoch: a shorter epoch would skip validation)."""
    labels = [i // 4 for i in range(24)]  # 6 identities x 4 images, K = 2, P = 4
    s = PKBatchSampler(labels, batch_size=8, num_instances=2, seed=0)
    lengths = {len(_epoch(s, e)) for e in range(20)}
    assert lengths == {len(s)} == {3}
    for e in range(5):
        for b in _epoch(s, e):
            ys = [labels[i] for i, _ in b]
            assert len(set(ys)) == 4 and all(ys.count(y) == 2 for y in set(ys))
