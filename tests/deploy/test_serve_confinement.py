"""``finegrain serve`` reads nothing outside its gallery root, whatever the index folder says.

An edited or foreign index can record names like ``/etc/passwd`` or ``../../etc/passwd``;
with no dataset field, the names are joined to the root. Such an index is refused at start,
naming the first bad entry, and no route ever returns a file outside the root (links followed).
"""

import json
import os
import shutil

import pytest
from fastapi.testclient import TestClient

from finegrain.api import Searcher
from finegrain.errors import InputError
from finegrain.retrieval.index import index_files
from finegrain.serve import create_app


def _edited_index(dalg_index, tmp_path, names: dict[int, str]):
    """A copy of the index whose ids.json names rows ``names`` differently, with the
    dataset field dropped (so names are resolved against the recorded root only)."""
    index = str(tmp_path / "edited.index")
    shutil.copytree(dalg_index["index"], index)
    ids_path = index_files(index)["ids.json"]
    with open(ids_path) as f:
        ids = json.load(f)
    for row, name in names.items():
        ids["names"][row] = name
    with open(ids_path, "w") as f:
        json.dump(ids, f)
    for fname in ("index.json", "descriptors.json"):
        path = index_files(index)[fname]
        with open(path) as f:
            meta = json.load(f)
        meta.pop("dataset", None)
        meta["root"] = dalg_index["photos"]
        with open(path, "w") as f:
            json.dump(meta, f)
    return index


@pytest.mark.parametrize("bad", ["/etc/hostname", "../../../../../../etc/passwd"])
def test_an_index_naming_files_outside_the_root_is_refused_at_start(dalg_index, tmp_path, bad):
    assert os.path.isfile(os.path.join(dalg_index["photos"], bad))  # the file is there
    index = _edited_index(dalg_index, tmp_path, {1: bad})
    with pytest.raises(InputError, match=r"gallery entry .*etc.* outside the gallery root"):
        create_app(index, model=dalg_index["checkpoint"])
    s = Searcher(index, model=dalg_index["checkpoint"])  # the Python API refuses as well
    with pytest.raises(InputError, match="outside the gallery root"):
        s.gallery_path(0)


def test_a_link_out_of_the_root_is_refused(dalg_index, tmp_path):
    photos = str(tmp_path / "photos")
    shutil.copytree(dalg_index["photos"], photos)
    os.symlink("/etc/passwd", os.path.join(photos, "trap.png"))
    index = _edited_index(dalg_index, tmp_path, {2: "trap.png"})
    with pytest.raises(InputError, match=r"'trap.png' resolves to /etc/passwd"):
        create_app(index, model=dalg_index["checkpoint"], gallery_root=photos)


def test_a_non_image_inside_the_root_is_not_served(dalg_index, tmp_path):
    photos = str(tmp_path / "photos")
    shutil.copytree(dalg_index["photos"], photos)
    with open(os.path.join(photos, "secret.txt"), "w") as f:
        f.write("not for the web")
    index = _edited_index(dalg_index, tmp_path, {3: "secret.txt"})
    with pytest.raises(InputError, match="not an image file"):
        create_app(index, model=dalg_index["checkpoint"], gallery_root=photos)


def test_the_untouched_index_serves_its_images_from_inside_the_root(dalg_index):
    client = TestClient(create_app(dalg_index["index"]))
    root = os.path.realpath(dalg_index["photos"])
    s = client.app.state.searcher
    for i in range(len(s)):
        assert os.path.realpath(s.require_path(i)).startswith(root + os.sep)
        r = client.get(f"/gallery/{i}")
        with open(s.require_path(i), "rb") as f:
            assert r.status_code == 200 and r.content == f.read()


def test_serve_prints_its_address_at_start(dalg_index):
    import subprocess
    import sys
    import urllib.request
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", dalg_index["index"],
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"finegrain serve: {dalg_index['index']} (8 images) at "
                               f"http://localhost:")
        url = line.split(" at ")[1].split()[0]
        for _ in range(100):
            try:
                with urllib.request.urlopen(url + "health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                import time
                time.sleep(0.1)
        else:
            raise AssertionError(f"{url} does not answer")
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_form_with_many_images_is_refused_not_answered_for_one(dalg_index):
    client = TestClient(create_app(dalg_index["index"]))
    files = []
    for p in dalg_index["files"][:3]:
        with open(p, "rb") as f:
            files.append(("image", (os.path.basename(p), f.read(), "image/png")))
    r = client.post("/search", files=files, data={"k": "2"})
    assert r.status_code == 400 and "holds 3 'image' files; send one image" in r.json()["detail"]
    r = client.post("/search", files=files[:1], data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
