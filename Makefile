# Two entry points: `make demo` and `make test`. Both set up .venv from scratch when needed.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch first, pinned to the CPU wheel these machines carry, so pip never pulls a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q

test-fast: venv
	$(VPY) -m pytest -q -m "not slow"

demo: venv
	bash scripts/demo.sh

bench: venv
	$(VPY) bench/data_pipeline.py

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
