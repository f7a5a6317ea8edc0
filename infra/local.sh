#!/usr/bin/env bash
# Usage: bash infra/local.sh [--mode auto|memory|pubsub] [--real-vertex]
#
# Runs vertex-dispatcher on this machine, from a clean clone:
#   - creates .venv (Python >= 3.11) and installs the project;
#   - starts the Vertex stand-in (a development tool that speaks Vertex's REST
#     shapes) unless --real-vertex is given (then GOOGLE_CLOUD_PROJECT, MODEL_ID
#     and MODEL_CONFIG must be set and Application Default Credentials work);
#   - mode pubsub (the default when gcloud and its emulator components are
#     installed): the Firestore and Pub/Sub emulators, the worker, the topic and
#     the push subscription to the worker, and the ingress;
#   - mode memory (the default otherwise): the ingress alone, jobs in memory;
#   - prints where to send requests, and stops everything on Ctrl-C.
# Ports: INGRESS_PORT (8080), WORKER_PORT (8081), STANDIN_PORT (8090),
# PUBSUB_PORT (8085), FIRESTORE_PORT (8086). Logs go to .local-stack/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STATE="$ROOT/.local-stack"
INGRESS_PORT=${INGRESS_PORT:-8080}
WORKER_PORT=${WORKER_PORT:-8081}
STANDIN_PORT=${STANDIN_PORT:-8090}
PUBSUB_PORT=${PUBSUB_PORT:-8085}
FIRESTORE_PORT=${FIRESTORE_PORT:-8086}
MODE=auto
REAL_VERTEX=false

die() { echo "infra/local.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) [ $# -ge 2 ] || die "--mode needs a value"; MODE=$2; shift 2 ;;
    --real-vertex) REAL_VERTEX=true; shift ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$MODE" in auto|memory|pubsub) ;; *) die "--mode must be auto, memory or pubsub" ;; esac

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$("$PYTHON" --version 2>&1) is too old; Python 3.11 or newer is needed"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Install once per version of pyproject.toml (a re-install costs ~20 s).
stamp="$VENV/.installed-$(cksum pyproject.toml | cut -d' ' -f1)-dev"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

emulators_present() {
  command -v gcloud >/dev/null 2>&1 && command -v java >/dev/null 2>&1 || return 1
  local sdk
  sdk=$(dirname "$(dirname "$(readlink -f "$(command -v gcloud)")")")
  [ -d "$sdk/platform/pubsub-emulator" ] && [ -d "$sdk/platform/cloud-firestore-emulator" ]
}
if [ "$MODE" = auto ]; then
  if emulators_present; then MODE=pubsub; else MODE=memory; fi
fi
if [ "$MODE" = pubsub ] && ! emulators_present; then
  die "mode pubsub needs gcloud, java and the emulators: gcloud components install beta pubsub-emulator cloud-firestore-emulator"
fi

mkdir -p "$STATE"
# Never let google-auth probe a metadata server from a laptop or a CI box.
export NO_GCE_CHECK=True GCE_METADATA_HOST=127.0.0.1:9 GCE_METADATA_IP=127.0.0.1:9
export CLOUDSDK_CORE_DISABLE_PROMPTS=1 CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK=true
export CLOUDSDK_CORE_DISABLE_USAGE_REPORTING=true
PIDS=()
declare -A PID_OF=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME COMMAND...: run in its own process group, output to .local-stack/NAME.log
start() {
  local name=$1; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 &
  PIDS+=("$!")
  PID_OF[$name]=$!
}
wait_for() { # wait_for NAME URL EXPECTED
  for _ in $(seq 1 120); do
    if curl -fsS --noproxy '*' "$2" 2>/dev/null | grep -q "$3"; then return 0; fi
    kill -0 "${PID_OF[$1]}" 2>/dev/null || break
    sleep 0.5
  done
  echo "infra/local.sh: $1 did not start; its log:" >&2
  tail -n 30 "$STATE/$1.log" >&2
  exit 1
}

if [ "$REAL_VERTEX" = true ]; then
  : "${GOOGLE_CLOUD_PROJECT:?set GOOGLE_CLOUD_PROJECT for --real-vertex}"
  : "${MODEL_ID:?set MODEL_ID for --real-vertex}"
  : "${MODEL_CONFIG:?set MODEL_CONFIG for --real-vertex}"
  unset VERTEX_API_ENDPOINT
else
  export GOOGLE_CLOUD_PROJECT=${GOOGLE_CLOUD_PROJECT:-local-project}
  export MODEL_ID=${MODEL_ID:-gemini-2.5-flash}
  export MODEL_CONFIG=${MODEL_CONFIG:-"[{\"model_id\": \"$MODEL_ID\", \"supported_regions\": [\"us-central1\", \"us-east4\", \"europe-west4\", \"asia-northeast1\"]}]"}
  export VERTEX_API_ENDPOINT="http://127.0.0.1:$STANDIN_PORT"
  start standin "$VENV/bin/python" -m dispatcher.devtools.vertex_standin \
    --host 127.0.0.1 --port "$STANDIN_PORT" --config '{"default": {"latency_s": 0.2}}'
  wait_for standin "http://127.0.0.1:$STANDIN_PORT/healthz" ok
fi

if [ "$MODE" = pubsub ]; then
  mkdir -p "$STATE/pubsub-data"  # gcloud does not create its --data-dir
  start firestore gcloud beta emulators firestore start --host-port="127.0.0.1:$FIRESTORE_PORT"
  start pubsub gcloud beta emulators pubsub start --host-port="127.0.0.1:$PUBSUB_PORT" \
    --data-dir="$STATE/pubsub-data"
  wait_for firestore "http://127.0.0.1:$FIRESTORE_PORT/" Ok
  wait_for pubsub "http://127.0.0.1:$PUBSUB_PORT/" Ok
  export FIRESTORE_EMULATOR_HOST="127.0.0.1:$FIRESTORE_PORT"
  export PUBSUB_EMULATOR_HOST="127.0.0.1:$PUBSUB_PORT"
  export FIRESTORE_COLLECTION=${FIRESTORE_COLLECTION:-jobs} FIRESTORE_DATABASE='(default)'
  export PUBSUB_TOPIC=${PUBSUB_TOPIC:-dispatcher-jobs}
  HOST=127.0.0.1 PORT=$WORKER_PORT start worker "$VENV/bin/python" -m worker
  wait_for worker "http://127.0.0.1:$WORKER_PORT/healthz" ok
  CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB="http://127.0.0.1:$PUBSUB_PORT/" \
  CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true CLOUDSDK_CORE_PROJECT="$GOOGLE_CLOUD_PROJECT" \
    bash infra/pubsub.sh --project "$GOOGLE_CLOUD_PROJECT" --topic "$PUBSUB_TOPIC" \
      --subscription "$PUBSUB_TOPIC-push" --push-endpoint "http://127.0.0.1:$WORKER_PORT/" \
      --ack-deadline 600 --min-retry-delay 1s --max-retry-delay 60s >"$STATE/pubsub-setup.log"
fi

HOST=127.0.0.1 PORT=$INGRESS_PORT start ingress "$VENV/bin/python" -m ingress
wait_for ingress "http://127.0.0.1:$INGRESS_PORT/healthz" ok

cat <<EOF

vertex-dispatcher is running (mode: $MODE; Vertex: $([ "$REAL_VERTEX" = true ] && echo real || echo "stand-in on :$STANDIN_PORT")).
  ingress  http://127.0.0.1:$INGRESS_PORT$([ "$MODE" = pubsub ] && printf '\n  worker   http://127.0.0.1:%s (pushed to by the Pub/Sub emulator)' "$WORKER_PORT")
  logs     $STATE/*.log

Submit a job and poll it:
  curl -s -X POST http://127.0.0.1:$INGRESS_PORT/generate -H 'Content-Type: application/json' \\
    -d '{"contents": [{"role": "user", "parts": [{"text": "Explain quantum computing simply."}]}]}'
  curl -s http://127.0.0.1:$INGRESS_PORT/jobs/JOB_ID

Ctrl-C stops everything.
EOF
wait
