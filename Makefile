# Two commands for a fresh clone: `make demo` and `make test`. Both create / reuse .venv and
# install the pinned, tested versions from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: demo demo-seeds test test-slow bench clean

# the package alone: all `make demo` needs (the extras would cost its 10-minute budget time)
$(BASE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(BASE)

# + tests, export (ONNX) and serve (FastAPI) extras
$(STAMP): $(BASE)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,export,serve]'
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/finegrain demo

demo-seeds: $(BASE)
	$(VENV)/bin/finegrain demo --seeds 5 --ablations

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
