"""Recipe cards (``finegrain.cards``): every recipe matches its method's card, the check fails
on each kind of mislabel, the docs tables are the cards', ``finegrain train`` prints the card,
and ``model.lr_batch`` turns the paper's lr rule into the rate of the real global batch."""

from __future__ import annotations

import glob
import os
from types import SimpleNamespace

import pytest

from finegrain.cards import (DOCS, METHODS, card_for, card_rows, check_recipe, docs_table,
                             format_card, load_card, recipe_labels, resolved_recipe)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))
MARKET = os.path.join(ROOT, "recipes", "dcal", "market1501_vit_base.yaml")
CUB = os.path.join(ROOT, "recipes", "dcal", "cub_deit_tiny.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_recipe_matches_its_card(path):
    assert check_recipe(path, resolved_recipe(path)) == []


def test_every_card_setting_has_a_source_and_every_method_a_card():
    assert len(RECIPES) == 56
    for method in METHODS:
        card = load_card(method)
        assert card["paper"] and card["models"] and card["protocols"], method
        for proto in card["protocols"].values():
            for key, spec in proto["settings"].items():
                assert spec.get("source"), (method, key)
                assert "paper" in spec, (method, key)  # null: the paper does not state it


def _variant(tmp_path, path, old, new):
    """A copy of ``path`` in ``tmp_path/<method>/`` with ``old`` replaced by ``new``."""
    folder = tmp_path / os.path.basename(os.path.dirname(path))
    folder.mkdir(exist_ok=True)
    text = open(path).read()
    assert old in text, old
    out = folder / os.path.basename(path)
    out.write_text(text.replace(old, new))
    return str(out)


@pytest.mark.parametrize("old,new,says", [
    # a setting that is not the paper's, unlabelled (the Re-ID "Paper recipe" of before)
    ("label_smoothing: 0.1  # ours: the TransReID / BoT baseline's value; the paper gives none",
     "label_smoothing: 0.1", "label_smoothing = 0.1 (not stated, not labelled"),
    # a value that leaves the paper without a label
    ("      momentum: 0.9\n", "      momentum: 0.8\n", "momentum = 0.8 (differs, not labelled"),
    # a hidden default: the Re-ID distractor left to the model default
    ("      pwca_partner: other_class  # ours:", "      #pwca_partner: other_class  # ours:",
     "pwca_partner = - (differs, not labelled"),
    # a comment that calls settings the paper's
    ("# Settings with their sources", "# Paper recipe: SGD ...\n# Settings with their sources",
     "Paper recipe"),
    # a key in no card row and unlabelled
    ("  num_instances: 4\n", "  num_instances: 4\n  color_jitter: 0.2\n",
     "data.color_jitter: set by the recipe, in no card row"),
])
def test_the_check_names_each_kind_of_mislabel(tmp_path, old, new, says):
    path = _variant(tmp_path, MARKET, old, new)
    problems = check_recipe(path, resolved_recipe(path))
    assert any(says in p for p in problems), problems


def test_the_fgvc_lr_written_for_one_batch_is_refused(tmp_path):
    # the lr of before: 1.5625e-5 fixed, right only for one process at batch 16
    path = _variant(tmp_path, CUB, "      lr: 0.0005\n", "      lr: 1.5625e-05\n")
    problems = check_recipe(path, resolved_recipe(path))
    assert any("model.optimizer.init_args.lr = 1.5625e-05 (differs" in p for p in problems)


def test_labels_of_a_flow_mapping_apply_to_each_of_its_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  optimizer:\n    init_args: {lr: 0.1, momentum: 0.0}  # ours: why\n"
                 "  scheduler: step\n  pretrained: null  # ours: other\n")
    assert recipe_labels(str(p)) == {"model.optimizer.init_args.lr": "why",
                                     "model.optimizer.init_args.momentum": "why",
                                     "model.pretrained": "other"}


def test_the_card_shows_a_command_line_override_that_leaves_the_paper():
    flat = resolved_recipe(MARKET)
    card, protocol = card_for(flat, MARKET)
    assert protocol == "reid"
    rows = {r["setting"]: r for r in card_rows(card, protocol, flat, recipe_labels(MARKET))}
    assert rows["model.optimizer.init_args.lr"]["status"] == "paper"
    assert rows["model.model.init_args.bnneck"]["status"].startswith("ours: BoT")
    flat["model.optimizer.init_args.lr"] = 0.01  # --model.optimizer.init_args.lr 0.01
    rows = {r["setting"]: r for r in card_rows(card, protocol, flat, recipe_labels(MARKET))}
    assert rows["model.optimizer.init_args.lr"]["status"] == "differs, not labelled"
    text = format_card(card, protocol, list(rows.values()))
    assert "model.optimizer.init_args.lr" in text and "[differs, not labelled]" in text


@pytest.mark.parametrize("method", METHODS)
def test_docs_tables_are_generated_from_the_cards(method):
    from finegrain.cards import BEGIN, END
    text = open(os.path.join(ROOT, DOCS[method])).read()
    between = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert between == "\n" + docs_table(method), \
        f"{DOCS[method]} is stale: run python -m finegrain.cards --write-docs"


def test_train_prints_the_card_of_its_recipe():
    from finegrain.engine.run import recipe_card_text, parse_config
    text = recipe_card_text(parse_config(["--config", MARKET]), MARKET)
    assert text.startswith("recipe card: DCAL (reid)")
    assert "model.model.init_args.pwca_partner" in text and "ours: a 16 x 4 batch" in text


# ---- lr_batch: the paper's rule on the real global batch ---------------------------------------
def _optimizer_lr(world: int, batch: int, accumulate: int, monkeypatch) -> list[float]:
    from lightning.pytorch.cli import instantiate_class

    import finegrain.engine.module as module_mod
    from finegrain import create_model
    from finegrain.engine.module import FinegrainModule
    from finegrain.models.tiny import tiny_kwargs
    model = create_model("dcal_deit_tiny_patch16_224", num_classes=4,
                         **tiny_kwargs("dcal_deit_tiny_patch16_224"), w_lr=1e-3)
    make = lambda params: instantiate_class(params, {  # noqa: E731
        "class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-4, "weight_decay": 0.05}})
    module = FinegrainModule(model, optimizer=make, lr_batch=512)
    module._trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate,
                                      datamodule=SimpleNamespace(batch_size=batch),
                                      is_global_zero=True)
    monkeypatch.setattr(module_mod, "planned_steps", lambda trainer: (10, 100))
    opt = module.configure_optimizers()["optimizer"]
    return sorted({g["lr"] for g in opt.param_groups})


def test_lr_batch_scales_the_rate_with_devices_batch_and_accumulation(monkeypatch, capsys):
    # one GPU at batch 16: the paper's 5e-4 / 512 x 16; the uncertainty weights keep w_lr
    assert _optimizer_lr(1, 16, 1, monkeypatch) == pytest.approx([1.5625e-5, 1e-3])
    # 4 GPUs x 16, accumulating 2: 128 images per step, 8x the one-GPU rate; w_lr stays
    assert _optimizer_lr(4, 16, 2, monkeypatch) == pytest.approx([1.25e-4, 1e-3])
    assert "lr 0.0005 x 128 / 512 = 0.000125" in capsys.readouterr().out
