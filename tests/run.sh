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
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "tests/run.sh: $PYTHON not found; install Python 3.11 or newer (or set PYTHON)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "tests/run.sh: $("$PYTHON" --version 2>&1) is too old; Python 3.11 or newer is needed" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Install once per version of pyproject.toml (a re-install costs ~20 s).
stamp="$VENV/.installed-$(cksum pyproject.toml | cut -d' ' -f1)-dev"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

echo "== ruff check, ruff format --check, mypy --strict"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"

echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
