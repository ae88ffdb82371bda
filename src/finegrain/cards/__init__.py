"""Recipe cards: each method's training and test protocol, every value with its source.

One data file per method (``dcal.yaml``, ``tasn.yaml``, ``dalg.yaml``, ``dml.yaml`` beside this
file) lists, per protocol (DCAL: ``fgvc`` and ``reid``), the settings a result depends on: the
paper's value (``null``: the paper does not state it) and where it says so (section, table,
official file:line). A recipe setting that is not the paper's carries the label
``# ours: REASON`` on its line. The same file drives three things:

- ``finegrain train`` prints the card of its run (setting | value | paper | source), the value
  read from the resolved configuration, so an override that leaves the paper shows;
- ``tests/engine/test_recipe_cards.py`` checks every recipe against its card
  (:func:`check_recipe`);
- the recipe tables in ``docs/`` are generated from it (``python -m finegrain.cards
  --write-docs``; a test checks they are current).
"""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from typing import Any

import yaml

__all__ = ["METHODS", "load_card", "card_for", "recipe_labels", "card_rows", "format_card",
           "check_recipe", "docs_table"]

METHODS = ("dcal", "tasn", "dalg", "dml")
HERE = os.path.dirname(os.path.abspath(__file__))
LABEL = re.compile(r"#\s*ours:\s*(.+?)\s*$")


@lru_cache(maxsize=None)
def load_card(method: str) -> dict:
    """The card of ``method`` (one of :data:`METHODS`)."""
    with open(os.path.join(HERE, f"{method}.yaml")) as f:
        return yaml.safe_load(f)


def _protocol(card: dict, flat: dict) -> str | None:
    for name, proto in card["protocols"].items():
        if all(flat.get(k) == v for k, v in (proto.get("when") or {}).items()):
            return name
    return None


def card_for(flat: dict, recipe: str | None = None) -> tuple[dict, str] | None:
    """(card, protocol name) of a resolved, flattened config: the card of the recipe's folder
    (``recipes/dcal/...``), else the one whose models include ``model.model.class_path``."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(recipe))) if recipe else None
    method = folder if folder in METHODS else next(
        (m for m in METHODS if flat.get("model.model.class_path") in load_card(m)["models"]),
        None)
    if method is None:
        return None
    card = load_card(method)
    proto = _protocol(card, flat)
    return (card, proto) if proto is not None else None


def recipe_labels(path: str) -> dict[str, str]:
    """``{dotted key: reason}`` of the ``# ours: REASON`` labels in a recipe file. A label on
    a line with a flow mapping (``init_args: {lr: 0.1, momentum: 0.9}  # ours: ...``) applies
    to every key of that mapping."""
    from ..engine.run import flatten_config
    labels: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open block mappings
    with open(path) as f:
        for line in f:
            body = line.split("#", 1)[0].rstrip()
            m = re.match(r"^(\s*)([\w.]+):\s*(.*)$", body)
            if not m:
                continue
            indent, key, value = len(m.group(1)), m.group(2), m.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            dotted = ".".join([k for _, k in stack] + [key])
            if not value:
                stack.append((indent, key))
            label = LABEL.search(line)
            if label and value:
                parsed = yaml.safe_load(value)
                keys = flatten_config(parsed, dotted + ".") if isinstance(parsed, dict) \
                    else {dotted: parsed}
                labels.update({k: label.group(1) for k in keys})
    return labels


def _resolve(paper: Any, flat: dict) -> Any:
    """The paper's value for this config (``{per: KEY, value-of-KEY: ...}`` looked up)."""
    while isinstance(paper, dict) and "per" in paper:
        paper = paper.get(flat.get(paper["per"]))
    return paper


def _same(value: Any, paper: Any) -> bool:
    if isinstance(paper, dict) and "one_of" in paper:
        return any(_same(value, p) for p in paper["one_of"])
    if isinstance(paper, (list, tuple)) or isinstance(value, (list, tuple)):
        return isinstance(value, (list, tuple)) and isinstance(paper, (list, tuple)) and \
            len(value) == len(paper) and all(_same(v, p) for v, p in zip(value, paper))
    if isinstance(paper, bool) or isinstance(value, bool):
        return value is paper
    if isinstance(paper, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(value, paper, rel_tol=1e-9, abs_tol=1e-12)
    return value == paper


def _show(v: Any) -> str:
    if isinstance(v, dict) and "one_of" in v:
        return " or ".join(_show(x) for x in v["one_of"])
    if isinstance(v, (list, tuple)):
        return " x ".join(_show(x) for x in v) if all(isinstance(x, (int, float)) for x in v) \
            else ", ".join(_show(x) for x in v)
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def card_rows(card: dict, protocol: str, flat: dict, labels: dict[str, str]) -> list[dict]:
    """One row per card setting: ``setting, value, paper, source, status`` where status is
    ``paper`` (the value is the paper's), ``ours: REASON`` (labelled in the recipe), or
    ``differs, not labelled`` (a command-line override, or a recipe the test refuses)."""
    rows = []
    for key, spec in card["protocols"][protocol]["settings"].items():
        if not key.startswith("test.") and key not in flat:
            continue  # not an argument of this model (TASN's baseline twin has no sampler)
        if any(flat.get(k) != v for k, v in (spec.get("only") or {}).items()):
            continue  # a setting of a branch this recipe turns off (the baseline twin)
        paper = _resolve(spec.get("paper"), flat)
        if key.startswith("test."):  # what finegrain does at test time, not a recipe key
            same = spec.get("finegrain") == "the same"
            rows.append({"setting": key, "value": "(test time)", "paper": _show(paper),
                         "source": spec["source"],
                         "status": "paper" if same else f"finegrain: {spec.get('finegrain')}"})
            continue
        value = flat.get(key)
        if paper is not None and _same(value, paper):
            status = "paper"
        elif key in labels:
            status = f"ours: {labels[key]}"
        else:
            status = "differs, not labelled" if paper is not None else "not stated, not labelled"
        rows.append({"setting": key, "value": _show(value), "paper": _show(paper)
                     if paper is not None else "not stated", "source": spec["source"],
                     "status": status})
    return rows


def format_card(card: dict, protocol: str, rows: list[dict]) -> str:
    """The card as the plain-text table ``finegrain train`` prints."""
    head = ("setting", "value", "paper", "source / status")
    body = [(r["setting"], r["value"], r["paper"],
             r["source"] + ("" if r["status"] == "paper" else f"  [{r['status']}]"))
            for r in rows]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    lines = [f"recipe card: {card['method']} ({protocol}); {card['paper']}",
             "  " + "  ".join(h.ljust(w[i]) if i < 3 else h for i, h in enumerate(head))]
    for r in body:
        lines.append("  " + "  ".join(c.ljust(w[i]) if i < 3 else c for i, c in enumerate(r)))
    return "\n".join(lines)


def check_recipe(path: str, flat: dict) -> list[str]:
    """What keeps a recipe from matching its card (empty: it matches), from the recipe file
    and its resolved, flattened config ``flat``:

    - a card setting whose value is not the paper's, or that the paper does not state, must be
      set in the recipe with an ``# ours: REASON`` label;
    - every other key the recipe sets must be a card setting (with the paper's value) or name
      the experiment (the card's ``identifies``: data set, backbone, the twin's branches);
    - no comment may call a setting the paper's ("Paper recipe"): the card says what is.
    """
    from ..engine.run import flatten_config
    found = card_for(flat, path)
    if found is None:
        return [f"{path}: no card applies (recipes/<method>/ with a protocol for its task)"]
    card, protocol = found
    labels = recipe_labels(path)
    with open(path) as f:
        text = f.read()
    own = flatten_config(yaml.safe_load(text) or {})
    problems = []
    for row in card_rows(card, protocol, flat, labels):
        key = row["setting"]
        if key.startswith("test."):
            continue
        if row["status"].endswith("not labelled"):
            problems.append(f"{key} = {row['value']} ({row['status']}; paper: {row['paper']})")
        elif row["status"].startswith("ours") and key not in own:
            problems.append(f"{key}: labelled but not set in the recipe")
    settings = card["protocols"][protocol]["settings"]
    for key in own:
        if key not in settings and key not in card["identifies"] and key not in labels:
            problems.append(f"{key}: set by the recipe, in no card row and not labelled ours")
    if re.search(r"paper recipe", text, re.I):
        problems.append("a comment says 'Paper recipe': the card says which settings are")
    return [f"{os.path.basename(path)}: {p}" for p in problems]


def resolved_recipe(path: str) -> dict:
    """A recipe's configuration as ``finegrain train`` resolves it (defaults filled),
    flattened; nothing is built."""
    st = os.stat(path)
    return dict(_resolved(os.path.abspath(path), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=256)
def _resolved(path: str, mtime: int, size: int) -> dict:
    from ..engine.run import flatten_config, parse_config
    return flatten_config(parse_config(["--config", path]))


def repo_recipes(method: str) -> list[str]:
    """The recipes of ``method`` in this checkout's ``recipes/<method>/``."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), "recipes",
                          method)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))


def docs_table(method: str) -> str:
    """The markdown table of ``method``'s card with the values its recipes use."""
    card = load_card(method)
    per_protocol: dict[str, dict[str, set]] = {}
    for path in repo_recipes(method):
        flat = resolved_recipe(path)
        found = card_for(flat, path)
        if found is None:
            continue
        labels = recipe_labels(path)
        for row in card_rows(found[0], found[1], flat, labels):
            if row["setting"].startswith("test."):
                continue
            cell = row["value"] + ("" if row["status"] == "paper"
                                   else f" (ours: {labels.get(row['setting'], '?')})")
            per_protocol.setdefault(found[1], {}).setdefault(row["setting"], set()).add(cell)
    out = []
    for protocol, proto in card["protocols"].items():
        used = per_protocol.get(protocol, {})
        out += [f"**{card['method']}, {protocol}** (card `src/finegrain/cards/{method}.yaml`)",
                "", "| setting | paper | source | recipes |", "|---|---|---|---|"]
        for key, spec in proto["settings"].items():
            paper = spec.get("paper")
            if isinstance(paper, dict) and "per" in paper:
                shown = "; ".join(f"{k}: {_show(v)}" for k, v in paper.items() if k != "per")
            else:
                shown = _show(paper) if paper is not None else "not stated"
            if key.startswith("test."):
                cell = spec.get("finegrain", "")
            else:
                cell = "; ".join(sorted(used.get(key, {"-"})))
            out.append(f"| `{key}` | {shown} | {spec['source']} | {cell} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


DOCS = {"dcal": "docs/dcal.md", "tasn": "docs/tasn.md", "dalg": "docs/retrieval.md",
        "dml": "docs/dml.md"}
BEGIN, END = "<!-- recipe card: generated by python -m finegrain.cards --write-docs -->", \
    "<!-- end of recipe card -->"


def docs_with_table(text: str, method: str) -> str:
    """``text`` (a docs page) with its generated card table replaced by the current one."""
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + docs_table(method) + text[stop:]
