"""Serve: the JSON API of ``finegrain serve`` (FastAPI TestClient): search by upload
and by gallery id, the gallery, pictures, every bad request answered with a clear 4xx while
the server keeps serving, concurrent uploads, and a read-only index folder."""

import hashlib
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from finegrain.api import Searcher
from finegrain.serve import create_app


@pytest.fixture(scope="module")
def searcher(dalg_index):
    return Searcher(dalg_index["index"])


@pytest.fixture(scope="module")
def client(dalg_index, searcher):
    return TestClient(create_app(dalg_index["index"], searcher=searcher))


def _file(path, ctype=None):
    ext = os.path.splitext(path)[1]
    with open(path, "rb") as f:
        data = f.read()
    return {"image": (os.path.basename(path), data,
                      ctype or ("image/png" if ext == ".png" else "image/jpeg"))}


def _png_header(width, height):
    """A PNG whose header says width x height (pixels never sent): a 'decompression bomb'."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _folder_state(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def test_health_and_schema(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == 8 and h["dim"] == 16
    assert h["explain"] and not h["explain_pair"] and h["k_max"] == 100
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/health", "/gallery/{gallery_id}", "/explain/pair"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "finegrain search" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_search_by_upload_and_by_gallery_id(client, dalg_index):
    r = client.post("/search", files=_file(dalg_index["files"][1]), data={"k": "3"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["query"] == "p01.png" and res["k"] == 3 and len(res["results"]) == 3
    top = res["results"][0]
    assert top["name"] == "shoes/p01.png" and top["score"] == pytest.approx(1, abs=1e-4)
    img = client.get(top["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == open(dalg_index["files"][1], "rb").read()
    r = client.post("/search", data={"gallery_id": str(top["id"]), "k": "2",
                                     "explain": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == top["id"]
    assert r.json()["attention"].startswith("data:image/png;base64,")
    g = client.get("/gallery", params={"offset": 2, "limit": 3}).json()
    assert g["count"] == 8 and len(g["items"]) == 3 and g["items"][0]["url"] == "/gallery/2"


@pytest.mark.parametrize("case", ["not_image", "truncated", "fifty_megapixels", "text_part",
                                  "json_body", "k_zero", "k_too_large", "unknown_id",
                                  "no_query", "both_queries", "empty_file"])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, dalg_index, case):
    good = _file(dalg_index["files"][0])
    png = good["image"][1] if good["image"][0].endswith(".png") else \
        _file(dalg_index["files"][1])["image"][1]
    req = {
        "not_image": dict(files={"image": ("cat.jpg", b"hello, not a picture", "image/jpeg")}),
        "truncated": dict(files={"image": ("cut.png", png[:len(png) // 2], "image/png")}),
        "fifty_megapixels": dict(files={"image": ("big.png", _png_header(8000, 6250),
                                                  "image/png")}),
        "text_part": dict(files={"image": ("notes.txt", b"hello", "text/plain")}),
        "json_body": dict(json={"k": 3}),
        "k_zero": dict(files=good, data={"k": "0"}),
        "k_too_large": dict(files=good, data={"k": "101"}),
        "unknown_id": dict(data={"gallery_id": "999"}),
        "no_query": dict(data={"k": "3"}),
        "both_queries": dict(files=good, data={"gallery_id": "1"}),
        "empty_file": dict(files={"image": ("e.png", b"", "image/png")}),
    }[case]
    want = {"not_image": 400, "truncated": 400, "fifty_megapixels": 413, "text_part": 415,
            "json_body": 415, "k_zero": 422, "k_too_large": 422, "unknown_id": 404,
            "no_query": 400, "both_queries": 400, "empty_file": 400}[case]
    r = client.post("/search", **req)
    assert r.status_code == want, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    if case == "fifty_megapixels":
        assert "50.0 megapixels" in detail
    if case.startswith("k_"):
        assert detail.startswith("k:")
    assert client.get("/health").status_code == 200
    assert client.post("/search", files=good, data={"k": "1"}).status_code == 200


def test_upload_and_pixel_limits_of_the_app(dalg_index, searcher):
    small = TestClient(create_app(dalg_index["index"], searcher=searcher, max_upload_mb=0.0005,
                                  max_pixels=100))
    f = _file(dalg_index["files"][1])  # a 40 x 40 PNG: 1600 pixels, over 100
    r = small.post("/search", files=f)
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]
    big = {"image": ("big.png", b"\x89PNG" + b"0" * 200_000, "image/png")}
    r = small.post("/search", files=big)
    assert r.status_code == 413 and "MB" in r.json()["detail"]
    assert small.get("/gallery/999").status_code == 404


def test_concurrent_uploads_all_answered_consistently(client, dalg_index):
    files = dalg_index["files"]
    want = {p: client.post("/search", files=_file(p), data={"k": "3"}).json()["results"]
            for p in files}

    def one(i):
        p = files[i % len(files)]
        r = client.post("/search", files=_file(p), data={"k": "3"})
        return p, r.status_code, r.json().get("results")

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(32)))
    assert all(code == 200 for _, code, _ in got)
    for p, _, results in got:
        assert [x["id"] for x in results] == [x["id"] for x in want[p]]


def test_index_folder_is_only_read(dalg_index, searcher):
    before = _folder_state(dalg_index["index"])
    c = TestClient(create_app(dalg_index["index"], searcher=searcher))
    for p in dalg_index["files"][:3]:
        assert c.post("/search", files=_file(p), data={"explain": "true"}).status_code == 200
    c.post("/search", files={"image": ("x.png", b"junk", "image/png")})
    assert _folder_state(dalg_index["index"]) == before


def test_pair_picture_for_a_reid_model(reid_index):
    c = TestClient(create_app(reid_index["index"]))
    assert c.get("/health").json()["explain_pair"] is True
    res = c.post("/search", files=_file(reid_index["files"][0]), data={"k": "3"}).json()
    r = c.post("/explain/pair", files=_file(reid_index["files"][0]),
               data={"result_id": str(res["results"][1]["id"])})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:4] == b"\x89PNG"
    r = c.post("/explain/pair", data={"gallery_id": "0", "result_id": "1"})
    assert r.status_code == 200
    assert c.post("/explain/pair", data={"gallery_id": "0", "result_id": "77"}
                  ).status_code == 404


def test_pair_picture_refused_for_a_model_without_pairs(client):
    r = client.post("/explain/pair", data={"gallery_id": "0", "result_id": "1"})
    assert r.status_code == 400 and "pair-wise" in r.json()["detail"]


def _drawn(monkeypatch):
    """What the next picture is drawn from: save_explain's images and title, captured."""
    import finegrain.visualize as vis
    seen = {}
    real = vis.save_explain

    def spy(images, maps, path, *a, **kw):
        seen.update(images=images, pair=kw.get("pair_images"), suptitle=kw.get("suptitle"))
        return real(images, maps, path, *a, **kw)
    monkeypatch.setattr(vis, "save_explain", spy)
    return seen


def test_pictures_are_drawn_on_the_searched_image(dalg_index, tmp_path, monkeypatch):
    from .helpers import write_photos
    query = write_photos(str(tmp_path), n=1, size=(40, 60), seed=3)[0]  # 2:3, not square
    c = TestClient(create_app(dalg_index["index"]))
    seen = _drawn(monkeypatch)
    res = c.post("/search", files=_file(query), data={"k": "3", "explain": "true"}).json()
    assert res["attention"].startswith("data:image/png")
    assert tuple(seen["images"].shape[-2:]) == (21, 32)  # longest side 32: the whole photo


def test_pair_picture_shows_the_listed_score(reid_index, tmp_path, monkeypatch):
    from .helpers import write_photos
    query = write_photos(str(tmp_path), n=1, size=(40, 60), seed=3)[0]
    c = TestClient(create_app(reid_index["index"]))
    seen = _drawn(monkeypatch)
    hit = c.post("/search", files=_file(query), data={"k": "3"}).json()["results"][1]
    r = c.post("/explain/pair", files=_file(query), data={"result_id": str(hit["id"])})
    assert r.status_code == 200
    # DCAL takes 32 x 32 only: the index records the fixed resize, and both images have it
    assert tuple(seen["images"].shape[-2:]) == tuple(seen["pair"].shape[-2:]) == (32, 32)
    assert f"score {hit['score']:.3f}" in seen["suptitle"]  # the list's number
