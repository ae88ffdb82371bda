"""``python -m finegrain.cards [--write-docs]``: print every recipe's problems against its card
(exit 1 if any), or rewrite the generated card tables in docs/."""

import argparse
import os
import sys

from . import DOCS, METHODS, check_recipe, docs_with_table, repo_recipes, resolved_recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finegrain.cards", description=__doc__)
    p.add_argument("--write-docs", action="store_true", help="rewrite the docs' card tables")
    a = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(repo_recipes(METHODS[0])[0]))
    root = os.path.dirname(root)
    if a.write_docs:
        for method, page in DOCS.items():
            path = os.path.join(root, page)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(docs_with_table(text, method))
            print(f"wrote the {method} card table into {page}")
        return 0
    problems = [x for m in METHODS for r in repo_recipes(m)
                for x in check_recipe(r, resolved_recipe(r))]
    print("\n".join(problems) or "every recipe matches its card")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
