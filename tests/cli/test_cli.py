"""The `finegrain` command, in-process: train -> eval / predict / explain / data check."""

import json
import subprocess
import sys

import pytest

from finegrain.cli import main
from finegrain.data.synthetic import FGVCConfig, generate_cub
from finegrain.inference import predict
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

CFG = dict(num_classes=4, train_per_class=4, test_per_class=2, size=32, seed=0)
TINY = tiny_kwargs("vit_tiny_patch16_224")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    rc = main(["train", "--run-dir", str(tmp / "run"), "--trainer.max_epochs", "1",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
               "--model.model", model_arg("vit_tiny_patch16_224", TINY),
               "--data.val_split", "test",  # eval must equal training's last evaluation
               "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
               "--data.dataset_kwargs", json.dumps({"config": CFG}),
               "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"])
    assert rc == 0
    return tmp


def test_eval_prints_metrics_json(run, capsys):
    assert main(["eval", str(run / "run" / "last.ckpt"), "--json",
                 "--data.root", str(run / "cache"), "--data.num_workers", "0"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out)["metrics"]
    saved = json.load(open(run / "run" / "metrics.json"))["final"]
    assert res["top1"] == pytest.approx(saved["top1"]) and 0 <= res["top5"] <= 1


def test_predict_topk_names_and_probabilities(run, capsys):
    cub = generate_cub(str(run / "cache"), FGVCConfig(**CFG))
    img = next((run / "cache").rglob("*.jpg"))
    res = predict(str(run / "run" / "last.ckpt"), [str(img)], topk=3)
    top = res[0]["top"]
    assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]
    names = [ln.split(" ", 1)[1] for ln in open(f"{cub}/classes.txt").read().split("\n") if ln]
    assert all(t["class"] in names for t in top)
    assert main(["predict", str(run / "run" / "last.ckpt"), str(img), "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 2


def test_explain_writes_png(run, tmp_path):
    img = next((run / "cache").rglob("*.jpg"))
    out = tmp_path / "x.png"
    assert main(["explain", str(run / "run" / "last.ckpt"), str(img), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_data_check_json_and_bad_root(run, capsys, tmp_path):
    cub = generate_cub(str(run / "cache"), FGVCConfig(**CFG))
    assert main(["data", "check", "cub200", cub, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train"]["images"] == 16 and res["test"]["images"] == 8
    assert main(["data", "check", "cub200", str(tmp_path)]) != 0
    assert "images.txt" in capsys.readouterr().err


def test_unknown_model_names_closest(capsys):
    with pytest.raises(KeyError, match="vit_tiny_patch16_224"):
        import finegrain
        finegrain.create_model("vit_tiny_pach16_224")


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "finegrain", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("train", "eval", "predict", "explain", "data", "demo"):
        assert cmd in out


def test_library_calls_live_in_finegrain_inference():
    """The Python API offers the commands' calls; nothing imports upward from the CLI."""
    import pathlib
    import re

    import finegrain
    from finegrain import cli, inference
    for name in ("predict", "evaluate_checkpoint", "explain"):
        assert getattr(finegrain, name) is getattr(inference, name)
        assert name in finegrain.__all__ and not hasattr(cli, name)
    src = pathlib.Path(finegrain.__file__).parent
    upward = [str(p.relative_to(src)) for p in src.rglob("*.py")
              if p.name not in ("cli.py", "__main__.py")
              and re.search(r"from (\.+|finegrain\.)cli import", p.read_text())]
    assert upward == []
