#!/usr/bin/env bash
# Usage: bash tests/benchmarks/run.sh [PYTEST_ARGS...]
#
# Runs the benchmark suite (tests/benchmarks/, about 10 minutes on 2 cores) and writes
# BENCHMARKS.md and the charts in docs/benchmarks/. Creates .venv if needed, installs
# the project with its dev and bench extras, and needs `wrk` (Debian's package: installed
# here with apt-get when running as root, otherwise a clear error). Mode 3 needs gcloud
# with the Firestore and Pub/Sub emulators (as for tests/run.sh); without them its rows
# are skipped and the report says so. Extra arguments go to pytest (e.g. -k memory).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export VENV=${VENV:-.venv}

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing wrk (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "tests/benchmarks/run.sh: wrk not found; install it (Debian/Ubuntu: sudo apt-get install -y wrk)" >&2
    exit 2
  fi
fi
bash infra/venv.sh dev,bench

# pyproject's addopts leave tests/benchmarks out of the normal run; replace them here.
# py-spy (from the bench extra) samples the ingress; it is on the venv's PATH.
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest tests/benchmarks \
  -o addopts="" -p no:cacheprovider --strict-markers -s -q -ra "$@"
