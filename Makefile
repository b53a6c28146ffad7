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
BENCH_STAMP := $(VENV)/.installed-bench
DEMO_DATA ?= data/listops-demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install backends tasks demo demo-data check-learning data-check-learning check-learning-512 data-check-learning-512 test test-fast bench bench-reference bench-approx gpu-check install-bench leaderboard data-listops data-pathfinder data-pathx clean mini-lra

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_% -]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{n=split($$1,t," "); printf "  \033[36m%-24s\033[0m %s\n", (n>1 ? "reproduce-<task>" : $$1), $$2}'

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP) ## Create .venv and install lra (CPU torch first; override TORCH=... for CUDA)

backends: $(STAMP) ## List the attention backends conf/ defines (plus LRA_CONFIG_PATH folders)
	@$(BIN)/python -m lra.config backends

tasks: $(STAMP) ## List the tasks conf/ defines (plus LRA_CONFIG_PATH folders)
	@$(BIN)/python -m lra.config tasks

demo-data: $(STAMP) ## Generate the small ListOps set the demo trains on (data/listops-demo)
	@test -f $(DEMO_DATA)/basic_test.tsv || $(BIN)/lra-data generate listops --out $(DEMO_DATA) \
		--train 8000 --val 500 --test 500 --max-depth 3 --max-args 5 --min-len 10 --max-len 64

demo: demo-data ## Train the Nyström model on the small generated ListOps set (a few minutes on 2 CPU cores)
	$(BIN)/lra-train experiment=demo attention=nystrom attention.num_landmarks=16 attention.conv_kernel=9

test: $(STAMP) $(BENCH_STAMP) ## Run the whole test suite (the reference packages too, so the side-by-side is tested)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) $(BENCH_STAMP) ## Run the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps nystrom-attention==0.0.14 linformer==0.2.3 performer-pytorch==1.1.4 \
		local-attention==1.4.3 axial-positional-embedding==0.2.1
	touch $@

install-bench: $(BENCH_STAMP) ## Public reference implementations for lra-bench --with-reference (--no-deps keeps our torch)

bench: $(STAMP) ## Attention efficiency on an idle machine -> results/bench/cpu-*.json and .png
	$(BIN)/lra-bench --threads 2

bench-reference: install-bench ## Ours vs nystrom-attention / linformer / performer-pytorch (ours/theirs ratios)
	$(BIN)/lra-bench --threads 2 --with-reference

bench-approx: $(STAMP) ## Approximation error against exact softmax of every backend that approximates it
	$(BIN)/lra-bench --threads 2 --approx

gpu-check: $(STAMP) ## On a CUDA machine: kernels fp32/bf16 to n=32k and 200-step ListOps runs per backend, one table (<8 min)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

data-listops: $(STAMP) ## Generate the full LRA-size ListOps set (96k/2k/2k) into data/listops
	$(BIN)/lra-data generate listops --out data/listops

PF_WORKERS ?= 2
data-pathfinder: $(STAMP) ## Generate LRA Pathfinder (pf32 hard, 200k images, ~30 CPU-min) into data/pathfinder
	$(BIN)/lra-data generate pathfinder --out data/pathfinder --resolution 32 --difficulty 14 --batches 200 \
		--per-batch 1000 --seed 0 --workers $(PF_WORKERS) --check-images 20000 --preview data/pathfinder/preview.png

data-pathx: $(STAMP) ## Generate Path-X (pf128 hard, 200k images, ~7 CPU-hours, resumable) into data/pathx
	$(BIN)/lra-data generate pathfinder --out data/pathx --resolution 128 --difficulty 14 --batches 200 \
		--per-batch 1000 --seed 0 --workers $(PF_WORKERS) --check-images 5000 --preview data/pathx/preview.png

clean: ## Remove generated data, run folders (checkpoints, logs) and run records (keeps committed results)
	rm -rf data runs checkpoints logs outputs multirun results/runs

# ---- published tables ------------------------------------------------------------------------------
# `make -n reproduce-nystromformer` prints the exact commands. Data: data/<task> (raw or prepared; see
# README "Getting the data"); each target checks it first and says how to get what is missing.
# The backends a protocol's targets loop over: BACKENDS="a b" if given, else asked once per protocol:
# reproduce-<protocol> runs every backend its paper's table has a row for (`python -m lra.published P`,
# from lra/published.py); mini-lra the files of conf/protocol_attention/mini/ or every discovered backend
# (`python -m lra.config backends --protocol mini`).
BACKENDS ?=
backends_for = $(or $(BACKENDS),$(_backends_$(1)),$(eval _backends_$(1) := $(or $(shell $(BIN)/python -m lra.config \
	backends --protocol $(1) 2>/dev/null),$(error `$(BIN)/python -m lra.config backends --protocol $(1)` failed; \
	run `make install`, or set BACKENDS="a b")))$(_backends_$(1)))
published_for = $(or $(BACKENDS),$(_published_$(1)),$(eval _published_$(1) := $(or $(shell $(BIN)/python -m lra.published \
	$(1)),$(error `$(BIN)/python -m lra.published $(1)` failed; run `make install`, or set BACKENDS="a b")))$(_published_$(1)))
SEEDS ?= 0
TRAIN_ARGS ?=
LRA_TASKS := listops text retrieval image pathfinder
# Loops only: everything that defines a published run (model, optimiser, schedule, each backend's
# options) is in conf/experiment/<protocol>/<task>.yaml, conf/protocols/ and conf/protocol_attention/.
define reproduce_task
	$(BIN)/lra-data check $(2) --data-dir data/$(2)
	$(foreach b,$(call published_for,$(1)),$(BIN)/lra-train -m experiment=$(1)/$(2) attention=$(b) seed=$(SEEDS) data_dir=data/$(2) $(TRAIN_ARGS)
	)
endef

.PHONY: reproduce-nystromformer reproduce-lra $(addprefix reproduce-,$(LRA_TASKS))
reproduce-nystromformer: $(STAMP) ## Nyströmformer paper's LRA table: 5 tasks x the backends it has rows for (SEEDS=0,1,2 for more seeds)
	$(foreach t,$(LRA_TASKS),$(call reproduce_task,nystromformer,$(t)))
	$(BIN)/lra-leaderboard results/runs --out results/LEADERBOARD.md

reproduce-lra: $(STAMP) ## LRA paper's table (its per-task model sizes), Path-X included, x the backends it has rows for
	$(foreach t,$(LRA_TASKS) pathx,$(call reproduce_task,lra,$(t)))
	$(BIN)/lra-leaderboard results/runs --out results/LEADERBOARD.md

reproduce-listops reproduce-text reproduce-retrieval reproduce-image reproduce-pathfinder: reproduce-%: $(STAMP) ## One task of the Nyströmformer table, the backends it has rows for (e.g. make reproduce-listops)
	$(call reproduce_task,nystromformer,$*)
	$(BIN)/lra-leaderboard results/runs --out results/LEADERBOARD.md

leaderboard: $(STAMP) ## Build results/LEADERBOARD.md (+ .csv/.json/.png) from the records in results/runs
	$(BIN)/lra-leaderboard results/runs --out results/LEADERBOARD.md

# ---- mini-LRA: the four backends on small generated sets, on 2 CPU cores ------------------------------
# A failed run leaves a `failed` record (shown as FAIL in the table) and the target goes on.
MINI_RESULTS ?= results/mini
MINI_PF ?= data/mini/pathfinder
# Nyström's 64 landmarks would equal the 64-token mini ListOps length (exact attention): use 16.
OPTS_mini_listops_nystrom := attention.num_landmarks=16 attention.conv_kernel=9

define mini_task
	$(foreach b,$(call backends_for,mini),-$(BIN)/lra-train experiment=mini/$(1) attention=$(b) $(OPTS_mini_$(1)_$(b)) results_dir=$(MINI_RESULTS) $(TRAIN_ARGS)
	)
endef

mini-lra: demo-data ## Every discovered backend on small generated ListOps and Pathfinder sets (~6 min each on 2 CPU cores; BACKENDS= narrows) -> results/LEADERBOARD.md
	@test -f $(MINI_PF)/pathfinder32/curv_baseline/metadata/11.npy || $(BIN)/lra-data generate pathfinder \
		--out $(MINI_PF) --resolution 32 --difficulty baseline --batches 12 --per-batch 1000 --seed 0 --workers 2
	$(call mini_task,listops)
	$(call mini_task,pathfinder)
	for t in text retrieval image; do \
		if $(BIN)/lra-data check $$t --data-dir data/$$t >/dev/null 2>&1; then \
			for b in $(call backends_for,mini); do $(BIN)/lra-train experiment=mini/$$t attention=$$b results_dir=$(MINI_RESULTS) $(TRAIN_ARGS) || true; done; \
		else echo "mini-lra: no data/$$t, skipping $$t (lra-data check $$t --data-dir data/$$t says how to get it)"; fi; \
	done
	$(BIN)/lra-leaderboard $(MINI_RESULTS) --out results/LEADERBOARD.md

# ---- long-range learning check: does the default recipe leave the label-prior plateau? ---------------
# conf/experiment/check/listops.yaml (data, length, budget); scripts/check_learning.py runs each backend of
# the Nyströmformer protocol (conf/protocol_attention/nystromformer/) x seeds 0,1,2 through lra-train and
# writes $(CHECK_RESULTS)/TABLE.md. CHECK_ARGS passes more options, e.g. CHECK_ARGS="--seeds 0 optimizer.lr=3e-3".
CHECK_DATA := data/listops-check
CHECK_RESULTS ?= results/check-learning/default
CHECK_ARGS ?=

data-check-learning: $(STAMP) ## Long ListOps for the learning check (8,000/500/1,000 of 101..255 tokens) into data/listops-check
	@test -f $(CHECK_DATA)/basic_test.tsv || $(BIN)/lra-data generate listops --out $(CHECK_DATA) \
		--train 8000 --val 500 --test 1000 --seed 0 --min-len 100 --max-len 256

check-learning: data-check-learning ## Default recipe on long ListOps: 4 backends x 3 seeds, plateau exit per run -> results/check-learning/
	$(BIN)/python scripts/check_learning.py --protocol-backends nystromformer --results $(CHECK_RESULTS) $(CHECK_ARGS)

# The issue's own size: conf/experiment/check/listops512.yaml (101..399 tokens padded to 512, 400 steps).
CHECK512_DATA := data/listops-check512
CHECK512_RESULTS ?= results/check-learning/default512

data-check-learning-512: $(STAMP) ## Long ListOps for the 512-token check (8,000/1,000/1,000 of 101..399 tokens) into data/listops-check512
	@test -f $(CHECK512_DATA)/basic_test.tsv || $(BIN)/lra-data generate listops --out $(CHECK512_DATA) \
		--train 8000 --val 1000 --test 1000 --seed 0 --min-len 100 --max-len 400

check-learning-512: data-check-learning-512 ## The check at 512 tokens x 400 steps: 4 backends x 3 seeds -> results/check-learning/default512/
	$(BIN)/python scripts/check_learning.py --check check/listops512 --protocol-backends nystromformer \
		--results $(CHECK512_RESULTS) $(CHECK_ARGS)
