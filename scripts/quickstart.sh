#!/usr/bin/env bash
# The main job on the embedded default: set up, then fine-tune the bundled all-MiniLM-L6-v2 with
# LoRA on the embedded fortunes dataset and print held-out accuracy before and after.
# Extra arguments go to `deltatune train` (e.g. `bash scripts/quickstart.sh dora`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
deltatune train "$@"
