"""Retrieval test-time protocol on the commands a user runs: an image smaller than the eval
size is never enlarged unless asked (cirtorch's PIL ``thumbnail``, DELG's ``min_image_size -1``),
the choice is recorded and applied by search; exact ties rank by id (best score first) in
``index search`` as in ``retrieval eval``."""

import json

import numpy as np
import torch
from torchvision.io import encode_png

from finegrain import Searcher
from finegrain.data.transforms import RetrievalEval, longest_side_size
from finegrain.retrieval.descriptors import load_descriptors, save_descriptors
from finegrain.retrieval.extract import embed_batch
from finegrain.retrieval.search import blockwise_knn, knn

from .test_commands import _ckpt, main


def test_smaller_images_are_not_enlarged_unless_asked():
    assert longest_side_size(400, 600, 1024) == (400, 600)  # 600 x 400 at 1024 stays
    assert longest_side_size(400, 600, 1024, upscale=True) == (683, 1024)
    assert longest_side_size(768, 1024, 512) == (384, 512)  # larger images shrink as before
    # a query crop is scaled by its full image's factor, capped at 1 the same way
    assert longest_side_size(100, 200, 1024, full_size=600) == (100, 200)
    assert longest_side_size(100, 200, 1024, full_size=600, upscale=True) == (171, 341)
    img = torch.randint(0, 256, (3, 30, 45), dtype=torch.uint8)
    assert RetrievalEval(64)(img).shape == (3, 30, 45)
    assert RetrievalEval(64, upscale=True)(img).shape == (3, 43, 64)


def test_the_resize_is_pillows_bilinear_pixel_for_pixel():
    """A plain PIL client gets finegrain's pixels exactly, on every CPU (torch's uint8 kernel
    differs from Pillow by one grey level here and there, and between its AVX2 and default
    paths: this fails with it)."""
    from PIL import Image

    from finegrain.data.transforms import FixedSizeEval, LongestSide
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 301, 217), dtype=torch.uint8, generator=g)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    want = np.asarray(pil.resize((72, 100), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(LongestSide(100)(img).numpy(), want)
    want = np.asarray(pil.resize((32, 64), Image.BILINEAR)).transpose(2, 0, 1) / 255
    x = FixedSizeEval((64, 32), (0.0,) * 3, (1.0,) * 3)(img)
    np.testing.assert_allclose(x.numpy(), want, atol=1e-7)  # the whole image, squeezed
    assert torch.equal(LongestSide(400)(img), img)  # never enlarged, never resampled


def _photos(folder):
    """Two photos smaller than the eval size 64 (3:2 and 2:3) and one larger (4:3)."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    out = {}
    for name, (h, w) in {"small_wide": (30, 45), "small_tall": (45, 30),
                         "large": (96, 128)}.items():
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        (folder / f"{name}.png").write_bytes(encode_png(img).numpy().tobytes())
        out[f"{name}.png"] = img
    return out


def test_embed_records_the_choice_and_search_applies_it(tmp_path):
    ck, model = _ckpt(tmp_path / "m.ckpt", 0)
    model.eval()
    photos = _photos(tmp_path / "photos")
    for flag, upscale in (([], False), (["--upscale"], True)):
        name = "up" if upscale else "plain"
        assert main(["embed", ck, "--images", str(tmp_path / "photos"), "--img-size", "64",
                     "--out", str(tmp_path / name), *flag]) == 0
        d = load_descriptors(tmp_path / name)
        assert d.meta["preprocessing"]["upscale"] is upscale
        t = RetrievalEval(64, (0.5,) * 3, (0.5,) * 3, upscale=upscale)
        for row, n in enumerate(d.names):
            x = t(photos[n])
            assert max(x.shape[-2:]) == (64 if upscale or n == "large.png" else 45)
            ref = embed_batch(model, x[None], [1.0], amp=False)[0].numpy()
            np.testing.assert_allclose(d.vectors[row], ref, atol=1e-5)
        ix = str(tmp_path / f"{name}.index")
        assert main(["index", "build", str(tmp_path / name), "--kind", "Flat",
                     "--out", ix]) == 0
        searcher = Searcher(ix, model=ck)
        for n in photos:  # search embeds a photo as the index did: itself first, cosine 1
            hit = searcher.search(str(tmp_path / "photos" / n), k=1)[0].hits[0]
            assert hit.name == n and abs(hit.score - 1) < 1e-5
    small = [load_descriptors(tmp_path / n).names.index("small_wide.png") for n in ("plain",
                                                                                  "up")]
    cos = float(np.dot(load_descriptors(tmp_path / "plain").vectors[small[0]],
                       load_descriptors(tmp_path / "up").vectors[small[1]]))
    assert cos < 0.9999  # the two settings embed a small photo differently


def _tied(n=12, dim=8):
    """Queries and a database in which rows 2, 5, 6, 9 equal the first query (score 1 each)."""
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[[2, 7]].copy()
    db[[5, 6, 9]] = db[2]
    return q, db


def test_exact_ties_rank_by_id_in_search_and_in_eval():
    q, db = _tied()
    for k in (2, 3, 4, 12):  # a cut inside the tie keeps the smallest ids
        want = ([2, 5, 6, 9] + list(np.argsort(-(db @ q[0]), kind="stable")[4:]))[:k]
        _, faiss_ids = knn(q, db, k)
        _, eval_ids, _ = blockwise_knn(q, [db], k, block_size=5)
        assert list(faiss_ids[0]) == want, k
        assert list(eval_ids[0]) == want, k
        np.testing.assert_array_equal(faiss_ids, eval_ids)


def test_index_search_cli_orders_ties_as_retrieval_eval(tmp_path):
    q, db = _tied()
    pre = {"resize": "longest_side", "img_size": 64, "upscale": False, "scales": [1.0],
           "mean": [0.5] * 3, "std": [0.5] * 3}
    kw = dict(model_name="m", checkpoint_hash="h", preprocessing=pre)
    save_descriptors(tmp_path / "db", db, [f"im{i:02d}" for i in range(len(db))], **kw)
    save_descriptors(tmp_path / "q", q, ["q0", "q1"], **kw)
    ix = str(tmp_path / "db.index")
    assert main(["index", "build", str(tmp_path / "db"), "--kind", "Flat", "--out", ix]) == 0
    out = tmp_path / "res.json"
    assert main(["index", "search", ix, str(tmp_path / "q"), "-k", "3", "--out",
                 str(out)]) == 0
    got = json.loads(out.read_text())["queries"][0]["names"]
    _, ids, _ = blockwise_knn(q, [db], 3)
    assert got == [f"im{i:02d}" for i in ids[0]] == ["im02", "im05", "im06"]


def test_embed_images_skips_a_truncated_photo_when_asked(tmp_path, capsys):
    """One truncated JPEG among the photos: by default embed stops naming it and the fix;
    with --on-error skip it leaves that file out, name and row together, and lists it."""
    from torchvision.io import encode_jpeg
    ck, model = _ckpt(tmp_path / "m.ckpt", 0)
    photos = _photos(tmp_path / "photos")
    blob = encode_jpeg(photos["large.png"]).numpy().tobytes()
    (tmp_path / "photos" / "broken.jpg").write_bytes(blob[:len(blob) // 3])
    argv = ["embed", ck, "--images", str(tmp_path / "photos"), "--img-size", "64",
            "--num-workers", "0", "--out", str(tmp_path / "d")]
    from finegrain.cli import main as cli
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--on-error skip" in err
    assert main([*argv, "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable images (left out, name and row together): broken.jpg" in out
    d = load_descriptors(tmp_path / "d")
    assert sorted(d.names) == sorted(photos)  # the three readable photos, in their rows
    t = RetrievalEval(64, (0.5,) * 3, (0.5,) * 3)
    for row, n in enumerate(d.names):
        ref = embed_batch(model.eval(), t(photos[n])[None], [1.0], amp=False)[0].numpy()
        np.testing.assert_allclose(d.vectors[row], ref, atol=1e-5)


def test_embed_with_a_classifier_is_one_paragraph(tmp_path, capsys):
    """A plain classification checkpoint has no descriptor: one line, exit 2 (its teardown
    used to end in "AttributeError: 'dict' object has no attribute 'cpu'", the extraction
    module having replaced nn.Module's buffer table)."""
    from finegrain import create_model
    from finegrain.cli import main as cli
    from finegrain.models.tiny import tiny_kwargs
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, **tiny_kwargs("resnet18"))
    meta = {"model_name": "resnet18", "model_kwargs": {**tiny_kwargs("resnet18"),
                                                       "num_classes": 4},
            "mean": [0.5] * 3, "std": [0.5] * 3, "img_size": 32, "task": "classification",
            "class_names": list("abcd")}
    ck = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta}, ck)
    _photos(tmp_path / "photos")
    capsys.readouterr()
    assert cli(["embed", str(ck), "--images", str(tmp_path / "photos"), "--num-workers", "0",
                "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "returns no 'embedding'" in err
    assert "Traceback" not in err and "AttributeError" not in err
