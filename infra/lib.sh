#!/usr/bin/env bash
#
# Helpers shared by the infra scripts: messages, --dry-run, a config reader that
# never evaluates the file, and validation that names the setting at fault.
# Sourced by deploy.sh, teardown.sh and pubsub.sh (which set the same strict
# mode); run on its own it only prints its usage line.
#
# Conventions:
#   - stdout carries only what the caller asked for: under --dry-run, the gcloud
#     commands, one per line, shell-quoted and prefixed by "+ ".
#   - everything meant for a person (progress, warnings, errors) goes to stderr.
set -euo pipefail

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  lib_usage='Usage: source infra/lib.sh from deploy.sh, teardown.sh or pubsub.sh; run alone, it does nothing'
  case ${1:-} in
    -h | --help) echo "$lib_usage" ;;
    *)
      echo "$lib_usage" >&2
      exit 1
      ;;
  esac
  exit 0
fi

# Never let gcloud stop at a prompt ("enable this API? [y/N]") in a script.
: "${CLOUDSDK_CORE_DISABLE_PROMPTS:=1}"
export CLOUDSDK_CORE_DISABLE_PROMPTS

DRY_RUN=false

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# print_cmd ARG...: one line, "+ " then each argument quoted for the shell.
print_cmd() {
  local line='+' arg
  for arg in "$@"; do
    line+=" $(printf '%q' "$arg")"
  done
  printf '%s\n' "$line"
}

# run CMD...: run a command that changes something; under --dry-run, print it instead.
# A real run echoes the command to stderr first, so the log shows what was done.
run() {
  if [[ $DRY_RUN == true ]]; then
    print_cmd "$@"
  else
    print_cmd "$@" >&2
    "$@"
  fi
}

# run_retrying CMD...: like run, retried with backoff. For IAM bindings on
# accounts created seconds ago: IAM is eventually consistent and may still
# answer that the member does not exist.
# https://cloud.google.com/iam/docs/service-accounts-create#creating
run_retrying() {
  if [[ $DRY_RUN == true ]]; then
    print_cmd "$@"
    return 0
  fi
  local attempt=1 attempts=${RETRY_ATTEMPTS:-6} delay=5
  print_cmd "$@" >&2
  until "$@"; do
    if ((attempt >= attempts)); then
      return 1
    fi
    warn "attempt $attempt of $attempts failed; retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

# exists CMD...: whether a read-only check (a `describe`) succeeds. Always false
# under --dry-run, which therefore prints the commands of a first deployment
# onto an empty project; a real run skips or updates what already exists.
exists() {
  [[ $DRY_RUN == true ]] && return 1
  "$@" >/dev/null 2>&1
}

# lookup PLACEHOLDER CMD...: print the command's output, or PLACEHOLDER under
# --dry-run (for values only a real run can know, such as a service URL).
lookup() {
  local placeholder=$1
  shift
  if [[ $DRY_RUN == true ]]; then
    printf '%s\n' "$placeholder"
  else
    "$@"
  fi
}

# require_tool NAME HINT: fail with one clear message when NAME is not on PATH.
require_tool() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

# need_value OPTION ARGS...: check that OPTION was given a value (the next argument).
need_value() {
  local option=$1
  shift
  if (($# == 0)) || [[ $1 == --* ]]; then
    die "$option needs a value (see -h)"
  fi
}

# parse_options HANDLER ARG...: the scripts' one option loop. Splits --name=value,
# answers -h/--help (the script's `usage`) and --dry-run, and passes each other
# option to `HANDLER OPTION REST...`, which returns 1 for an option it does not know
# and calls `take_value "$@"` (then reads $2) for one that has a value.
parse_options() {
  local handler=$1 option
  shift
  while (($#)); do
    option=$1
    shift
    if [[ $option == --*=* ]]; then
      set -- "${option#*=}" "$@"
      option=${option%%=*}
    fi
    case $option in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=true ;;
      *)
        OPTION_VALUES=0
        "$handler" "$option" "$@" || die "unknown option $option (see -h)"
        shift "$OPTION_VALUES"
        ;;
    esac
  done
}

# take_value OPTION REST...: inside a parse_options handler, OPTION has a value ($2).
take_value() {
  need_value "$@"
  OPTION_VALUES=1
}

# load_config FILE KEY...: read KEY=VALUE lines into shell variables.
#
# The file is read, never sourced: no command substitution, no expansion, no
# escapes. A value may be wrapped in one pair of single or double quotes, which
# are removed; everything between them is kept as written, so JSON such as
# MODEL_CONFIG needs no escaping. Comments are whole lines starting with "#"
# (a "#" after a value is part of the value). Only the listed KEYs are
# accepted, so a misspelt setting is an error rather than silently ignored.
# The KEYs are unset first: only the file decides, not the caller's environment.
load_config() {
  local file=$1
  shift
  local allowed=" $* " key value line number=0
  for key in "$@"; do
    unset "$key"
  done
  [[ -f $file ]] || die "config file not found: $file (start from infra/config.env.example)"
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if ! [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
      die "$file:$number: expected KEY=VALUE, found: $line"
    fi
    key=${BASH_REMATCH[2]}
    value=${BASH_REMATCH[3]}
    [[ $allowed == *" $key "* ]] || die "$file:$number: unknown setting $key"
    if [[ $value =~ ^\'(.*)\'[[:space:]]*$ ]] || [[ $value =~ ^\"(.*)\"[[:space:]]*$ ]]; then
      value=${BASH_REMATCH[1]}
    else
      value=${value%"${value##*[![:space:]]}"}
    fi
    printf -v "$key" '%s' "$value"
  done <"$file"
}

# Validation. Each check prints one line naming the setting and returns 1, so a
# caller can report every problem at once before giving up.
check_set() {
  [[ -n ${!1:-} ]] && return 0
  printf 'error: missing setting %s%s\n' "$1" "${2:+ ($2)}" >&2
  return 1
}

check_int() { # NAME MIN MAX
  local value=${!1:-}
  if [[ $value =~ ^[0-9]+$ ]] && ((10#$value >= $2 && 10#$value <= $3)); then
    return 0
  fi
  printf 'error: %s must be a whole number from %s to %s, got %q\n' "$1" "$2" "$3" "$value" >&2
  return 1
}

check_bool() {
  case ${!1:-} in
    true | false) return 0 ;;
    *) ;;
  esac
  printf 'error: %s must be true or false, got %q\n' "$1" "${!1:-}" >&2
  return 1
}

check_duration() { # NAME: whole seconds with an "s", 0s to 600s (Pub/Sub retry policy)
  local value=${!1:-}
  if [[ $value =~ ^([0-9]+)s$ ]] && ((10#${BASH_REMATCH[1]} <= 600)); then
    return 0
  fi
  printf 'error: %s must be a duration from 0s to 600s such as 10s, got %q\n' "$1" "$value" >&2
  return 1
}

check_match() { # NAME REGEX DESCRIPTION
  [[ ${!1:-} =~ $2 ]] && return 0
  printf 'error: %s must be %s, got %q\n' "$1" "$3" "${!1:-}" >&2
  return 1
}

# json_string VALUE: VALUE as a JSON string literal. Control characters are
# refused rather than escaped: no setting needs them.
json_string() {
  local value=$1
  if [[ $value =~ [[:cntrl:]] ]]; then
    return 1
  fi
  value=${value//\\/\\\\}
  value=${value//\"/\\\"}
  printf '"%s"' "$value"
}

# write_env_file FILE NAME=VALUE...: the file for `gcloud run deploy --env-vars-file`.
# gcloud reads it as YAML or JSON; JSON is written because its quoting is exact:
# MODEL_CONFIG keeps its commas, quotes and any "#" or "^" untouched, which
# --set-env-vars only manages with the ^#^ delimiter trick.
write_env_file() {
  local file=$1 pair name value separator='' quoted
  shift
  {
    printf '{\n'
    for pair in "$@"; do
      name=${pair%%=*}
      value=${pair#*=}
      quoted=$(json_string "$value") || die "$name contains a control character (a newline?)"
      printf '%s  "%s": %s' "$separator" "$name" "$quoted"
      separator=$',\n'
    done
    printf '\n}\n'
  } >"$file"
}

# ---------------------------------------------------------------------------
# The settings of deploy.sh and teardown.sh (documented in config.env.example).

DEPLOY_SETTINGS=(
  PROJECT_ID REGION MODEL_ID MODEL_CONFIG
  FIRESTORE_DATABASE FIRESTORE_LOCATION FIRESTORE_COLLECTION
  ARTIFACT_REPOSITORY IMAGE_TAG
  INGRESS_SERVICE WORKER_SERVICE INGRESS_SA WORKER_SA INVOKER_SA
  PUBSUB_TOPIC PUSH_SUBSCRIPTION INTERACTIVE_TOPIC INTERACTIVE_SUBSCRIPTION
  DEAD_LETTER_TOPIC DEAD_LETTER_SUBSCRIPTION RESULTS_TOPIC
  WEBHOOKS WEBHOOK_SUBSCRIPTION WEBHOOK_SECRET WEBHOOK_ALLOW_HOSTS WEBHOOK_DELIVERY_MAX_S
  ACK_DEADLINE_S MAX_DELIVERY_ATTEMPTS MIN_RETRY_DELAY MAX_RETRY_DELAY PUSH_AUDIENCE
  WORKER_TIMEOUT_S WORKER_CONCURRENCY WORKER_MIN_INSTANCES WORKER_MAX_INSTANCES
  WORKER_CPU WORKER_MEMORY WORKER_CPU_THROTTLING WORKER_INGRESS
  INGRESS_PUBLIC INGRESS_TIMEOUT_S INGRESS_CONCURRENCY INGRESS_MIN_INSTANCES
  INGRESS_MAX_INSTANCES INGRESS_CPU INGRESS_MEMORY
  VERTEX_MAX_RETRIES VERTEX_BACKOFF_INITIAL_S VERTEX_BACKOFF_MAX_S VERTEX_TIMEOUT_S
  JOB_TTL_S LOG_LEVEL
)

# load_deploy_config FILE: read the settings, fill in defaults and derive the
# names every step uses (service account emails, image references).
load_deploy_config() {
  load_config "$1" "${DEPLOY_SETTINGS[@]}"
  # Required, or optional without a default here (the services' own defaults
  # apply to the VERTEX_* and JOB_TTL_S values left empty).
  : "${PROJECT_ID:=}" "${REGION:=}" "${MODEL_ID:=}" "${MODEL_CONFIG:=}" "${IMAGE_TAG:=}"
  : "${PUSH_AUDIENCE:=}" "${VERTEX_MAX_RETRIES:=}" "${VERTEX_BACKOFF_INITIAL_S:=}"
  : "${VERTEX_BACKOFF_MAX_S:=}" "${VERTEX_TIMEOUT_S:=}" "${JOB_TTL_S:=}"
  : "${FIRESTORE_DATABASE:=vertex-dispatcher}"
  : "${FIRESTORE_LOCATION:=${REGION:-}}"
  : "${FIRESTORE_COLLECTION:=jobs}"
  : "${ARTIFACT_REPOSITORY:=vertex-dispatcher}"
  : "${INGRESS_SERVICE:=dispatcher-ingress}"
  : "${WORKER_SERVICE:=dispatcher-worker}"
  : "${INGRESS_SA:=dispatcher-ingress}"
  : "${WORKER_SA:=dispatcher-worker}"
  : "${INVOKER_SA:=dispatcher-push-invoker}"
  : "${PUBSUB_TOPIC:=dispatcher-jobs}"
  : "${PUSH_SUBSCRIPTION:=$PUBSUB_TOPIC-push}"
  : "${INTERACTIVE_TOPIC:=$PUBSUB_TOPIC-interactive}"
  : "${INTERACTIVE_SUBSCRIPTION:=$INTERACTIVE_TOPIC-push}"
  : "${DEAD_LETTER_TOPIC:=$PUBSUB_TOPIC-dead-letter}"
  : "${DEAD_LETTER_SUBSCRIPTION:=$DEAD_LETTER_TOPIC-sub}"
  : "${RESULTS_TOPIC:=}"
  : "${WEBHOOKS:=false}" "${WEBHOOK_SECRET:=}" "${WEBHOOK_ALLOW_HOSTS:=}" "${WEBHOOK_DELIVERY_MAX_S:=}"
  : "${WEBHOOK_SUBSCRIPTION:=${RESULTS_TOPIC:-results}-webhooks}"
  : "${ACK_DEADLINE_S:=600}"
  : "${MAX_DELIVERY_ATTEMPTS:=5}"
  : "${MIN_RETRY_DELAY:=10s}"
  : "${MAX_RETRY_DELAY:=600s}"
  : "${WORKER_TIMEOUT_S:=$ACK_DEADLINE_S}"
  : "${WORKER_CONCURRENCY:=1000}"
  : "${WORKER_MIN_INSTANCES:=0}"
  : "${WORKER_MAX_INSTANCES:=10}"
  : "${WORKER_CPU:=1}"
  : "${WORKER_MEMORY:=512Mi}"
  : "${WORKER_CPU_THROTTLING:=true}"
  : "${WORKER_INGRESS:=internal}"
  : "${INGRESS_PUBLIC:=false}"
  : "${INGRESS_TIMEOUT_S:=60}"
  : "${INGRESS_CONCURRENCY:=80}"
  : "${INGRESS_MIN_INSTANCES:=0}"
  : "${INGRESS_MAX_INSTANCES:=10}"
  : "${INGRESS_CPU:=1}"
  : "${INGRESS_MEMORY:=512Mi}"
  : "${LOG_LEVEL:=INFO}"

  # shellcheck disable=SC2034 # used by deploy.sh and teardown.sh
  INGRESS_SA_EMAIL="$INGRESS_SA@${PROJECT_ID:-}.iam.gserviceaccount.com"
  # shellcheck disable=SC2034
  WORKER_SA_EMAIL="$WORKER_SA@${PROJECT_ID:-}.iam.gserviceaccount.com"
  # shellcheck disable=SC2034
  INVOKER_SA_EMAIL="$INVOKER_SA@${PROJECT_ID:-}.iam.gserviceaccount.com"
  # shellcheck disable=SC2034
  IMAGE_BASE="${REGION:-}-docker.pkg.dev/${PROJECT_ID:-}/$ARTIFACT_REPOSITORY"
}

# check_names: the identifiers both scripts use, checked before anything runs.
check_names() {
  local problems=0
  check_set PROJECT_ID || problems=1
  check_set REGION || problems=1
  if ((problems)); then return 1; fi
  check_match PROJECT_ID '^[a-z][a-z0-9-]{4,28}[a-z0-9]$' 'a project id (6-30 of a-z 0-9 -)' || problems=1
  check_match REGION '^[a-z]+-[a-z]+[0-9]+$' 'a Cloud Run region such as us-central1' || problems=1
  local name
  for name in INGRESS_SERVICE WORKER_SERVICE; do
    check_match "$name" '^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$' 'a Cloud Run service name (a-z 0-9 -, at most 49)' || problems=1
  done
  for name in INGRESS_SA WORKER_SA INVOKER_SA; do
    check_match "$name" '^[a-z][a-z0-9-]{4,28}[a-z0-9]$' 'a service account id (6-30 of a-z 0-9 -)' || problems=1
  done
  for name in PUBSUB_TOPIC PUSH_SUBSCRIPTION INTERACTIVE_TOPIC INTERACTIVE_SUBSCRIPTION \
    DEAD_LETTER_TOPIC DEAD_LETTER_SUBSCRIPTION; do
    check_match "$name" '^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$' 'a Pub/Sub name (3-255 characters, starting with a letter)' || problems=1
  done
  if [[ -n $RESULTS_TOPIC ]]; then
    check_match RESULTS_TOPIC '^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$' 'a Pub/Sub name (3-255 characters, starting with a letter)' || problems=1
  fi
  check_bool WEBHOOKS || problems=1
  if [[ $WEBHOOKS == true ]]; then
    [[ -n $RESULTS_TOPIC ]] || {
      printf 'error: WEBHOOKS=true needs RESULTS_TOPIC (webhooks are driven by the completion events)\n' >&2
      problems=1
    }
    check_match WEBHOOK_SUBSCRIPTION '^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$' 'a Pub/Sub name (3-255 characters, starting with a letter)' || problems=1
  fi
  check_match ARTIFACT_REPOSITORY '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$' 'a repository name (a-z 0-9 -)' || problems=1
  check_match FIRESTORE_DATABASE '^(\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9])$' 'a database id (4-63 of a-z 0-9 -) or (default)' || problems=1
  return "$problems"
}
