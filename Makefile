# The three commands a newcomer needs (see README): setup, demo, test.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup demo test test-all lint up down schemas bench bench-real

setup:  ## create the virtualenv and install the project with its dev tools
	python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"  # the CPU wheel first: keeps a CUDA build out
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --no-build-isolation -r requirements-torch-ext.txt
	# headless browser for the console test: the distro's build (test tools' downloads fail here)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver)

demo:  ## the main job end to end on the embedded default
	$(BIN)/chatreid demo

test: lint  ## lint, start the local servers, run the default (fast) suite
	$(BIN)/chatreid up --no-ray
	$(PY) -m pytest

test-all: lint  ## everything, slow tests included
	$(BIN)/chatreid up --no-ray
	$(PY) -m pytest -m ""

lint:  ## style, the layer contracts (.importlinter) and the type checker (pyrightconfig.json)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/basedpyright

up:
	$(BIN)/chatreid up
down:
	$(BIN)/chatreid down
schemas:  ## rewrite schemas/jsonschema after a deliberate contract change
	$(PY) -m schemas
bench:
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/prefilter_search.py
	$(PY) benchmarks/query_load.py
	$(PY) benchmarks/readme.py  # README figures from the JSON
bench-real:  ## real people (needs ../shared): imports, fine-tuning (~30 min), throughput
	$(PY) benchmarks/real_people.py --e2e
	$(PY) benchmarks/readme.py
