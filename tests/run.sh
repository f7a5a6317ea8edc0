#!/usr/bin/env bash
# Usage: bash tests/run.sh [PYTEST_ARGS...]
#
# Runs the whole test suite from a clean clone: creates .venv (Python >= 3.11),
# installs the project with its dev extras, checks lint, formatting and types,
# then runs pytest (unit and integration tiers; the integration tier starts the
# Firestore and Pub/Sub emulators itself and is skipped, with the reason, where
# gcloud or its emulator components are missing). Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export VENV=${VENV:-.venv}
bash infra/venv.sh dev

echo "== ruff check, ruff format --check, mypy --strict"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"

echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
