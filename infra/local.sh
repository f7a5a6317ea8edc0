#!/usr/bin/env bash
# Usage: bash infra/local.sh [--mode auto|memory|pubsub] [--workers N] [--real-vertex]
#
# Runs vertex-dispatcher on this machine, from a clean clone:
#   - creates .venv (Python >= 3.11) and installs the project;
#   - starts the Vertex stand-in (a development tool that speaks Vertex's REST
#     shapes) unless --real-vertex is given (then GOOGLE_CLOUD_PROJECT, MODEL_ID
#     and MODEL_CONFIG must be set and Application Default Credentials work);
#   - mode pubsub (the default when gcloud and its emulator components are
#     installed): the Firestore and Pub/Sub emulators, the worker, the topic and
#     the push subscription to the worker, and the ingress;
#   - --workers N (mode pubsub; N >= 1, used even for 1): N workers instead,
#     the first on WORKER_PORT and the others on free ports, fed from a pull
#     subscription by dispatcher_devtools.push_relay, which keeps many pushes
#     outstanding and sends each to the least busy worker, like Pub/Sub push and
#     Cloud Run (the emulator's own push sends about one message at a time);
#   - mode memory (the default otherwise): the ingress alone, jobs in memory;
#   - prints where to send requests, and stops everything on Ctrl-C.
# Ports: INGRESS_PORT (8080), WORKER_PORT (8081), STANDIN_PORT (8090),
# PUBSUB_PORT (8085), FIRESTORE_PORT (8086). Logs go to .local-stack/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export VENV=${VENV:-.venv}
STATE="$ROOT/.local-stack"
INGRESS_PORT=${INGRESS_PORT:-8080}
WORKER_PORT=${WORKER_PORT:-8081}
STANDIN_PORT=${STANDIN_PORT:-8090}
PUBSUB_PORT=${PUBSUB_PORT:-8085}
FIRESTORE_PORT=${FIRESTORE_PORT:-8086}
MODE=auto
REAL_VERTEX=false
WORKERS=''  # empty: one worker, pushed to by the emulator's push subscription

die() { echo "infra/local.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) [ $# -ge 2 ] || die "--mode needs a value"; MODE=$2; shift 2 ;;
    --real-vertex) REAL_VERTEX=true; shift ;;
    --workers) [ $# -ge 2 ] || die "--workers needs a value"; WORKERS=$2; shift 2 ;;
    # The comment block at the top, up to the first line of code.
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$MODE" in auto|memory|pubsub) ;; *) die "--mode must be auto, memory or pubsub" ;; esac
case "$WORKERS" in
  '') ;;
  *[!0-9]*|0*) die "--workers must be a whole number of at least 1, not '$WORKERS'" ;;
esac
[ -z "$WORKERS" ] || [ "$MODE" != memory ] || die "--workers needs mode pubsub, not memory"

bash infra/venv.sh dev

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
[ -z "$WORKERS" ] || [ "$MODE" = pubsub ] || die "--workers needs mode pubsub (gcloud and its emulators)"

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
  did_not_start "$1"
}
wait_for_log() { # wait_for_log NAME TEXT: until NAME's log holds TEXT
  for _ in $(seq 1 120); do
    if grep -q "$2" "$STATE/$1.log" 2>/dev/null; then return 0; fi
    kill -0 "${PID_OF[$1]}" 2>/dev/null || break
    sleep 0.5
  done
  did_not_start "$1"
}
did_not_start() {
  echo "infra/local.sh: $1 did not start; its log:" >&2
  tail -n 30 "$STATE/$1.log" >&2
  exit 1
}
free_port() { # a port nobody listens on now (the worker binds it a moment later)
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
emulator_put() { # emulator_put PATH JSON: create a Pub/Sub resource through the REST API
  local code
  code=$(curl -sS --noproxy '*' -o "$STATE/pubsub-setup.log" -w '%{http_code}' -X PUT \
    -H 'Content-Type: application/json' -d "$2" \
    "http://127.0.0.1:$PUBSUB_PORT/v1/projects/$GOOGLE_CLOUD_PROJECT/$1")
  # 409: it exists already, which is what we want.
  [ "$code" = 200 ] || [ "$code" = 409 ] \
    || die "creating $1 in the Pub/Sub emulator answered $code: $(cat "$STATE/pubsub-setup.log")"
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
  start standin "$VENV/bin/python" -m dispatcher_devtools.vertex_standin \
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
  # The jobs of priority=interactive keys: a topic and push of their own (README).
  export INTERACTIVE_TOPIC=${INTERACTIVE_TOPIC:-$PUBSUB_TOPIC-interactive}
  WORKER_URLS=()
  for i in $(seq 1 "${WORKERS:-1}"); do
    if [ "$i" = 1 ]; then name=worker port=$WORKER_PORT; else name=worker-$i port=$(free_port); fi
    HOST=127.0.0.1 PORT=$port start "$name" "$VENV/bin/python" -m worker
    WORKER_URLS+=("http://127.0.0.1:$port/")
  done
  for i in $(seq 1 "${WORKERS:-1}"); do
    if [ "$i" = 1 ]; then name=worker; else name=worker-$i; fi
    wait_for "$name" "${WORKER_URLS[$((i - 1))]}healthz" ok
  done
  for topic in "$PUBSUB_TOPIC" "$INTERACTIVE_TOPIC"; do
    if [ -z "$WORKERS" ]; then
      CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB="http://127.0.0.1:$PUBSUB_PORT/" \
      CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true CLOUDSDK_CORE_PROJECT="$GOOGLE_CLOUD_PROJECT" \
        bash infra/pubsub.sh --project "$GOOGLE_CLOUD_PROJECT" --topic "$topic" \
          --subscription "$topic-push" --push-endpoint "http://127.0.0.1:$WORKER_PORT/" \
          --ack-deadline 600 --min-retry-delay 1s --max-retry-delay 60s >>"$STATE/pubsub-setup.log"
      PUSHER="pushed to by the Pub/Sub emulator"
    else
      # No retry policy on the pull subscription: the relay waits out the backoff itself
      # and keeps extending the ack deadline of what it holds (see push_relay.py).
      emulator_put "topics/$topic" '{}'
      emulator_put "subscriptions/$topic-pull" \
        "{\"topic\": \"projects/$GOOGLE_CLOUD_PROJECT/topics/$topic\", \"ackDeadlineSeconds\": 60}"
      relay_args=()
      for url in "${WORKER_URLS[@]}"; do relay_args+=(--worker "$url"); done
      if [ "$topic" = "$PUBSUB_TOPIC" ]; then name=relay; else name=relay-interactive; fi
      # The same push timeout and retry delays as the emulator push subscription above.
      start "$name" "$VENV/bin/python" -m dispatcher_devtools.push_relay \
        --subscription "projects/$GOOGLE_CLOUD_PROJECT/subscriptions/$topic-pull" \
        "${relay_args[@]}" --ack-deadline-s 600 --min-backoff-s 1 --max-backoff-s 60
      wait_for_log "$name" "push-relay:"
      PUSHER="pushed to by dispatcher_devtools.push_relay"
    fi
  done
fi

HOST=127.0.0.1 PORT=$INGRESS_PORT start ingress "$VENV/bin/python" -m ingress
wait_for ingress "http://127.0.0.1:$INGRESS_PORT/healthz" ok

cat <<EOF

vertex-dispatcher is running (mode: $MODE; Vertex: $([ "$REAL_VERTEX" = true ] && echo real || echo "stand-in on :$STANDIN_PORT")).
  ingress  http://127.0.0.1:$INGRESS_PORT$([ "$MODE" = pubsub ] && printf '\n  worker   %s (%s)' "${WORKER_URLS[*]}" "$PUSHER")
  logs     $STATE/*.log

Submit a job and poll it:
  curl -s -X POST http://127.0.0.1:$INGRESS_PORT/generate -H 'Content-Type: application/json' \\
    -d '{"contents": [{"role": "user", "parts": [{"text": "Explain quantum computing simply."}]}]}'
  curl -s http://127.0.0.1:$INGRESS_PORT/jobs/JOB_ID

Ctrl-C stops everything.
EOF
wait
