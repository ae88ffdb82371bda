# Two commands for a fresh clone: `make demo` and `make test`. Both create / reuse .venv and
# install the pinned, tested versions from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-seeds test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,export,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/finegrain demo

demo-seeds: $(STAMP)
	$(VENV)/bin/finegrain demo --seeds 5 --ablations

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
