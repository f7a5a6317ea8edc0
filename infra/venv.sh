#!/usr/bin/env bash
# Usage: bash infra/venv.sh [EXTRAS]    (e.g. dev, or dev,bench; default dev)
#
# Creates .venv (Python >= 3.11; $PYTHON and $VENV override) and installs, editable, the
# three distributions of this repository: the services (., with EXTRAS), the command-line
# client (cli/) and the development tools (devtools/: the Vertex stand-in, the push relay).
# Installs once per version of the three pyproject.toml files and the extras (a re-install
# costs ~20 s). Used by infra/local.sh, tests/run.sh and tests/benchmarks/run.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
case ${1:-} in
  -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" | sed '/^$/,$d'; exit 0 ;;
esac
EXTRAS=${1:-dev}

die() { echo "infra/venv.sh: $*" >&2; exit 2; }
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer (or set PYTHON)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$("$PYTHON" --version 2>&1) is too old; Python 3.11 or newer is needed"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.installed-$(cat pyproject.toml cli/pyproject.toml devtools/pyproject.toml | cksum | cut -d' ' -f1)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e ".[$EXTRAS]" -e ./cli -e ./devtools
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
