"""What a run tells its user: one line per evaluation, the end-of-run summary, the warning
for a recipe trained from random weights, and ``finegrain compare`` over run folders.

Numbers are fractions in [0, 1] everywhere in files (DESIGN.md); the lines printed here show
percentages and say so. A recipe's comment header is read for two things only: the weights
its paper number needs (the ``# Pretrained ...`` line) and that number (``this file targets
91.4``, ``this file reproduces the baseline 90.8``, ``Target: TASN 87.9``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

import yaml

__all__ = ["recipe_header", "recipe_pretrained", "recipe_paper_number", "random_init_warning",
           "percent", "format_eval_line", "format_summary", "read_run", "compare_runs",
           "SEED_KEYS", "format_compare", "find_runs"]


# ---- recipes ------------------------------------------------------------------------------
def recipe_header(path: str | None) -> list[str]:
    """The leading ``#`` comment lines of a recipe (without ``#``); [] when unreadable."""
    if not path or not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                if line.strip():
                    break
                continue
            out.append(line[1:].rstrip())
    return out


def recipe_pretrained(path: str | None) -> str | None:
    """The recipe's ``# Pretrained ...`` note with its indented continuation lines."""
    lines = recipe_header(path)
    for i, ln in enumerate(lines):
        if re.match(r"\s*Pretrained", ln):
            note = [ln.strip()]
            for nxt in lines[i + 1:]:
                if not nxt.startswith("   "):
                    break
                note.append(nxt.strip())
            return " ".join(note)
    return None


def recipe_paper_number(path: str | None) -> str | None:
    """The paper's number a recipe aims at, as written (``91.4``, ``87.5 / 94.7``), in %."""
    text = "\n".join(recipe_header(path))
    m = re.search(r"this file (?:targets|reproduces the baseline) ([\d.]+(?: / [\d.]+)?)", text)
    if m is None:
        m = re.search(r"Target: \S+ ([\d.]+)", text)
    return m.group(1) if m else None


def random_init_warning(model_name: str, recipe: str | None,
                        pretrained_note: str | None = None) -> str:
    """The loud warning for a run that starts from random weights; ``pretrained_note``: the
    model's (:attr:`FinegrainModel.pretrained_note`), used when the recipe names none."""
    note = recipe_pretrained(recipe)
    used = note or (f"the papers start from {pretrained_note}" if pretrained_note else None)
    paper = recipe_paper_number(recipe)
    lines = ["!" * 78,
             f"WARNING: training {model_name} from RANDOM weights (model.pretrained is null).",
             "  Pass --model.pretrained FILE (a local .safetensors / .pth / .npz, or a Hub tag "
             "on a machine with internet), or --init-weights FILE."]
    if paper:
        lines.append(f"  The recipe's paper number ({paper}) needs pretrained weights.")
    if used:
        lines.append(f"  {used}")
    lines.append("!" * 78)
    return "\n".join(lines)


# ---- lines printed during and after training ----------------------------------------------
def percent(v: Any) -> str:
    """A fraction as a percentage with two decimals (other numbers as they are)."""
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) and 0 <= v <= 1 else f"{v:.4g}"


def format_eval_line(row: dict, primary: str, best: dict | None, max_epochs: int | None) -> str:
    """``epoch 3/24  step 120  val (%): mAP 64.40  R1 70.00 ...  | best mAP 65.00 @ epoch 2``
    (epochs counted from 1)."""
    ep = f"epoch {row['epoch'] + 1}" + (f"/{max_epochs}" if max_epochs and max_epochs > 0
                                         else "")
    keys = [primary] + [k for k in row if k not in ("epoch", "step", primary)]
    vals = "  ".join(f"{k} {percent(row[k])}" for k in keys
                     if isinstance(row.get(k), (int, float)) and not isinstance(row[k], bool))
    line = f"{ep}  step {row['step']}  val (%): {vals}"
    if best is not None and primary in best:
        line += f"  | best {primary} {percent(best[primary])} @ epoch {best['epoch'] + 1}"
    return line


def format_summary(run_dir: str, primary: str, best: dict | None, final: dict | None,
                   task: str, data_root: str | None, explainable: bool,
                   learned: dict[str, float] | None = None) -> str:
    """End of training: the best metric and its epoch, the scalars the model learned (DCAL's
    uncertainty weights), the run folder, the next commands."""
    ckpt = os.path.join(run_dir, "best.ckpt")
    if not os.path.isfile(ckpt):
        ckpt = os.path.join(run_dir, "last.ckpt")
    out = ["", "=" * 78]
    if best is not None and primary in best:
        out.append(f"best {primary} {percent(best[primary])}% at epoch {best['epoch'] + 1} "
                   f"(step {best['step']})" + (f"; final {percent(final[primary])}%"
                                                if final and primary in final else ""))
    else:
        out.append("no evaluation during training")
    if learned:
        out.append("learned: " + ", ".join(f"{k} {v:.4g}" for k, v in learned.items()))
    out.append(f"run folder: {run_dir}  (best.ckpt, last.ckpt, metrics.json, curves.png)")
    root = f" --data.root {data_root}" if data_root else ""
    out.append("next:")
    if task == "retrieval":
        out.append(f"  finegrain retrieval eval {ckpt} --dataset NAME --root DIR")
    else:
        out.append(f"  finegrain eval {ckpt}{root}"
                   + ("   # add --visrank 10 for the ranked-gallery picture" if task == "reid"
                      else ""))
    if explainable:
        out.append(f"  finegrain explain {ckpt} IMAGE.jpg [--pair A.jpg B.jpg] --out DIR")
    out.append(f"  finegrain compare {run_dir} OTHER_RUN ...")
    out.append("=" * 78)
    return "\n".join(out)


# ---- finegrain compare --------------------------------------------------------------------
def read_run(run_dir: str) -> dict:
    """One run folder -> ``{"run", "recipe", "group", "seed", "primary", "value", "epoch",
    "task", "paper"}`` (value: the best evaluation of the primary metric, a fraction)."""
    from ..errors import MissingFileError
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} not found: pass run folders of `finegrain train` "
                               f"(runs/<date>-<recipe>) that evaluated at least once")
    with open(path) as f:
        m = json.load(f)
    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
    recipe = m.get("recipe")
    name = os.path.splitext(os.path.basename(recipe))[0] if recipe else None
    if name is None:  # older run folders: <date>-<recipe>[-N] or the demo's <entry>-<arm>-seedN
        base = os.path.basename(os.path.normpath(run_dir))
        base = re.sub(r"^\d{4}-\d{2}-\d{2}-", "", base)
        name = re.sub(r"(-seed\d+|-\d+)$", "", base)
    best = m.get("best") or {}
    primary = m.get("primary")
    test = m.get("test")
    if test is not None:  # the test protocol on the checkpoint the validation chose
        value, on = test.get(primary), "test"
    else:  # validated on the test split itself, or on what metrics.json names
        value, on = best.get(primary), m.get("selected_on") or "test (chosen on it)"
    return {"run": run_dir, "recipe": recipe, "group": name, "config": cfg,
            "seed": cfg.get("seed_everything"), "primary": primary,
            "value": value, "epoch": best.get("epoch"), "task": m.get("task"),
            "evaluated_on": on, "paper": recipe_paper_number(recipe)}


def compare_runs(runs: list[str], group_by: str | None = None,
                 baseline: str | None = None) -> dict:
    """Table of runs: the metric per run; with ``group_by="recipe"`` mean +- std (ddof 1) per
    recipe over its seeds; with ``baseline`` (a run folder, or a group name) the paired
    difference of every other group against the baseline's group, paired by seed
    (``finegrain.evaluation.stats.paired_difference``)."""
    from ..errors import InputError
    from ..evaluation.stats import paired_difference
    rows = [read_run(r) for r in runs]
    primaries = {r["primary"] for r in rows}
    if len(primaries) > 1:
        raise InputError(f"runs of different tasks ({', '.join(sorted(map(str, primaries)))}) "
                         f"cannot share one table; compare runs of one task")
    primary = primaries.pop() if primaries else None
    if group_by == "recipe":
        _name_variants(rows)
    key = (lambda r: r["group"]) if group_by == "recipe" else (lambda r: r["run"])
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    if group_by == "recipe":
        for g, rs in groups.items():
            seen: dict = {}
            for r in rs:
                if r["seed"] in seen:
                    raise InputError(f"{seen[r['seed']]} and {r['run']} are runs of {g} with "
                                     f"the same seed {r['seed']} and configuration: the same "
                                     f"run twice would count twice; compare one of them")
                seen[r["seed"]] = r["run"]
    table = []
    for g, rs in groups.items():
        vals = [r["value"] for r in rs if r["value"] is not None]
        std = float(_std(vals)) if len(vals) > 1 else None
        table.append({"group": g, "n": len(vals), "seeds": [r["seed"] for r in rs],
                      "mean": sum(vals) / len(vals) if vals else None, "std": std,
                      "runs": [r["run"] for r in rs], "values": [r["value"] for r in rs],
                      "evaluated_on": sorted({r["evaluated_on"] for r in rs}),
                      "paper": next((r["paper"] for r in rs if r["paper"]), None)})
    base_group = None
    if baseline is not None:
        norm = os.path.normpath(baseline)
        base_group = next((g for g, rs in groups.items()
                           if g == baseline or any(os.path.normpath(r["run"]) == norm
                                                   for r in rs)), None)
        if base_group is None:
            raise InputError(f"--baseline {baseline}: not one of the compared runs or groups "
                             f"({', '.join(groups)}); pass one of the RUN folders as well")
        by_seed = {r["seed"]: r["value"] for r in groups[base_group]}
        for t in table:
            if t["group"] == base_group:
                t["baseline"] = True
                continue
            pairs = [(r["value"], by_seed[r["seed"]]) for r in groups[t["group"]]
                     if r["seed"] in by_seed and r["value"] is not None
                     and by_seed[r["seed"]] is not None]
            if group_by != "recipe" and not pairs:  # single runs: pair them as they are
                pairs = [(t["values"][0], groups[base_group][0]["value"])]
            if pairs:
                t["vs_baseline"] = paired_difference([p[0] for p in pairs],
                                                     [p[1] for p in pairs])
    return {"primary": primary, "group_by": group_by, "baseline": base_group, "rows": table}


SEED_KEYS = ("seed_everything", "data.seed")
"""Keys that pair runs rather than tell configurations apart."""


def _name_variants(rows: list[dict]) -> None:
    """Runs of one recipe whose resolved configurations differ (another dataset, image size,
    an override) are not pooled: each configuration is its own group, named after the recipe
    and the settings where it differs from the recipe's first configuration."""
    from .run import RUN_KEYS, changed_keys, flatten_config
    ignore = RUN_KEYS + SEED_KEYS
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["group"], []).append(r)
    for name, rs in by_recipe.items():
        variants: list[dict] = []  # one resolved config per variant
        for r in rs:
            match = next((i for i, v in enumerate(variants)
                          if not changed_keys(v, r["config"], ignore)), None)
            if match is None:
                variants.append(r["config"])
                match = len(variants) - 1
            if match:
                diff = changed_keys(variants[0], r["config"], ignore)
                flat = {k: v for k, v in flatten_config(r["config"]).items() if k in diff}
                shown = ", ".join(f"{k}={flat.get(k)}" for k in diff[:3])
                r["group"] = f"{name} [{shown}{', ...' if len(diff) > 3 else ''}]"


def _std(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def format_compare(res: dict, markdown: bool = False) -> str:
    """The table of :func:`compare_runs`, in percentages (plain text or Markdown)."""
    p = res["primary"]
    head = ["run" if res["group_by"] != "recipe" else "recipe", "n", f"{p} (%)",
            "evaluated on", "paper (%)"]
    if res["baseline"] is not None:
        head.append(f"vs {res['baseline']} (points, 95% CI)")
    lines = []
    for t in res["rows"]:
        val = "-" if t["mean"] is None else f"{100 * t['mean']:.2f}" + (
            f" +- {100 * t['std']:.2f}" if t["std"] is not None else "")
        cells = [t["group"], str(t["n"]), val, " / ".join(t["evaluated_on"]),
                 t["paper"] or "-"]
        if res["baseline"] is not None:
            d = t.get("vs_baseline")
            if t.get("baseline"):
                cells.append("baseline")
            elif d is None:
                cells.append("no common seed")
            else:
                s = f"{100 * d['diff_mean']:+.2f}"
                if d["ci_low"] is not None:
                    s += f" [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
                cells.append(s + f" ({d['n']} seed{'s' if d['n'] != 1 else ''})")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    w = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()
                     for r in [head] + lines)


def find_runs(patterns: list[str]) -> list[str]:
    """Run folders from arguments (folders or glob patterns), in the order given."""
    out: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        out += [h for h in hits if h not in out]
    return out
