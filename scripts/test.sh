#!/usr/bin/env bash
# The test command: set up, lint, type-check, build the documentation site (warnings are errors),
# then the whole test suite (slow tests included) with line coverage of src/deltatune (a table per
# file, then the total).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks docs/scripts
ruff format --check src tests benchmarks docs/scripts
mypy
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"
rm -rf "$site"
python -m pytest -n 2 -q --cov=deltatune --cov-report=term "$@"
