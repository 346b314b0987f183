#!/usr/bin/env bash
# The test command: set up, lint, type-check, then the whole test suite (slow tests included) with
# line coverage of src/deltatune (a table per file, then the total).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
python -m pytest -n 2 -q --cov=deltatune --cov-report=term "$@"
