# The two commands a new user runs: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project with the torch pinned in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

demo: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-demo:
	rm -rf runs/demo
