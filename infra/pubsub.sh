#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
#
# The Pub/Sub part of vertex-dispatcher, alone: the jobs topic, an optional
# dead-letter topic with a pull subscription that keeps what lands there, and
# the push subscription that delivers jobs to the worker.
#
# Idempotent: each resource is looked up with `describe` and created only when
# absent; an existing push subscription is updated to the options given, so a
# second run with other values changes them. Options that are not given are
# left out of the gcloud commands: on creation Pub/Sub's defaults apply, on
# update the current value stays. That keeps the script usable against the
# Pub/Sub emulator, which takes every flag used here (checked with gcloud 528
# and emulator 0.8.20) but has no IAM, which is why IAM lives in deploy.sh.
#
# Against the emulator:
#   CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB=http://127.0.0.1:PORT/ \
#   CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true CLOUDSDK_CORE_PROJECT=demo \
#   infra/pubsub.sh --project demo --topic jobs --subscription jobs-push \
#     --push-endpoint http://127.0.0.1:8081/
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: infra/pubsub.sh --project P --topic T --subscription S --push-endpoint URL
         [--dead-letter-topic DLT [--dead-letter-subscription NAME]]
         [--max-delivery-attempts N] [--ack-deadline SECONDS]
         [--min-retry-delay 10s] [--max-retry-delay 600s]
         [--push-service-account SA [--audience AUD]] [--dry-run] [-h]

Creates (or updates) the topic T, the push subscription S delivering T to URL,
and, with --dead-letter-topic, the topic DLT and its pull subscription
(default name: DLT-sub).

  --max-delivery-attempts N   5 to 100; needs --dead-letter-topic
  --ack-deadline SECONDS      10 to 600; for push, also the HTTP timeout
  --min/max-retry-delay D     0s to 600s; redelivery backoff after a nack
  --push-service-account SA   sign each push with an OIDC token for SA
  --audience AUD              the token's audience (default: the endpoint)
  --dry-run                   print the gcloud commands instead of running them
EOF
}

PROJECT='' TOPIC='' SUBSCRIPTION='' PUSH_ENDPOINT=''
DEAD_LETTER_TOPIC='' DEAD_LETTER_SUBSCRIPTION='' MAX_DELIVERY_ATTEMPTS=''
ACK_DEADLINE='' MIN_RETRY_DELAY='' MAX_RETRY_DELAY=''
PUSH_SERVICE_ACCOUNT='' AUDIENCE=''

# Each option sets the variable of its name: --ack-deadline sets ACK_DEADLINE.
pubsub_option() {
  local name
  case $1 in
    --project | --topic | --subscription | --push-endpoint | --dead-letter-topic | \
      --dead-letter-subscription | --max-delivery-attempts | --ack-deadline | \
      --min-retry-delay | --max-retry-delay | --push-service-account | --audience)
      take_value "$@"
      name=${1#--}
      name=${name//-/_}
      name=$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')
      printf -v "$name" '%s' "$2"
      ;;
    *) return 1 ;;
  esac
}
parse_options pubsub_option "$@"

problems=0
for required in PROJECT TOPIC SUBSCRIPTION PUSH_ENDPOINT; do
  if [[ -z ${!required} ]]; then
    option=${required//_/-}
    printf 'error: missing option --%s\n' "$(printf '%s' "$option" | tr '[:upper:]' '[:lower:]')" >&2
    problems=1
  fi
done
if [[ -n $ACK_DEADLINE ]]; then check_int ACK_DEADLINE 10 600 || problems=1; fi
if [[ -n $MAX_DELIVERY_ATTEMPTS ]]; then
  check_int MAX_DELIVERY_ATTEMPTS 5 100 || problems=1
  [[ -n $DEAD_LETTER_TOPIC ]] || {
    printf 'error: --max-delivery-attempts needs --dead-letter-topic\n' >&2
    problems=1
  }
fi
if [[ -n $MIN_RETRY_DELAY ]]; then check_duration MIN_RETRY_DELAY || problems=1; fi
if [[ -n $MAX_RETRY_DELAY ]]; then check_duration MAX_RETRY_DELAY || problems=1; fi
if [[ -n $AUDIENCE && -z $PUSH_SERVICE_ACCOUNT ]]; then
  printf 'error: --audience needs --push-service-account\n' >&2
  problems=1
fi
if [[ -n $DEAD_LETTER_SUBSCRIPTION && -z $DEAD_LETTER_TOPIC ]]; then
  printf 'error: --dead-letter-subscription needs --dead-letter-topic\n' >&2
  problems=1
fi
((problems == 0)) || exit 1
[[ $DRY_RUN == true ]] || require_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
if [[ -n $DEAD_LETTER_TOPIC ]]; then : "${DEAD_LETTER_SUBSCRIPTION:=$DEAD_LETTER_TOPIC-sub}"; fi

ensure_topic() {
  if exists gcloud pubsub topics describe "$1" --project="$PROJECT"; then
    log "topic $1 exists"
  else
    run gcloud pubsub topics create "$1" --project="$PROJECT"
  fi
}

# current_topic SUBSCRIPTION: the topic an existing subscription reads, or
# nothing (and failure) when the subscription does not exist.
current_topic() {
  [[ $DRY_RUN == true ]] && return 1
  gcloud pubsub subscriptions describe "$1" --project="$PROJECT" --format='value(topic)' 2>/dev/null
}

# A subscription cannot move to another topic: say so instead of updating the
# wrong thing.
check_same_topic() { # SUBSCRIPTION CURRENT WANTED
  [[ $2 == "projects/$PROJECT/topics/$3" ]] && return 0
  die "subscription $1 already exists on $2, not on topic $3: delete it or choose another name"
}

ensure_topic "$TOPIC"

if [[ -n $DEAD_LETTER_TOPIC ]]; then
  ensure_topic "$DEAD_LETTER_TOPIC"
  # Without a subscription, messages sent to the dead-letter topic are dropped.
  if existing=$(current_topic "$DEAD_LETTER_SUBSCRIPTION"); then
    check_same_topic "$DEAD_LETTER_SUBSCRIPTION" "$existing" "$DEAD_LETTER_TOPIC"
    log "subscription $DEAD_LETTER_SUBSCRIPTION exists"
  else
    run gcloud pubsub subscriptions create "$DEAD_LETTER_SUBSCRIPTION" \
      --topic="$DEAD_LETTER_TOPIC" --project="$PROJECT"
  fi
fi

push_flags=(--push-endpoint="$PUSH_ENDPOINT")
if [[ -n $PUSH_SERVICE_ACCOUNT ]]; then
  push_flags+=(--push-auth-service-account="$PUSH_SERVICE_ACCOUNT")
  if [[ -n $AUDIENCE ]]; then push_flags+=(--push-auth-token-audience="$AUDIENCE"); fi
fi
if [[ -n $ACK_DEADLINE ]]; then push_flags+=(--ack-deadline="$ACK_DEADLINE"); fi
if [[ -n $MIN_RETRY_DELAY ]]; then push_flags+=(--min-retry-delay="$MIN_RETRY_DELAY"); fi
if [[ -n $MAX_RETRY_DELAY ]]; then push_flags+=(--max-retry-delay="$MAX_RETRY_DELAY"); fi
if [[ -n $DEAD_LETTER_TOPIC ]]; then push_flags+=(--dead-letter-topic="$DEAD_LETTER_TOPIC"); fi
if [[ -n $MAX_DELIVERY_ATTEMPTS ]]; then push_flags+=(--max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS"); fi

if existing=$(current_topic "$SUBSCRIPTION"); then
  check_same_topic "$SUBSCRIPTION" "$existing" "$TOPIC"
  run gcloud pubsub subscriptions update "$SUBSCRIPTION" "${push_flags[@]}" --project="$PROJECT"
else
  run gcloud pubsub subscriptions create "$SUBSCRIPTION" --topic="$TOPIC" \
    "${push_flags[@]}" --project="$PROJECT"
fi
