# CLIP Atlas. Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ATLAS_HOME ?= var
export ATLAS_HOME
PORT ?= 8501
HOST ?= 127.0.0.1
MODEL ?=
# The toy zoo `make etl` builds when no MODEL is given: one seed of every trained architecture (the
# models/toy configs with shipped weights and no -seedN suffix: one per size, plus the SigLIP-style toy
# once it has weights) and a random-init control of the middle size; `python -m etl study` runs every
# seed. toy-shapes is built last: the dashboard opens on the last trained model built.
TRAINED := $(basename $(notdir $(wildcard models/toy/*.safetensors)))
ONE_SEED := $(foreach m,$(TRAINED),$(if $(findstring -seed,$(m)),,$(m)))
ZOO := $(filter-out toy-shapes,$(ONE_SEED)) $(filter toy-shapes,$(ONE_SEED))
CONTROLS := toy-shapes/random-seed0
PRETRAINED ?=
CHECKPOINT ?=
IMAGES ?=
# a world no training or tuning drew from (etl/world/seeds.py DEMO), so the demo's images are held out
DATASET ?= shapes:2000:seed=41
WAREHOUSE ?= $(ATLAS_HOME)/warehouse.duckdb

MODEL_FLAGS := --model $(MODEL) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
DATA_FLAGS := $(if $(IMAGES),--dataset $(IMAGES),--dataset $(DATASET) --dataset skimage)

.PHONY: setup demo etl zoo dashboard test test-slow test-all test-fast bench bench-scale browser-deps clean help

help:
	@echo "make demo     set up, build the default warehouse (the toy zoo + shapes world + scikit-image photos), serve the dashboard"
	@echo "make test     set up and run the test suite but its slow tests, about 15 min on 2 cores (installs Debian's chromium for the browser test)"
	@echo "make test-slow  the slow tests (the zoo's label targets, full-size towers, console bombs, Ray): about 9 min; CI runs both"
	@echo "make bench    benchmarks (decomposition, shapes world, TextSpan, text encoding, warehouse, dashboard)"
	@echo "make bench-scale  the store at 1,000,000 images: synthetic shards (~27 GB, deleted after), attach, neighbours, TextSpan"
	@echo "make zoo      retrain the toy zoo by its recipe (CPU, hours; resumable)"
	@echo "make dashboard PORT=8501 ATLAS_HOME=var"
	@echo "make demo MODEL=ViT-B-16 PRETRAINED=laion2b_s34b_b88k IMAGES=path/to/images/"

setup: $(VENV)/.installed

# free disk (GB) a new .venv needs while pip installs: 7.2 GB installed plus pip's unpacking
SETUP_FREE_GB := 9

# pip shows what it downloads and installs; each step says how long it took. .venv ends up near 7 GB
# (torch and its CUDA libraries, onnxruntime-gpu, ray): see docs/install.md for measured times.
$(VENV)/.installed: requirements.txt
	@echo "[setup 1/2] $(VENV): a virtual environment, then pip itself"
	@start=$$(date +%s); { test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
		$(PY) -m pip install --upgrade --progress-bar on pip && \
		echo "[setup 1/2] done in $$(( $$(date +%s) - start )) s"
	@echo "[setup 2/2] requirements.txt (about 7 GB in .venv: torch with its CUDA libraries, onnxruntime-gpu, ray)"
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
		if [ "$$free" -lt $(SETUP_FREE_GB) ]; then \
		echo "[setup 2/2] warning: $$free GB free on this disk; a new .venv needs about $(SETUP_FREE_GB) GB while pip installs."; \
		echo "            If pip stops with 'No space left on device', free space (or set TMPDIR to a larger disk) and run make again."; fi
	@start=$$(date +%s); if $(PY) -m pip install --progress-bar on -r requirements.txt; then \
		echo "[setup 2/2] done in $$(( $$(date +%s) - start )) s; .venv holds $$(du -sh $(VENV) | cut -f1)"; \
		else echo "[setup 2/2] pip failed after $$(( $$(date +%s) - start )) s; free disk here: $$(df -Ph . | awk 'NR==2 {print $$4}')" \
		"(a new .venv needs about $(SETUP_FREE_GB) GB). pip's own error is above; make setup resumes where it stopped." >&2; exit 1; fi
	@touch $@

# One process for the whole zoo (torch is imported once): a line per model and step, then the time per
# phase. A rerun with nothing new loads no model and rewrites nothing.
etl: setup
ifeq ($(MODEL),)
	$(PY) -m etl run-zoo $(foreach m,$(ZOO) $(CONTROLS),--model $(m)) $(DATA_FLAGS) --warehouse $(WAREHOUSE)
	$(PY) -m etl study --in-place --warehouse $(WAREHOUSE)
else
	$(PY) -m etl run $(MODEL_FLAGS) $(DATA_FLAGS) --warehouse $(WAREHOUSE)
endif

# After the build, every page runs once headlessly so the costly parts (Metrics' charts, heads across
# models) are built for this warehouse version and kept beside it: the server's first visits read them.
demo: etl
	$(PY) -m dashboard.warm --warehouse $(WAREHOUSE)
	@echo "[demo] serving the dashboard at http://$(HOST):$(PORT) (Ctrl-C stops it)"
	@$(MAKE) --no-print-directory dashboard

# Retrain the shipped zoo by its recipe (CPU, resumable: re-run after an interruption). Every model with
# shipped weights; a name ending in -seedN was trained with --seed N, the others with --seed 0.
seed_of = $(or $(patsubst seed%,%,$(filter seed%,$(lastword $(subst -, ,$(1))))),0)
zoo: setup
	$(foreach m,$(TRAINED),$(PY) -m etl train-zoo --model $(m) --seed $(call seed_of,$(m)) &&) true

# Binds to 127.0.0.1; HOST=0.0.0.0 shares it on the network and then needs ATLAS_TOKEN.
dashboard: setup
	$(PY) -m dashboard --host $(HOST) --port $(PORT) --warehouse $(WAREHOUSE)

browser-deps:
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'; }

# The suite without the tests marked `slow` (pytest.ini): about 15 min on 2 cores.
test: setup browser-deps
	ATLAS_NO_PROGRESS=1 $(PY) -m pytest -q -m "not slow"

# The slow tests: the zoo's label targets on a held-out world, full-size random towers, console bombs,
# a Ray cluster, bounded memory at 2,000,000 manifest rows (about 9 min). CI runs `make test`, then this.
test-slow: setup browser-deps
	ATLAS_NO_PROGRESS=1 $(PY) -m pytest -q -m slow

# Everything in one run (about 24 min on 2 cores).
test-all: setup browser-deps
	ATLAS_NO_PROGRESS=1 $(PY) -m pytest -q

# The unit layer only (tests/unit: math, models, warehouse, console, text; no job subprocesses).
test-fast: setup
	ATLAS_NO_PROGRESS=1 $(PY) -m pytest -q tests/unit -m "not slow"

bench: setup
	$(PY) -m etl bench
	$(PY) -m dashboard.bench

# Not part of `bench`: a synthetic 1,000,000-image shard set (about 27 GB, in a temporary folder under
# $(ATLAS_HOME), deleted afterwards; the free disk is checked first). Last line: JSON, keys with `1m`.
bench-scale: setup
	$(PY) -m etl bench-scale

clean:
	rm -rf var tests/_artifacts
