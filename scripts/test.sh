#!/usr/bin/env bash
# The test command: set up, lint, then the type check and the whole test suite (slow tests
# included) side by side, with line coverage of src/deltatune (a table per file, then the total).
# The documentation site is built with --strict (warnings are errors) by tests/test_docs_site.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks docs/scripts
ruff format --check src tests benchmarks docs/scripts
# mypy runs while the tests run (it is mostly one core's work for ~25 s on a clean clone);
# its report is printed after theirs, and either failing fails the command.
mypy_log="$(mktemp)"
trap 'rm -f "$mypy_log"' EXIT
mypy > "$mypy_log" 2>&1 &
mypy_pid=$!
status=0
python -m pytest -n 2 -q --cov=deltatune --cov-report=term "$@" || status=$?
if ! wait "$mypy_pid"; then
  status=1
fi
cat "$mypy_log"
exit "$status"
