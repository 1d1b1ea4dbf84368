# Two commands for a fresh machine:
#   make train   install what is needed, then train configs/default.py (nano, Fashion-MNIST)
#   make test    install what is needed, then run the test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: train test lint bench install install-dev data compiler tcmalloc clean

$(VENV)/.installed: requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# requirements-tpu.txt: libtpu, for scripts/compile_tpu.py and its test (compiles for TPU slices
# on this host; no TPU needed).
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-tpu.txt
	$(VPY) -m pip install -q -r requirements-dev.txt -r requirements-tpu.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Debian's dataset-fashion-mnist holds the IDX files the default run and the convergence tests read.
data:
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	      echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	  else echo "warning: apt-get not found; install dataset-fashion-mnist to get $(FMNIST_DIR)"; fi; \
	fi

# On CPU the depthwise convs run as native XLA custom calls built with g++ on first use
# (spikeatconv_jax/xla_cpu/native.py); without a compiler they fall back to XLA's forms.
compiler:
	@if ! command -v g++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q g++ >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q g++ >/dev/null; } || \
	    echo "warning: could not install g++; the CPU depthwise convs use the slower XLA forms"; \
	fi

# XLA:CPU steps run markedly faster under tcmalloc (spikeatconv_jax/xla_cpu/malloc.py): train.py,
# eval.py and the benchmarks re-execute themselves with it preloaded when it is installed.
tcmalloc:
	@if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && \
	    command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null; } || \
	    echo "warning: could not install libtcmalloc-minimal4; XLA:CPU steps run under glibc malloc"; \
	fi

train: install data compiler tcmalloc
	$(VPY) train.py --config $(CONFIG) --workdir $(WORKDIR)

# pytest itself runs under tcmalloc too, when it is installed (an empty LD_PRELOAD is a no-op).
# Two workers (pytest-xdist), one test file each at a time: a file's module fixtures (a trained
# workdir) are built once. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: install-dev data compiler tcmalloc
	LD_PRELOAD="$$($(VPY) -c 'from spikeatconv_jax.xla_cpu.malloc import find_tcmalloc; print(find_tcmalloc() or "")')" \
	  $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install compiler tcmalloc
	$(VPY) benchmarks/lif.py
	$(VPY) benchmarks/model.py
	$(VPY) benchmarks/input.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
