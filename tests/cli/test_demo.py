"""The demo's design: paired arms that differ in one switch, pretraining classes disjoint from
every fine-tuning set, and the paired table / picture from given results (no training here)."""

import pytest

from finegrain import demo
from finegrain.data.synthetic import class_parts


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_ablation_arms_differ_from_their_counterpart_in_one_switch():
    for e in demo.demo_entries():
        for c in e.comparisons:
            assert c.method in e.arms and c.baseline in e.arms, (e.name, c)
            a, b = _flat(e.arms[c.method]), _flat(e.arms[c.baseline])
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if c.baseline == "baseline_long":  # equal compute: the headline pair, longer
                assert "trainer.max_epochs" in diff
                assert b["trainer.max_epochs"] > a["trainer.max_epochs"]
                d = _flat(e.arms["baseline"])
                assert [k for k in set(b) | set(d) if b.get(k) != d.get(k)] == \
                    ["trainer.max_epochs"]
            elif c.ablation and c.baseline != "baseline":  # one switch inside the method
                assert len(diff) == 1, (e.name, c.label, diff)
            else:  # against the baseline: the method's own switches, nothing else
                assert diff and all(k.startswith("model.model.") for k in diff), (e.name, diff)
            # same data, same pretrained family, same optimiser for every pair
            for k in ("data.dataset", "init_family", "model.optimizer.class_path",
                      "model.optimizer.init_args.lr"):
                assert a.get(k) == b.get(k), (e.name, c.label, k)
        assert set(e.ablation_arms) <= set(e.arms)


def test_pretraining_classes_are_disjoint_from_every_finetuning_set():
    pre = demo._PRETRAIN_CFG
    pre_parts = set(class_parts(pre["num_classes"], pre["seed"], pre["class_offset"]))
    used = set()
    for e in demo.demo_entries():
        for r in e.arms.values():
            cfg = r["data"].get("dataset_kwargs", {}).get("config")
            if r["data"]["dataset"] in ("synthetic_fgvc", "synthetic_dml"):
                used |= set(class_parts(cfg["num_classes"], cfg["seed"]))
            elif r["data"]["dataset"] == "synthetic_reid":
                n = cfg["num_train_ids"] + cfg["num_test_ids"]
                assert n <= demo._FINETUNE_POOL
                used |= set(class_parts(n, cfg["seed"]))
    assert used and not used & pre_parts
    # both pretraining runs classify the same disjoint classes
    recipes = demo.pretrain_recipes()
    assert {r["data"]["dataset_kwargs"]["config"]["class_offset"] for r in recipes.values()} == \
        {demo._FINETUNE_POOL}


def _runs(vals):
    return [{"top1": v, "run_dir": "x"} for v in vals]


def test_table_and_summary_from_paired_results(tmp_path):
    stats = demo._compare(_runs([0.60, 0.70, 0.65]), _runs([0.50, 0.62, 0.55]), ("top1",), 200)
    st = stats["top1"]
    assert st["n"] == 3 and st["wins"] == 3
    assert st["diff_mean"] == pytest.approx(0.0933333, abs=1e-6)
    assert st["binomial_se"] == pytest.approx((0.5566667 * 0.4433333 / 200) ** 0.5, rel=1e-4)
    rows = [{"name": "fgvc", "metrics": ["top1"], "n_test": 200, "comparisons": [
        {"label": "DCAL vs ViT", "stats": stats}]}]
    table = demo.format_table(rows, 3)
    line = next(ln for ln in table.splitlines() if ln.startswith("fgvc"))
    assert "+9.3 [" in line and " 3/3 " in line and "method" in line and "200" in line
    one = demo._compare(_runs([0.6]), _runs([0.5]), ("top1",), 200)
    assert "(1 seed)" in demo.format_table([{**rows[0], "comparisons": [
        {"label": "x", "stats": one}]}], 1)
    from finegrain.visualize import plot_paired_differences
    png = plot_paired_differences(rows, str(tmp_path / "summary.png"))
    assert png and (tmp_path / "summary.png").stat().st_size > 1000


def test_finished_runs_are_reused_only_for_the_same_recipe_and_seed(tmp_path):
    recipe = demo.demo_entries()[0].arms["method"]
    run = tmp_path / "fgvc-method-seed1"
    assert demo._write_recipe(recipe, str(run), 1) == f"{run}.recipe.yaml"  # beside the run
    assert not demo._finished(recipe, str(run), 1)  # fitting never ended
    run.mkdir()
    (run / "weights.safetensors").write_bytes(b"x")
    assert demo._finished(recipe, str(run), 1)
    assert not demo._finished(recipe, str(run), 2)  # another seed
    other = {**recipe, "model": {**recipe["model"], "lr": 1.0}}
    assert not demo._finished(other, str(run), 1)  # another recipe
