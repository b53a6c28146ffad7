# lra: Long Range Arena harness. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` from PyPI is a multi-GB CUDA build: the CPU wheel goes in first. GPU users override,
# e.g. make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
EXTRAS ?= dev,tfds
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_DATA ?= data/listops-demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo demo-data test test-fast bench install-bench leaderboard data-listops clean

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP) ## Create .venv and install lra (CPU torch first; override TORCH=... for CUDA)

demo-data: $(STAMP) ## Generate the small ListOps set the demo trains on (data/listops-demo)
	@test -f $(DEMO_DATA)/basic_test.tsv || $(BIN)/lra-data generate listops --out $(DEMO_DATA) \
		--train 8000 --val 500 --test 500 --max-depth 3 --max-args 5 --min-len 10 --max-len 64

demo: demo-data ## Train the Nyström model on the small generated ListOps set (a few minutes on 2 CPU cores)
	$(BIN)/lra-train experiment=demo attention=nystrom

test: $(STAMP) ## Run the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) ## Run the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

data-listops: $(STAMP) ## Generate the full LRA-size ListOps set (96k/2k/2k) into data/listops
	$(BIN)/lra-data generate listops --out data/listops

clean: ## Remove generated data, checkpoints, logs and run records (keeps committed results)
	rm -rf data checkpoints logs outputs multirun results/runs
