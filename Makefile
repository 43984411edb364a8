# Two commands from a fresh clone:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgepack-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch==2.13.0 first: it resolves to the CPU build here, and the looser
# "torch>=2.6" in pyproject.toml is then already satisfied.
$(STAMP): pyproject.toml examples/plugin_example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
