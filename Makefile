# facedeit: crop -> train -> claims -> report. `make reproduce` runs the stages in a row;
# each stage reads only what the one before wrote, so each can be rerun alone.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?=
PROFILE ?= quick
SEED ?= 0
CROPS ?= cache/faces
RESULTS ?= results
# NPROC > 1 trains with torchrun on NPROC processes (one per GPU); ACCUM splits
# each process's share of the batch into micro-batches.
NPROC ?= 1
ACCUM ?= 1
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY) -m facedeit,$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m facedeit)
RECIPES ?= recipes/seed_adamw.yaml recipes/seed_sgd.yaml \
	recipes/resnet18_sgd.yaml recipes/resnet18_adamw.yaml \
	recipes/vit_b_paper_tiny.yaml recipes/deit_b_paper_tiny.yaml

.PHONY: install check-recipes crop train claims report reproduce test bench clean-runs
# The stages run one after the other even under `make -j`: each reads what the one before wrote.
.NOTPARALLEL:

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e .
	touch $@

install: $(VENV)/.installed

# Recipes and the profile are checked before the crop stage, so a typo stops
# `make train` in seconds instead of after MTCNN has run.
check-recipes: install
	$(PY) -m facedeit recipe check $(RECIPES) --profile $(PROFILE) --world-size $(NPROC) --accum-steps $(ACCUM)

crop: install
	$(PY) -m facedeit crop $(if $(DATA),--data "$(DATA)") --out $(CROPS)

train: check-recipes crop
	$(LAUNCH) run $(RECIPES) --crops $(CROPS) --results $(RESULTS) \
		--profile $(PROFILE) --seed $(SEED) --accum-steps $(ACCUM) --resume

# The runs of claims/plan.yaml (its own profile and seeds, one process);
# runs that exist are kept, so a stopped `make claims` continues.
claims: crop
	$(PY) -m facedeit claims --crops $(CROPS) --results $(RESULTS)

report: install
	$(PY) -m facedeit report --results $(RESULTS)

reproduce: train claims report
	@echo "report written to $(RESULTS)/REPORT.md"

test: install
	$(PY) -m pytest tests

bench: install
	mkdir -p $(RESULTS)/benchmarks
	kind=$$($(PY) -m facedeit.bench) && \
	FACEDEIT_BENCH_OUT=$(RESULTS)/benchmarks FACEDEIT_BENCH_CROPS=$(CROPS) $(if $(DATA),FACEDEIT_BENCH_PHOTOS="$(DATA)") \
	$(PY) -m pytest benchmarks --benchmark-only \
		--benchmark-json $(RESULTS)/benchmarks/benchmarks-$$kind.json

# Remove the trained runs (not the crop cache), to train every recipe again.
clean-runs:
	rm -rf $(RESULTS)/runs
