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
# The toy zoo `make etl` builds when no MODEL is given: three sizes trained by one recipe, a second
# seed of the small one (every models/toy config with shipped weights), and a random-init control of
# the middle size. toy-shapes is built last: the dashboard opens on the last trained model built.
TRAINED := $(basename $(notdir $(wildcard models/toy/*.safetensors)))
ZOO := $(filter-out toy-shapes,$(TRAINED)) $(filter toy-shapes,$(TRAINED))
PRETRAINED ?=
CHECKPOINT ?=
IMAGES ?=
DATASET ?= shapes:2000:seed=0
WAREHOUSE ?= $(ATLAS_HOME)/warehouse.duckdb

MODEL_FLAGS := --model $(MODEL) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
DATA_FLAGS := $(if $(IMAGES),--dataset $(IMAGES),--dataset $(DATASET) --dataset skimage)

.PHONY: setup demo etl zoo dashboard test test-fast bench bench-scale browser-deps clean help

help:
	@echo "make demo     set up, build the default warehouse (the toy zoo + shapes world + scikit-image photos), serve the dashboard"
	@echo "make test     set up and run the test suite (installs Debian's chromium for the browser test)"
	@echo "make bench    benchmarks (decomposition, shapes world, TextSpan, text encoding, warehouse, dashboard)"
	@echo "make bench-scale  the store at 1,000,000 images: synthetic shards (~27 GB, deleted after), attach, neighbours, TextSpan"
	@echo "make zoo      retrain the toy zoo by its recipe (CPU, hours; resumable)"
	@echo "make dashboard PORT=8501 ATLAS_HOME=var"
	@echo "make demo MODEL=ViT-B-16 PRETRAINED=laion2b_s34b_b88k IMAGES=path/to/images/"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

etl: setup
ifeq ($(MODEL),)
	@set -e; for m in $(ZOO); do \
		$(PY) -m etl run --model $$m $(DATA_FLAGS) --warehouse $(WAREHOUSE); done
	$(PY) -m etl run --model toy-shapes --random-init --seed 0 $(DATA_FLAGS) --warehouse $(WAREHOUSE)
else
	$(PY) -m etl run $(MODEL_FLAGS) $(DATA_FLAGS) --warehouse $(WAREHOUSE)
endif

demo: etl dashboard

# Retrain the shipped zoo by its recipe (CPU, resumable: re-run after an interruption).
zoo: setup
	$(PY) -m etl train-zoo --model toy-shapes-small --seed 0
	$(PY) -m etl train-zoo --model toy-shapes-small-seed1 --seed 1
	$(PY) -m etl train-zoo --model toy-shapes --seed 0
	$(PY) -m etl train-zoo --model toy-shapes-large --seed 0
	$(PY) -m etl train-zoo --model toy-shapes-map --seed 0

# Binds to 127.0.0.1; HOST=0.0.0.0 shares it on the network and then needs ATLAS_TOKEN.
dashboard: setup
	$(PY) -m dashboard --host $(HOST) --port $(PORT) --warehouse $(WAREHOUSE)

browser-deps:
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'; }

test: setup browser-deps
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
