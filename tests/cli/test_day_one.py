"""A first day with `finegrain`, in-process: train prints one line per evaluation and a
summary, warns about random weights, help shows every default, eval JSON carries its
provenance, compare tabulates runs, explain draws every image asked for."""

import argparse
import json
from pathlib import Path

import pytest

from finegrain.cli import build_parser, main
from finegrain.data.synthetic import FGVCConfig, generate_cub
from finegrain.engine.report import recipe_paper_number, recipe_pretrained
from finegrain.models.registry import model_arg
from finegrain.models.tiny import tiny_kwargs

NAME = "dcal_deit_tiny_patch16_224"
CFG = dict(num_classes=4, train_per_class=4, test_per_class=2, size=32, seed=0)
RECIPE = """# DCAL on a tiny generated set. Paper (FGVC table, top-1 %): baseline 90.8 -> DCAL 91.4;
#   this file targets 91.4 (twin: none).
# Pretrained (needed for the paper's number): --model.pretrained timm/deit_tiny_patch16_224.fb_in1k
#   (or a local file)
trainer:
  max_epochs: 2
model:
  model:
    class_path: finegrain.models.dcal.DCAL
    init_args: {{backbone: {backbone}}}
  pretrained: null
"""


def _train(tmp, seed: int) -> list[str]:
    return ["train", "--config", str(tmp / "tiny_dcal.yaml"),
            "--run-dir", str(tmp / f"run{seed}"), "--seed_everything", str(seed),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg(NAME, {**tiny_kwargs(NAME), "task": "classification"}),
            "--data.dataset", "synthetic_fgvc", "--data.root", str(tmp / "cache"),
            "--data.dataset_kwargs", json.dumps({"config": CFG}),
            "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"]


def test_train_prints_evaluations_summary_and_random_weights_warning(tmp_path, capsys, caplog):
    (tmp_path / "tiny_dcal.yaml").write_text(RECIPE.format(backbone=NAME[len("dcal_"):]))
    assert main(_train(tmp_path, 0)) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run0"
    assert f"run folder: {run}" in out.splitlines()[0] or f"run folder: {run}" in out
    evals = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(evals) == 2 and "val (%): top1" in evals[0] and evals[1].startswith("epoch 2/2")
    assert "best top1" in out and f"finegrain eval {run}/best.ckpt" in out
    assert f"finegrain explain {run}/best.ckpt" in out
    warn = caplog.text
    assert "RANDOM weights" in warn and "--model.pretrained FILE" in warn
    assert "timm/deit_tiny_patch16_224.fb_in1k" in warn and "91.4" in warn
    assert "litlogger" not in out + caplog.text
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["recipe"].endswith("tiny_dcal.yaml") and (run / "curves.png").is_file()


def test_recipe_notes_of_the_shipped_recipes():
    r = Path(__file__).resolve().parents[2] / "recipes"
    assert recipe_paper_number(str(r / "dcal/cub_vit_base.yaml")) == "91.4"
    assert recipe_paper_number(str(r / "dcal/market1501_vit_base.yaml")) == "87.5 / 94.7"
    assert recipe_paper_number(str(r / "tasn/cub_resnet50_224.yaml")) == "87.9"
    assert "orig_in21k" in recipe_pretrained(str(r / "dcal/cub_vit_base.yaml"))
    assert "resnet18" in recipe_pretrained(str(r / "tasn/cub_resnet50_224.yaml"))


OWN = ("eval", "predict", "explain", "demo", "compare")


def _subparsers(parser):
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            return act.choices
    return {}


@pytest.mark.parametrize("cmd", OWN + ("data check",))
def test_help_describes_every_option_and_shows_defaults(cmd, capsys):
    parser, _ = build_parser()
    sub = _subparsers(parser)
    for word in cmd.split()[1:]:
        sub = {**sub, cmd: _subparsers(sub[cmd.split()[0]])[word]}
    p = sub[cmd]
    for act in p._actions:
        if not isinstance(act, argparse._HelpAction):
            assert act.help, f"{cmd}: {act.dest} has no description"
    with pytest.raises(SystemExit) as e:
        main(cmd.split() + ["--help"])
    assert e.value.code == 0
    assert "(default:" in capsys.readouterr().out


def _two_runs(tmp):
    (tmp / "tiny_dcal.yaml").write_text(RECIPE.format(backbone=NAME[len("dcal_"):]))
    for seed in (0, 1):
        assert main(_train(tmp, seed)) == 0
    return tmp / "run0", tmp / "run1"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _two_runs(tmp_path_factory.mktemp("two"))


def test_eval_json_one_unit_and_provenance(two, capsys):
    run0, _ = two
    capsys.readouterr()
    assert main(["eval", str(run0 / "best.ckpt"), "--json", "--data.num_workers", "0",
                 "--data.root", str(run0.parent / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"].endswith("run0/best.ckpt") and res["dataset"] == "synthetic_fgvc"
    assert res["split"] == "test" and res["unit"] == "fraction"
    assert 0 <= res["metrics"]["top1"] <= 1
    saved = json.load(open(run0 / "metrics.json"))
    # best.ckpt is chosen on a held-out part of train; the test protocol is scored after fit
    assert saved["selected_on"].startswith("held-out 10% of the training images")
    assert saved["test"]["checkpoint"] == "best.ckpt"
    assert res["metrics"]["top1"] == pytest.approx(saved["test"]["top1"])
    assert res["selected_on"] == saved["selected_on"]
    capsys.readouterr()
    assert main(["eval", str(run0 / "best.ckpt"), "--json", "--data.num_workers", "0",
                 "--data.root", str(run0.parent / "cache"), "--data.val_split", "holdout"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert held["metrics"]["top1"] == pytest.approx(saved["best"]["top1"])
    assert main(["eval", str(run0 / "best.ckpt"), "--data.num_workers", "0",
                 "--data.root", str(run0.parent / "cache")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.split() == ["metric", "%"] for ln in lines)  # the header names the unit


def test_compare_two_runs_by_recipe_and_against_a_baseline(two, capsys):
    run0, run1 = two
    capsys.readouterr()
    assert main(["compare", str(run0), str(run1), "--group-by", "recipe", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    (row,) = res["rows"]
    vals = [json.load(open(r / "metrics.json"))["test"]["top1"] for r in (run0, run1)]
    assert row["group"] == "tiny_dcal" and row["n"] == 2 and row["paper"] == "91.4"
    assert row["mean"] == pytest.approx(sum(vals) / 2)
    assert row["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert main(["compare", str(run0), str(run1), "--baseline", str(run0), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | n | top1 (%) | evaluated on | paper (%) | vs ")
    assert "baseline" in table and "| test |" in table
    assert f"{100 * (vals[1] - vals[0]):+.2f}" in table
    assert main(["compare", str(run0), str(run1)]) == 0
    assert "91.4" in capsys.readouterr().out
    assert main(["compare", str(run0), "--baseline", "nowhere"]) == 2


def test_explain_draws_every_image_and_writes_inside_out_dir(two, tmp_path, capsys):
    run0, _ = two
    cub = generate_cub(str(run0.parent / "cache"), FGVCConfig(**CFG))
    imgs = [str(p) for p in sorted((run0.parent / "cache").rglob("*.jpg"))[:3]]
    a, b, c = imgs
    capsys.readouterr()
    out_dir = tmp_path / "pics"
    assert main(["explain", str(run0 / "best.ckpt"), a, c, "--pair", a, b,
                 "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out_dir / "explain.png"), str(out_dir / "explain_pair.png")]
    for p in printed:
        assert open(p, "rb").read(4) == b"\x89PNG"
    assert main(["explain", str(run0 / "best.ckpt"), a, "--out", str(tmp_path / "x.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "x.png")]
    assert cub


def test_curves_name_the_metric_not_val_score(tmp_path, monkeypatch):
    import matplotlib.figure

    from finegrain.visualize import plot_curves
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/mAP,val/R1,val/score\n0,5,2.0,,,\n"
                   "0,9,,0.5,0.6,0.5\n1,19,,0.7,0.8,0.7\n")
    seen = {}

    def savefig(fig, path, **kw):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["labels"] = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_curves(str(csv), str(tmp_path / "c.png"), primary="mAP")
    assert "mAP (best.ckpt)" in seen["labels"] and "R1" in seen["labels"]
    assert not any("score" in label for label in seen["labels"])
    assert "validation: mAP" in seen["titles"]
