"""Serve in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium against ``finegrain serve`` on a demo-style retrieval
index (generated landmarks, a DALG checkpoint, ``retrieval_eval`` writing the gallery
descriptors as ``finegrain demo`` does, then ``index build``): upload, results appear, their
pictures load, the attention picture shows, a gallery pick searches, a bad file shows an error.

Without a browser the test tries ``apt-get install -y chromium chromium-driver`` once (as root,
where apt exists), else it is skipped with the reason (also shown as a warning)."""

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings

import pytest

from .helpers import run_retrieval

_INSTALL: dict = {}


def _find() -> tuple[str | None, str | None]:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    return browser, shutil.which("chromedriver")


def _install() -> str:
    """Try apt once per session (as root); returns what happened."""
    if "log" in _INSTALL:
        return _INSTALL["log"]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _INSTALL["log"] = "not root or no apt-get: install chromium and chromium-driver yourself"
        return _INSTALL["log"]
    cmd = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:  # empty package lists (fresh CI image): update, then again
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        _INSTALL["log"] = f"apt-get install exited {r.returncode}: {r.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        _INSTALL["log"] = "apt-get install timed out"
    return _INSTALL["log"]


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _find()
    if not (browser and chromedriver):
        log = _install()
        browser, chromedriver = _find()
        if not (browser and chromedriver):
            reason = (f"browser test skipped: chromium / chromedriver not found ({log}); "
                      f"`apt-get install chromium chromium-driver` runs it")
            warnings.warn(reason)
            pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1200,900"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """``finegrain serve`` (uvicorn, a free localhost port) on a demo-style index."""
    from finegrain.data import build_dataset
    from finegrain.data.synthetic_landmarks import LandmarksConfig, generate_landmarks
    from finegrain.retrieval.pipeline import ExtractOptions, PictureOptions, retrieval_eval
    from finegrain.serve import create_app

    from .helpers import DALG, write_checkpoint
    tmp = tmp_path_factory.mktemp("demo")
    root = generate_landmarks(str(tmp / "data"), LandmarksConfig(
        num_landmarks=3, queries_per_landmark=1, easy_per_landmark=2, hard_per_landmark=1,
        junk_per_landmark=1, num_distractors=3, train_per_landmark=2, extra_train=0))
    run = tmp / "dalg-method-seed0"
    run.mkdir()
    ck = write_checkpoint(run / "last.ckpt", DALG, "retrieval", model_kwargs={"img_size": 64})
    retrieval_eval(ck, "synthetic_landmarks", root, out=str(run),
                   extract=ExtractOptions(progress=False), picture=PictureOptions("none"))
    index = str(tmp / "gallery.index")
    assert run_retrieval(["index", "build", str(run / "gallery"), "--out", index]) == 0
    query = build_dataset("synthetic_landmarks", root, "query").samples[0].path
    with _serving(create_app(index, gallery_root=root)) as url:
        yield {"url": url, "query": query, "tmp": tmp}


@contextlib.contextmanager
def _serving(app):
    """``app`` served by uvicorn on a free localhost port, in a thread; yields its URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def zero_server(tmp_path_factory):
    """``finegrain serve`` on the zero-training index of ``test_zero_training`` (ImageNet
    EfficientNet-Lite0 weights, no training, views of real photos)."""
    from finegrain.cli import main
    from finegrain.serve import create_app

    from .test_zero_training import LITE0, make_views
    tmp = tmp_path_factory.mktemp("zero_browser")
    listing = make_views(str(tmp / "photos"))
    assert main(["init-model", "tf_efficientnet_lite0", "--pretrained", LITE0,
                 "--out", str(tmp / "lite0")]) == 0
    assert main(["embed", str(tmp / "lite0" / "weights.safetensors"), "--images", listing,
                 "--num-workers", "0", "--out", str(tmp / "db")]) == 0
    assert main(["index", "build", str(tmp / "db"), "--out", str(tmp / "photos.index")]) == 0
    with _serving(create_app(str(tmp / "photos.index"))) as url:
        yield {"url": url, "photos": tmp / "photos"}


def _loaded(driver, img) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && "
                                      "arguments[0].naturalWidth > 0", img))


def test_upload_results_pictures_gallery_pick_and_error(driver, demo_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, 60)
    driver.get(demo_server["url"])
    wait.until(lambda d: "images, model" in d.find_element(By.ID, "status").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) > 0)
    # upload: results appear with their scores and pictures, and the attention picture
    driver.find_element(By.ID, "file").send_keys(demo_server["query"])
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
    first = driver.find_element(By.CSS_SELECTOR, "#results li img")
    wait.until(lambda d: _loaded(d, first))
    assert "#1" in driver.find_element(By.CSS_SELECTOR, "#results .score").text
    attention = driver.find_element(By.ID, "attention")
    wait.until(lambda d: attention.is_displayed() and _loaded(d, attention))
    assert driver.find_element(By.ID, "query-name").text == \
        os.path.basename(demo_server["query"])
    # choosing a file starts a search at k = 10; k changed and Search clicked at once win
    driver.find_element(By.ID, "file").send_keys(demo_server["query"])
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 5)
    wait.until(lambda d: d.find_element(By.ID, "busy").get_attribute("hidden") is not None)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results li")) == 5
    assert driver.find_element(By.ID, "results-title").text == "Top 5 results"
    # a gallery image as the query: the file field no longer names the uploaded file
    pick = driver.find_elements(By.CSS_SELECTOR, "#gallery img")[2]
    name = pick.get_attribute("title")
    pick.click()
    wait.until(lambda d: d.find_element(By.ID, "query-name").text == name)
    assert driver.find_element(By.CSS_SELECTOR, "#results .name").text.startswith(name)
    assert driver.find_element(By.ID, "file").get_attribute("value") == ""
    # a bad file: the error is shown, the page keeps working
    bad = demo_server["tmp"] / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    error = driver.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed() and "not an image" in error.text)
    assert "400" in error.text
    driver.find_element(By.ID, "file").send_keys(demo_server["query"])
    wait.until(lambda d: not error.is_displayed())


def test_zero_training_search_in_the_browser(driver, zero_server):
    """A user with photos and no trained model: the page searches the zero-training index
    (a CNN: no attention picture, and no error for its absence)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, 60)
    driver.get(zero_server["url"])
    wait.until(lambda d: "70 images" in d.find_element(By.ID, "status").text)
    driver.find_element(By.ID, "file").send_keys(str(zero_server["photos"] / "chelsea_2.jpg"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
    names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert names[0].startswith("chelsea_2.jpg") and names[1].startswith("chelsea_")
    first = driver.find_element(By.CSS_SELECTOR, "#results li img")
    wait.until(lambda d: _loaded(d, first))
    assert not driver.find_element(By.ID, "error").is_displayed()
