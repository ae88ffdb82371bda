"""The layering of docs/architecture.md, read from the source: every ``import`` of finegrain
(module level or inside a function) points down, or sideways where the picture says so."""

from __future__ import annotations

import ast
import os
import sys

import finegrain

SRC = os.path.dirname(finegrain.__file__)

LEVELS = {
    **dict.fromkeys(("errors", "meta", "atomic", "choices"), 0),  # utilities
    **dict.fromkeys(("models", "data", "losses", "evaluation"), 1),
    **dict.fromkeys(("loading", "runtime", "visualize"), 2),  # open a model; pictures
    **dict.fromkeys(("engine", "cards", "retrieval"), 3),
    **dict.fromkeys(("inference", "api", "serve", "export", "demo", "finegrain"), 4),
    **dict.fromkeys(("cli", "__main__"), 5),
}
"""The top-level parts of the package by layer (``finegrain``: the package's ``__init__``)."""
SIDEWAYS = {("data", "evaluation"), ("loading", "runtime"), ("engine", "cards"),
            ("cards", "engine"), ("models", "losses"), ("__main__", "cli")}
"""Imports within one layer the picture allows (besides the utilities and the entry points,
which may import each other)."""
ONLY = {"models": {"models", "losses", "errors", "meta", "choices"},
        "evaluation": {"evaluation"}}
"""Parts that may import only these."""


def _part(module: str) -> str:
    """``finegrain.retrieval.index`` -> ``retrieval``; the package itself -> ``finegrain``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "finegrain"


def _imports() -> dict[str, set[str]]:
    """Source part -> the parts it imports."""
    out: dict[str, set[str]] = {}
    for folder, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, os.path.dirname(SRC))[:-3].replace(os.sep, ".")
            module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            package = module if f == "__init__.py" else module.rpartition(".")[0]
            found = out.setdefault(_part(module), set())
            for node in ast.walk(ast.parse(open(path).read(), path)):
                targets = []
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[:len(package.split(".")) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target == "finegrain":  # from finegrain import api / __version__
                        targets += [f"finegrain.{a.name}" if os.path.exists(
                            os.path.join(SRC, a.name)) or os.path.exists(
                            os.path.join(SRC, a.name + ".py")) else "finegrain"
                            for a in node.names]
                    else:
                        targets.append(target)
                elif isinstance(node, ast.Import):
                    targets += [a.name for a in node.names]
                found |= {_part(t) for t in targets if t.split(".")[0] == "finegrain"}
    return out


def test_every_part_has_a_layer():
    assert set(_imports()) <= set(LEVELS), set(_imports()) - set(LEVELS)


def test_imports_point_down_only():
    bad = []
    for src, targets in _imports().items():
        for t in targets - {src}:
            if src in ONLY and t not in ONLY[src]:
                bad.append(f"{src} -> {t} (it imports only {sorted(ONLY[src])})")
            elif LEVELS[t] > LEVELS[src] or (LEVELS[t] == LEVELS[src] and LEVELS[t] not in (0, 4)
                                             and (src, t) not in SIDEWAYS):
                bad.append(f"{src} (layer {LEVELS[src]}) -> {t} (layer {LEVELS[t]})")
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The reader finds imports inside functions too (where most upward ones would hide)."""
    pkg = tmp_path / "finegrain"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("def f():\n    from ..engine import run\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", str(pkg))
    assert _imports()["models"] == {"engine"}


def test_every_module_says_what_it_offers():
    """Each module's ``__all__`` (the names the rest of the package and users may rely on)
    exists and names only what the module has; ``finegrain.__all__`` is the public API."""
    import importlib
    import pkgutil
    missing, stale = [], []
    for m in pkgutil.walk_packages(finegrain.__path__, "finegrain."):
        if m.name.endswith("__main__"):
            continue
        mod = importlib.import_module(m.name)
        if not hasattr(mod, "__all__"):
            if not m.ispkg:  # a package's __init__ may be a docstring alone
                missing.append(m.name)
            continue
        stale += [f"{m.name}.{n}" for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing and not stale, (missing, stale)
    assert all(getattr(finegrain, n) is not None for n in finegrain.__all__)
