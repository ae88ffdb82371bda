"""The error contract of every command: a problem the user can fix is one paragraph on stderr
naming the file / key / step and the fix, exit code 2, no traceback (``--debug`` or
FINEGRAIN_DEBUG=1 shows it); a bug keeps its traceback. Outputs that are NaN are refused, and
nothing a command refuses is written."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import finegrain
from finegrain import cli
from finegrain.cli import main
from finegrain.data.synthetic import FGVCConfig, generate_cub
from finegrain.errors import UnknownNameError
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

CFG = dict(num_classes=4, train_per_class=4, test_per_class=2, size=32, seed=0)
TINY = tiny_kwargs("vit_tiny_patch16_224")


def _train_argv(run_dir, cache, *extra):
    return ["train", "--run-dir", str(run_dir), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg("vit_tiny_patch16_224", TINY),
            "--data.dataset", "synthetic_fgvc", "--data.root", str(cache),
            "--data.dataset_kwargs", json.dumps({"config": CFG}),
            "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    assert main(_train_argv(tmp / "run", tmp / "cache")) == 0
    return tmp


def _error(capsys) -> str:
    """The one error paragraph on stderr (Lightning may log other lines there)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---- train --------------------------------------------------------------------------------
RECIPE_TYPO = """model:
  model:
    class_path: finegrain.models.dcal.DCAL
    init_args: {backbone: deit_tiny_patch16_224, task: classification, pcwa: false}
"""


def test_train_misspelled_model_argument_in_a_recipe_is_refused_naming_it(run, tmp_path,
                                                                          capsys):
    (tmp_path / "typo.yaml").write_text(RECIPE_TYPO)
    argv = _train_argv(tmp_path / "r", run / "cache")
    argv = [argv[0], "--config", str(tmp_path / "typo.yaml"),
            *[a for a in argv[1:] if not a.startswith(("--model.model", '{"class_path'))]]
    assert main(argv) == 2  # refused while parsing: nothing built or trained
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err  # one paragraph, not the usage
    assert "finegrain.models.dcal.DCAL has no argument 'pcwa'" in err
    assert "did you mean 'pwca'?" in err
    assert "run folder" not in out and not (tmp_path / "r").exists()


def test_train_unknown_model_class_is_refused_naming_it(run, tmp_path, capsys):
    argv = _train_argv(tmp_path / "r", run / "cache", "--model.model",
                       '{"class_path": "finegrain.models.dcal.DCALL"}')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "finegrain.models.dcal.DCALL" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_train_model_help_shows_the_typed_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model.model.help", "finegrain.models.dcal.DCAL"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for arg in ("--model.model.glca {true,false}", "--model.model.pwca {true,false}",
                "--model.model.backbone BACKBONE", "--model.model.glca_selection"):
        assert arg in out, arg
    assert "type: bool, default: True" in out  # typed, with the documented default
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for cls in ("classifier.Classifier", "dcal.DCAL", "tasn.TASN", "dalg.DALG",
                "cross_image.CrossImageDML"):
        assert f"finegrain.models.{cls}" in out, cls


def test_train_unknown_dataset_names_it(run, tmp_path, capsys):
    assert main(_train_argv(tmp_path / "r", run / "cache", "--data.dataset", "cub201")) == 2
    assert "unknown dataset 'cub201'" in _error(capsys)


def test_train_missing_root_names_it(tmp_path, capsys):
    argv = _train_argv(tmp_path / "r", "x", "--data.dataset", "cub200",
                       "--data.root", str(tmp_path / "nope"), "--data.dataset_kwargs", "{}")
    assert main(argv) == 2
    assert str(tmp_path / "nope") in _error(capsys)


def _corrupt_cache(run, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(run / "cache", cache)
    cub = generate_cub(str(cache), FGVCConfig(**CFG))
    img = sorted((tmp_path / "cache").rglob("*.jpg"))[0]
    img.write_bytes(b"not a jpeg")
    return cub, img


def test_train_corrupt_image_names_it(run, tmp_path, capsys):
    _, img = _corrupt_cache(run, tmp_path)
    assert main(_train_argv(tmp_path / "r", tmp_path / "cache")) == 2
    err = _error(capsys)
    assert str(img) in err and "on_error" in err


def test_train_nonfinite_loss_names_the_step(run, tmp_path, capsys):
    argv = _train_argv(tmp_path / "r", run / "cache", "--model.optimizer", "torch.optim.SGD",
                       "--model.optimizer.lr", "1e30",
                       "--model.optimizer.weight_decay", "0")
    assert main(argv) == 2
    err = _error(capsys)
    assert "non-finite loss at epoch 0 step" in err and "--resume" in err


def test_train_code_carrying_init_weights_refused(run, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "how": argparse_namespace()}, bad)
    assert main(_train_argv(tmp_path / "r", run / "cache", "--init-weights", str(bad))) == 2
    err = _error(capsys)
    assert str(bad) in err and "cannot be loaded safely" in err
    assert "weights_only" not in err and "will likely succeed" not in err


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)  # any class outside torch's allow-list


def test_train_resume_truncated_last_ckpt_names_the_file(run, tmp_path, capsys):
    shutil.copytree(run / "run", tmp_path / "run")
    last = tmp_path / "run" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    argv = _train_argv(tmp_path / "run", run / "cache")
    assert main(["train", "--resume", str(tmp_path / "run"), *argv[3:]]) == 2
    err = _error(capsys)
    assert str(last) in err and "truncated" in err and ".safetensors" not in err


def test_debug_flag_and_env_show_the_traceback(run, tmp_path, capsys, monkeypatch):
    argv = _train_argv(tmp_path / "r", run / "cache", "--data.dataset", "cub201")
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: unknown dataset" in err
    monkeypatch.setenv("FINEGRAIN_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(run, monkeypatch):
    def boom(a):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "_cmd_predict", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["predict", str(run / "run" / "last.ckpt"), "x.jpg"])


@pytest.mark.parametrize("raised", [KeyError("a missing key"), ValueError("a bad value")])
def test_builtin_errors_are_bugs_not_messages(run, monkeypatch, raised):
    """Only our own error types become one line: a KeyError / ValueError of a bug keeps its
    traceback (finegrain.errors' classes derive from them, not the other way round)."""
    def boom(a):
        raise raised
    monkeypatch.setattr(cli, "_cmd_predict", boom)
    with pytest.raises(type(raised)):
        main(["predict", str(run / "run" / "last.ckpt"), "x.jpg"])


def test_our_error_is_one_line_and_exit_code_2(run, monkeypatch, capsys):
    def refuse(a):
        raise UnknownNameError("no class 'x' in this checkpoint:\nuse one of a, b")
    monkeypatch.setattr(cli, "_cmd_predict", refuse)
    assert main(["predict", str(run / "run" / "last.ckpt"), "x.jpg"]) == 2
    assert _error(capsys) == "error: no class 'x' in this checkpoint: use one of a, b"


# ---- explain --pair on a model without a pair-wise map ---------------------------------------
@pytest.mark.parametrize("name", ["tasn_resnet18", "dalg_deit_tiny_patch16_224"])
def test_explain_pair_without_a_pairwise_map_is_one_line(name, tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = {**tiny_kwargs(name), "num_classes": 4}
    model = finegrain.create_model(name, **kwargs)
    task = "retrieval" if name.startswith("dalg") else "classification"
    meta = {"model_name": name, "model_kwargs": kwargs, "mean": [0.5] * 3, "std": [0.5] * 3,
            "img_size": 32, "task": task, "dataset": "images",
            "class_names": []}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta, "hyper_parameters": {"meta": meta}}, ckpt)
    img = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(img)
    out = tmp_path / "pics"
    assert main(["explain", str(ckpt), "--pair", str(img), str(img), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "--pair" in err and "pair-wise" in err and name in err
    assert not out.exists()  # nothing written
    # its own pictures are drawn (maps and, for TASN, the sampled images)
    assert main(["explain", str(ckpt), str(img), "--out", str(out)]) == 0
    assert (out / "explain.png").read_bytes()[:4] == b"\x89PNG"


# ---- weights that do not fit ---------------------------------------------------------------
def test_pretrained_of_another_architecture_stops_unless_not_strict(run, tmp_path, capsys):
    from safetensors.torch import save_file

    import finegrain
    other = finegrain.create_model("resnet18", num_classes=4, **tiny_kwargs("resnet18"))
    path = tmp_path / "resnet.safetensors"
    save_file({f"backbone.{k}" if not k.startswith("backbone.") else k: v.contiguous()
               for k, v in other.state_dict().items()}, str(path))
    assert main(_train_argv(tmp_path / "r", run / "cache", "--model.pretrained", str(path))) == 2
    err = _error(capsys)
    assert str(path) in err and "--model.pretrained_strict false" in err
    from finegrain.models.weights import LoadReport
    many = LoadReport(str(path), "backbone", missing=[f"blocks.{i}.w" for i in range(300)])
    assert len(str(many)) < 300 and "missing (300): blocks.0.w" in str(many)
    assert "... (292 more)" in str(many)  # counts and the first few, not 25 KB of names
    assert main(_train_argv(tmp_path / "r2", run / "cache", "--model.pretrained", str(path),
                            "--model.pretrained_strict", "false")) == 0


def test_train_unknown_backbone_names_the_closest(run, tmp_path, capsys):
    model = model_arg("vit_tiny_patch16_224", TINY).replace("vit_tiny_patch16_224", "resnet81")
    argv = _train_argv(tmp_path / "r", run / "cache")
    argv[argv.index("--model.model") + 1] = model
    assert main(argv) == 2
    err = _error(capsys)
    assert "backbone 'resnet81' is not a timm architecture (closest:" in err
    assert not (tmp_path / "r").exists()  # a failed start leaves no folder


# ---- eval / predict ------------------------------------------------------------------------
def test_eval_corrupt_image_in_a_worker_names_the_image(run, tmp_path, capsys):
    from finegrain.data import build_dataset
    cub, _ = _corrupt_cache(run, tmp_path)
    img = build_dataset("cub200", cub, "test").samples[0].path
    with open(img, "wb") as f:
        f.write(b"not a jpeg")
    rc = main(["eval", str(run / "run" / "last.ckpt"), "--data.root", str(tmp_path / "cache"),
               "--data.num_workers", "1", "--json"])
    assert rc == 2
    err = _error(capsys)
    assert "Caught" not in err and "worker" not in err
    assert f"cannot decode image {img}" in err


def _diverged(run, tmp_path):
    ck = torch.load(run / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    ck["state_dict"] = {k: v * 1e30 if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    path = tmp_path / "diverged.ckpt"
    torch.save(ck, path)
    return path


def test_predict_and_eval_refuse_nan_outputs_naming_the_checkpoint(run, tmp_path, capsys):
    ckpt = _diverged(run, tmp_path)
    img = next((run / "cache").rglob("*.jpg"))
    assert main(["predict", str(ckpt), str(img), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(ckpt) in captured.err and "NaN" in captured.err
    out = tmp_path / "m.json"
    assert main(["eval", str(ckpt), "--data.root", str(run / "cache"),
                 "--data.num_workers", "0", "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(ckpt) in err and "NaN" in err and not out.exists()


def test_predict_corrupt_image_names_it_without_training_advice(run, tmp_path, capsys):
    img = tmp_path / "x.jpg"
    img.write_bytes(b"not a jpeg")
    assert main(["predict", str(run / "run" / "last.ckpt"), str(img)]) == 2
    err = _error(capsys)
    assert str(img) in err and "on_error" not in err


def test_predict_on_a_reid_checkpoint_is_refused(run, tmp_path, capsys):
    ck = torch.load(run / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    ck["finegrain_meta"]["task"] = "reid"
    path = tmp_path / "reid.ckpt"
    torch.save(ck, path)
    img = next((run / "cache").rglob("*.jpg"))
    assert main(["predict", str(path), str(img)]) == 2
    assert "finegrain embed" in _error(capsys)


# ---- index ---------------------------------------------------------------------------------
def _descriptors(tmp_path, name, names):
    from finegrain.retrieval.descriptors import save_descriptors
    v = np.random.default_rng(0).standard_normal((len(names), 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    unique = [f"u{i}" for i in range(len(names))]
    save_descriptors(str(tmp_path / name), v, unique, "m", "h", {"size": 8})
    js = tmp_path / f"{name}.json"
    meta = json.loads(js.read_text())
    meta["names"] = list(names)  # what a hand-made or concatenated file may hold
    js.write_text(json.dumps(meta))
    return str(tmp_path / name)


def test_index_build_and_add_refuse_duplicate_names(tmp_path, capsys):
    dup = _descriptors(tmp_path, "dup", ["a.jpg", "b.jpg", "a.jpg", "b.jpg"])
    out = tmp_path / "gallery.index"
    assert main(["index", "build", dup, "--out", str(out)]) == 2
    err = _error(capsys)
    assert "'a.jpg' appears twice" in err and "dup" in err and not out.exists()
    ok = _descriptors(tmp_path, "ok", ["c.jpg", "d.jpg"])
    assert main(["index", "build", ok, "--out", str(out)]) == 0
    assert main(["index", "add", str(out), dup]) == 2
    assert "'a.jpg' appears twice" in _error(capsys)


# ---- data check ----------------------------------------------------------------------------
def test_data_check_stats_every_image_without_decoding(run, tmp_path, capsys):
    cub, img = _corrupt_cache(run, tmp_path)
    assert main(["data", "check", "cub200", cub]) == 0  # a corrupt file: only decoding sees it
    assert "not decoded: --verify-images decodes every one" in capsys.readouterr().out
    assert main(["data", "check", "cub200", cub, "--verify-images", "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)  # the report is printed, then the error
    assert [b["image"] for s in report.values() for b in s["corrupt"]] == [str(img)]
    assert str(img) in err and "1 image(s)" in err
    img.write_bytes(b"")
    assert main(["data", "check", "cub200", cub]) == 2
    err = _error(capsys)
    assert str(img) in err and "empty" in err
    os.remove(img)
    assert main(["data", "check", "cub200", cub]) == 2
    assert str(img) in _error(capsys)


# ---- smaller paths -------------------------------------------------------------------------
def test_best_ckpt_missing_points_to_last(run, tmp_path, capsys):
    shutil.copytree(run / "run", tmp_path / "run")
    os.remove(tmp_path / "run" / "best.ckpt")
    img = next((run / "cache").rglob("*.jpg"))
    assert main(["predict", str(tmp_path / "run" / "best.ckpt"), str(img)]) == 2
    assert str(tmp_path / "run" / "last.ckpt") in _error(capsys)


def test_offline_hub_tag_fails_fast_with_the_fix(run, tmp_path, capsys, monkeypatch):
    import socket
    import time

    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    argv = _train_argv(tmp_path / "r", run / "cache", "--model.pretrained",
                       "timm/vit_tiny_patch16_224.augreg_in21k")
    assert main(argv) == 2
    # fast = no retry loop: at most a couple of connection attempts (the wall-clock bound is
    # loose because a loaded CI machine is slow to build the run, not to give up)
    assert len(calls) <= 2, calls
    assert time.time() - t0 < 120
    assert "local file" in _error(capsys)


def test_csv_header_names_only_the_missing_column(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("path\na.jpg\n")
    assert main(["data", "check", "reid_csv", str(tmp_path)]) == 2
    err = _error(capsys)
    assert "lacks 'label'" in err and "lacks 'path'" not in err


def test_index_search_aqe_on_a_small_gallery_and_ivf_on_a_tiny_set(tmp_path, capsys):
    db = _descriptors(tmp_path, "db", ["a.jpg", "b.jpg", "c.jpg"])
    out = tmp_path / "g.index"
    assert main(["index", "build", db, "--kind", "IVF4096,Flat", "--out", str(out)]) == 2
    assert "--kind Flat" in _error(capsys)
    assert main(["index", "build", db, "--out", str(out)]) == 0
    assert main(["index", "search", str(out), db, "-k", "3", "--aqe"]) == 2
    assert "--aqe-n 3" in _error(capsys)


def test_eval_without_data_root_asks_for_it(run, tmp_path, capsys):
    ck = torch.load(run / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    ck["finegrain_meta"].update(dataset="cub200", dataset_kwargs={})
    path = tmp_path / "cub.ckpt"
    torch.save(ck, path)
    assert main(["eval", str(path)]) == 2
    assert "--data.root DIR" in _error(capsys)


def test_missing_extra_names_the_pip_extra(tmp_path, capsys, monkeypatch):
    """`finegrain serve` without the serve extra: one line naming `finegrain[serve]`, exit 2;
    the same for ONNX Runtime (the export extra)."""
    import sys

    from finegrain.errors import MissingDependencyError, require
    from finegrain.runtime import onnx_providers
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", str(tmp_path / "index")]) == 2
    err = _error(capsys)
    assert "fastapi is not installed" in err and "finegrain[serve]" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"finegrain\[export\]"):
        onnx_providers()
    assert require("json", "serve").dumps([1]) == "[1]"
