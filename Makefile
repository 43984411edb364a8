# Two commands from a fresh clone:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgepack-installed

.PHONY: setup system-deps demo test test-slow test-all bench clean

setup: $(STAMP)

# torch==2.13.0 first: it resolves to the CPU build here, and the looser
# "torch>=2.6" in pyproject.toml is then already satisfied.
$(STAMP): pyproject.toml examples/plugin_example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# System packages the tests use: qemu-user (runner qemu-aarch64), the aarch64 cross
# compiler and its libc headers (binary-popcount under emulation) and SIMDe (the NEON
# kernels compiled on x86), chromium (the report test renders its HTML headless).
# Installed with apt-get when running as root (as CI does) and missing; silent when
# all are there; otherwise the tests that need them skip.
SYSTEM_PACKAGES := qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross libsimde-dev chromium

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q " installed$$" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq >/dev/null 2>&1 || true; \
	  out=$$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing 2>&1) \
	    || { echo "$$out" >&2; exit 1; }; \
	else \
	  echo "note: missing system packages:$$missing (as root: apt-get install$$missing); the tests that need them skip"; \
	fi

demo: setup
	$(PY) examples/quickstart.py

# The default suite (CI) leaves out the tests marked slow (the heaviest gallery models,
# long trainings): about 15 minutes on 2 cores.  test-slow runs only those; test-all both.
test: setup system-deps
	$(PY) -m pytest -q -m "not slow"

test-slow: setup system-deps
	$(PY) -m pytest -q -m slow

test-all: setup system-deps
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
