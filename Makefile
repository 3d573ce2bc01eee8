# Two entry points: `make demo` and `make test`. Both set up .venv from scratch when needed.
# The gate: `make check` = lint + types + fast tests (CI runs it first, so style fails fast).
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch first, pinned to the CPU wheel these machines carry, so pip never pulls a CUDA build.
TORCH   ?= torch==2.13.0
# pytest-xdist workers for `make test` (CI: 2 cores; Slurm tests stay together in one worker).
TEST_JOBS ?= 2
LINTED  := src tests bench demo scripts

.PHONY: venv test test-fast lint typecheck deadcode check format demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test,lint]"
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup --durations=30

# A quick local loop: everything but the slow, Slurm and DeepSpeed tests (CI runs them all).
test-fast: venv
	$(VPY) -m pytest -q -m "not slow and not slurm and not deepspeed"

lint: venv
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/vulture

typecheck: venv
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# Lint + types + the in-process unit tests of the data layer, config and engines' import graph
# (under 3 minutes: a gate that fails fast; `make test` runs everything).
check: lint typecheck
	$(VPY) -m pytest -q -x -m "not slow and not slurm and not deepspeed and not distributed" \
		tests/data tests/config tests/engines/test_imports.py tests/training/test_loss_schedule_flops.py

demo: venv
	bash scripts/demo.sh

bench: venv
	$(VPY) bench/data_pipeline.py

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
