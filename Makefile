# Fashion Tagger. `make tag` sets up what is missing and tags the built-in demo; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# make tag CATALOG=... [MODEL=... OUT=... RUN_DATE=... TAG_ARGS="--device cuda --batch-size 256"]
DEMO_DATA := data/demo
DEMO_MODEL := models/demo
CATALOG ?= $(DEMO_DATA)/catalog.csv
MODEL ?= $(DEMO_MODEL)
OUT ?= out/demo
RUN_DATE ?=
TAG_ARGS ?=
# The demo model: a tiny timm backbone trained from scratch on CPU through the real retrain job.
DEMO_RETRAIN_ARGS ?= --backbone test_resnet --no-pretrained --input-size 96 --batch-size 32 --lr 3e-3 --max-epochs 25 --max-minutes 1.5 --threads 1 --seed 0

.PHONY: setup tag test demo-data demo-model bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DEMO_DATA)/styles.csv: | $(STAMP)
	$(BIN)/tagger demo-data --out $(DEMO_DATA)

$(DEMO_MODEL)/model.json: | $(DEMO_DATA)/styles.csv
	$(BIN)/tagger retrain --data $(DEMO_DATA) --out $(DEMO_MODEL) $(DEMO_RETRAIN_ARGS)

demo-data: $(DEMO_DATA)/styles.csv
demo-model: $(DEMO_MODEL)/model.json

# The demo data and model are built only when the defaults point at them.
tag: $(STAMP) $(if $(filter $(DEMO_DATA)/catalog.csv,$(CATALOG)),$(DEMO_DATA)/styles.csv) $(if $(filter $(DEMO_MODEL),$(MODEL)),$(DEMO_MODEL)/model.json)
	$(BIN)/tagger tag --catalog '$(CATALOG)' --model '$(MODEL)' --out '$(OUT)' $(if $(RUN_DATE),--run-date $(RUN_DATE)) $(TAG_ARGS)
	$(if $(filter $(DEMO_DATA)/catalog.csv,$(CATALOG)),$(BIN)/tagger demo-check --out '$(OUT)' $(if $(RUN_DATE),--run-date $(RUN_DATE)) --truth $(DEMO_DATA)/catalog_truth.csv)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf out models/demo data/demo
