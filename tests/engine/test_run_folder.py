"""A run folder rebuilds its run: ``config.yaml`` fed back with ``--config`` reproduces it,
``--resume RUN`` alone continues it, the run options are in ``train --help``, ``img_size`` is
linked from the data, and ``eval`` takes another dataset."""

import json
import os

import pytest
import yaml

from finegrain.cli import main
from finegrain.data.synthetic import FGVCConfig, generate_cub
from finegrain.engine import train
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

CFG = dict(num_classes=4, train_per_class=6, test_per_class=2, size=32, seed=0)
# the model's own img_size left out: it comes from --data.img_size
TINY = {k: v for k, v in tiny_kwargs("vit_tiny_patch16_224").items() if k != "img_size"}


def _argv(tmp, run_dir, epochs=2):
    return ["--run-dir", str(run_dir), "--trainer.max_epochs", str(epochs),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg("vit_tiny_patch16_224", TINY),
            "--model.optimizer.lr", "0.003",
            "--data.val_split", "test",  # the full training split: these test the run
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": CFG}),
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runfolder")
    train(_argv(tmp, tmp / "a"))
    return tmp


def _history(run_dir):
    return json.load(open(os.path.join(run_dir, "metrics.json")))["history"]


def test_config_yaml_holds_only_values_and_reproduces_the_run(run, tmp_path):
    text = (run / "a" / "config.yaml").read_text()
    assert "Unable to serialize" not in text
    cfg = yaml.safe_load(text)
    assert cfg["trainer"]["logger"] is None and cfg["trainer"]["callbacks"] is None
    assert cfg.get("ckpt_path") is None and cfg.get("run_dir") is None
    train(["--config", str(run / "a" / "config.yaml"), "--run-dir", str(tmp_path / "b")])
    a, b = _history(run / "a"), _history(tmp_path / "b")
    assert len(a) == 2 and a == b  # the same metrics, epoch by epoch


def test_print_config_is_valid_yaml(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(["--config", str(run / "a" / "config.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Unable to serialize" not in out
    model = yaml.safe_load(out)["model"]["model"]
    assert model["class_path"] == "finegrain.models.classifier.Classifier"
    assert model["init_args"]["backbone"] == "vit_tiny_patch16_224"


def test_resume_alone_continues_the_run(run, tmp_path):
    import shutil
    src = tmp_path / "a"
    shutil.copytree(run / "a", src)
    with pytest.warns(UserWarning, match=r"changed config: trainer\.max_epochs"):
        cli = train(["--resume", str(src), "--trainer.max_epochs", "3"])
    assert cli.trainer.global_step == 9 and cli.run_dir == str(src)
    assert [r["epoch"] for r in _history(src)] == [0, 1, 2]
    assert yaml.safe_load((src / "config.yaml").read_text())["trainer"]["max_epochs"] == 3


def test_resume_with_only_max_steps(tmp_path):
    # the case: `finegrain train --resume runs/X --trainer.max_steps 4`
    argv = _argv(tmp_path, tmp_path / "x", epochs=-1)
    train(argv + ["--trainer.max_steps", "2", "--checkpoint-every", "1"])
    cli = train(["--resume", str(tmp_path / "x"), "--trainer.max_steps", "4"])
    assert cli.trainer.global_step == 4


def test_resume_reads_a_config_yaml_of_the_previous_format(run, tmp_path):
    # older versions wrote placeholders for the logger / callback instances
    import shutil
    src = tmp_path / "a"
    shutil.copytree(run / "a", src)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["trainer"]["logger"] = ["Unable to serialize instance <CSVLogger object at 0x7f>"]
    cfg["trainer"]["default_root_dir"] = str(src)
    cfg["ckpt_path"] = None
    (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli = train(["--resume", str(src), "--trainer.max_epochs", "3"])
    assert cli.trainer.global_step == 9


def test_train_help_lists_the_run_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--resume", "--checkpoint-every", "--init-weights", "--run-dir"):
        assert flag in out, flag


def test_img_size_is_linked_from_the_data(run):
    meta = json.load(open(run / "a" / "model.json"))
    assert meta["model_kwargs"]["img_size"] == 32 and meta["img_size"] == 32
    assert yaml.safe_load(meta["model_config"])["init_args"]["img_size"] == 32


def test_checkpoint_stores_the_resolved_model_config_with_the_datas_num_classes(run):
    import torch

    from finegrain.models import load_model
    ck = torch.load(run / "a" / "best.ckpt", map_location="cpu", weights_only=True)
    meta = ck["finegrain_meta"]
    config = yaml.safe_load(meta["model_config"])
    assert config["class_path"] == "finegrain.models.classifier.Classifier"
    assert config["init_args"]["num_classes"] == 4  # linked from the data, not the default
    assert config["init_args"]["backbone"] == "vit_tiny_patch16_224"
    assert meta["model_name"] == "vit_tiny_patch16_224"
    assert "model" not in ck["hyper_parameters"] and "optimizer" not in ck["hyper_parameters"]
    model, _ = load_model(str(run / "a" / "best.ckpt"))
    assert model.head.out_features == 4
    run_cfg = yaml.safe_load(open(run / "a" / "config.yaml"))
    assert run_cfg["model"]["optimizer"]["init_args"]["lr"] == 0.003


def test_eval_on_another_dataset_drops_the_training_reader_arguments(run, capsys):
    # the same generated images, read as a real CUB-200-2011 tree by the cub200 reader
    root = generate_cub(str(run / "cache"), FGVCConfig(**CFG))
    assert main(["eval", str(run / "a" / "last.ckpt"), "--json", "--data.dataset", "cub200",
                 "--data.root", root, "--data.num_workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dataset"] == "cub200"
    assert res["metrics"]["top1"] == pytest.approx(_history(run / "a")[-1]["top1"])
