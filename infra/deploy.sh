#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
#
# Deploys vertex-dispatcher to one Google Cloud project, in one command:
# APIs, Artifact Registry, both images (Cloud Build), Firestore and its TTL,
# service accounts and their roles, Pub/Sub, the worker, then the ingress.
#
# Idempotent: every resource is looked up with `describe` and created only when
# absent; services, the push subscription and IAM bindings are (re)applied, so
# a second run changes what the config changed and leaves the rest as it is.
# Settings come from an env file (infra/config.env.example documents each).
#
# The deploying account needs, on the project: roles/serviceusage.serviceUsageAdmin,
# roles/artifactregistry.admin, roles/cloudbuild.builds.editor, roles/datastore.owner,
# roles/iam.serviceAccountAdmin, roles/iam.serviceAccountUser (to run services as
# and sign pushes for the accounts it creates), roles/resourcemanager.projectIamAdmin,
# roles/pubsub.admin and roles/run.admin. roles/owner covers all of them.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: infra/deploy.sh [--config FILE] [--public] [--out-dir DIR] [--dry-run] [-h]

Deploys the ingress and the worker to Cloud Run with everything they need.

  --config FILE   settings (default: infra/config.env; see infra/config.env.example)
  --public        let anyone call the ingress (same as INGRESS_PUBLIC=true);
                  without it callers need roles/run.invoker and an identity token
  --out-dir DIR   where to write the generated files (env-vars files, Cloud Build
                  config); default: a temporary directory, removed after a real run
  --dry-run       print every gcloud command, one per line, prefixed by "+ ",
                  without running any (nor needing gcloud); values only a real run
                  can know appear as <placeholders>
EOF
}

CONFIG_FILE="$SCRIPT_DIR/config.env"
PUBLIC_FLAG=false
OUT_DIR=''
deploy_option() {
  case $1 in
    --public) PUBLIC_FLAG=true ;;
    --config) take_value "$@" && CONFIG_FILE=$2 ;;
    --out-dir) take_value "$@" && OUT_DIR=$2 ;;
    *) return 1 ;;
  esac
}
parse_options deploy_option "$@"

load_deploy_config "$CONFIG_FILE"
if [[ $PUBLIC_FLAG == true ]]; then INGRESS_PUBLIC=true; fi

# --- Check every setting before touching anything ----------------------------
problems=0
check_names || problems=1
check_set MODEL_ID 'the default Gemini model, e.g. gemini-2.5-flash' || problems=1
check_set MODEL_CONFIG 'JSON list of {"model_id", "supported_regions"}' || problems=1
check_set FIRESTORE_LOCATION 'e.g. nam5 or us-central1' || problems=1
check_int ACK_DEADLINE_S 10 600 || problems=1
check_int MAX_DELIVERY_ATTEMPTS 5 100 || problems=1
check_duration MIN_RETRY_DELAY || problems=1
check_duration MAX_RETRY_DELAY || problems=1
check_int WORKER_TIMEOUT_S 1 3600 || problems=1
check_int INGRESS_TIMEOUT_S 1 3600 || problems=1
for name in WORKER_CONCURRENCY INGRESS_CONCURRENCY; do check_int "$name" 1 1000 || problems=1; done
for name in WORKER_MIN_INSTANCES WORKER_MAX_INSTANCES INGRESS_MIN_INSTANCES INGRESS_MAX_INSTANCES; do
  check_int "$name" 0 1000 || problems=1
done
check_bool WORKER_CPU_THROTTLING || problems=1
check_bool INGRESS_PUBLIC || problems=1
check_match WORKER_INGRESS '^(all|internal|internal-and-cloud-load-balancing)$' \
  'all, internal or internal-and-cloud-load-balancing' || problems=1
check_match FIRESTORE_COLLECTION '^[^/]+$' 'a collection id without "/"' || problems=1
if [[ -n $IMAGE_TAG ]]; then
  check_match IMAGE_TAG '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$' 'a Docker tag (A-Z a-z 0-9 _ . -)' || problems=1
fi
if [[ -n $PUSH_AUDIENCE ]]; then
  check_match PUSH_AUDIENCE '^[^,[:space:]]+$' 'one audience without commas or spaces' || problems=1
fi
if [[ -n $MODEL_ID && -n $MODEL_CONFIG && $MODEL_CONFIG != *"\"$MODEL_ID\""* ]]; then
  printf 'error: MODEL_CONFIG has no entry for MODEL_ID %s (the services would refuse to start)\n' \
    "$MODEL_ID" >&2
  problems=1
fi
((problems == 0)) || exit 1

# Pub/Sub waits ACK_DEADLINE_S for the push request to answer; a Cloud Run
# timeout below that would cut off work Pub/Sub still counts as in flight, and
# the job would be redelivered while its first attempt may have half-succeeded.
if ((10#$WORKER_TIMEOUT_S < 10#$ACK_DEADLINE_S)); then
  die "WORKER_TIMEOUT_S ($WORKER_TIMEOUT_S) is below ACK_DEADLINE_S ($ACK_DEADLINE_S): the worker's request timeout must be at least the subscription's ack deadline"
fi
if ((10#${MIN_RETRY_DELAY%s} > 10#${MAX_RETRY_DELAY%s})); then
  die "MIN_RETRY_DELAY ($MIN_RETRY_DELAY) is above MAX_RETRY_DELAY ($MAX_RETRY_DELAY)"
fi

if [[ $DRY_RUN == false ]]; then
  require_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  account=$(gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null || true)
  [[ -n $account ]] || die "gcloud has no active account: run gcloud auth login"
fi

if [[ -z $IMAGE_TAG ]]; then
  IMAGE_TAG=$(date -u +%Y%m%d-%H%M%S)
  if revision=$(git -C "$ROOT_DIR" rev-parse --short HEAD 2>/dev/null); then
    IMAGE_TAG+="-$revision"
  fi
fi
INGRESS_IMAGE="$IMAGE_BASE/ingress:$IMAGE_TAG"
WORKER_IMAGE="$IMAGE_BASE/worker:$IMAGE_TAG"

if [[ -z $OUT_DIR ]]; then
  OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vertex-dispatcher-deploy.XXXXXX")
  if [[ $DRY_RUN == true ]]; then
    log "generated files are kept in $OUT_DIR"
  else
    trap 'rm -rf "$OUT_DIR"' EXIT
  fi
else
  mkdir -p "$OUT_DIR"
fi

# --- 1. APIs -------------------------------------------------------------------
log "enabling APIs"
run gcloud services enable run.googleapis.com pubsub.googleapis.com firestore.googleapis.com \
  aiplatform.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com \
  iam.googleapis.com --project="$PROJECT_ID"

PROJECT_NUMBER=$(lookup '<project-number>' \
  gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')
PUBSUB_AGENT="service-$PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com"

# The audience of the push tokens. Default: the worker's deterministic URL,
# known before the service exists, so the worker's first revision already
# verifies the right value. https://cloud.google.com/run/docs/triggering/https-request#deterministic
if [[ -z $PUSH_AUDIENCE ]]; then
  if [[ $DRY_RUN == false ]] && ((${#WORKER_SERVICE} + 1 + ${#PROJECT_NUMBER} > 63)); then
    die "the worker has no deterministic URL ($WORKER_SERVICE-$PROJECT_NUMBER is over 63 characters): shorten WORKER_SERVICE or set PUSH_AUDIENCE"
  fi
  PUSH_AUDIENCE="https://$WORKER_SERVICE-$PROJECT_NUMBER.$REGION.run.app"
fi

# --- 2. Artifact Registry and the images -----------------------------------------
log "container images"
if exists gcloud artifacts repositories describe "$ARTIFACT_REPOSITORY" \
  --location="$REGION" --project="$PROJECT_ID"; then
  log "repository $ARTIFACT_REPOSITORY exists"
else
  run gcloud artifacts repositories create "$ARTIFACT_REPOSITORY" --repository-format=docker \
    --location="$REGION" --description='vertex-dispatcher images' --project="$PROJECT_ID"
fi

# `gcloud builds submit --tag` only builds a file named Dockerfile, so both
# images go through one build config: two steps in parallel, then a push.
BUILD_CONFIG="$OUT_DIR/cloudbuild.yaml"
cat >"$BUILD_CONFIG" <<'EOF'
# Generated by infra/deploy.sh: builds both images in parallel, then pushes them.
steps:
  - id: ingress
    name: gcr.io/cloud-builders/docker
    args: ["build", "--file=Dockerfile.ingress", "--tag=${_INGRESS_IMAGE}", "."]
    waitFor: ["-"]
  - id: worker
    name: gcr.io/cloud-builders/docker
    args: ["build", "--file=Dockerfile.worker", "--tag=${_WORKER_IMAGE}", "."]
    waitFor: ["-"]
images: ["${_INGRESS_IMAGE}", "${_WORKER_IMAGE}"]
EOF
# Upload only what the images are built from. An ignore file of our own also
# keeps gcloud from writing a .gcloudignore into the repository.
UPLOAD_IGNORE="$OUT_DIR/gcloudignore"
cat >"$UPLOAD_IGNORE" <<'EOF'
# Generated by infra/deploy.sh: upload only what the Dockerfiles use.
/*
!/requirements.lock
!/pyproject.toml
!/dispatcher/
!/ingress/
!/worker/
!/Dockerfile.ingress
!/Dockerfile.worker
!/.dockerignore
__pycache__/
*.py[cod]
EOF
run gcloud builds submit "$ROOT_DIR" --config="$BUILD_CONFIG" --ignore-file="$UPLOAD_IGNORE" \
  --substitutions="_INGRESS_IMAGE=$INGRESS_IMAGE,_WORKER_IMAGE=$WORKER_IMAGE" \
  --project="$PROJECT_ID"

# --- 3. Firestore -----------------------------------------------------------------
log "Firestore"
if exists gcloud firestore databases describe --database="$FIRESTORE_DATABASE" \
  --project="$PROJECT_ID"; then
  log "database $FIRESTORE_DATABASE exists"
else
  run gcloud firestore databases create --database="$FIRESTORE_DATABASE" \
    --location="$FIRESTORE_LOCATION" --type=firestore-native --project="$PROJECT_ID"
fi

# Jobs carry `expire_at`; Firestore deletes them within about 24 h after it. So do
# the chunk documents of large requests and results (subcollection `blobs`), which
# carry their job's `expire_at`: both collection groups get the policy.
# The recovery sweep filters on one field, `sweep_at` (a single-field range query),
# which Firestore's automatic single-field indexes serve; job reads are by document id.
# Listing a caller's jobs (GET /jobs, GET /usage) needs the composite indexes below.
ttl_state() { # COLLECTION_GROUP
  [[ $DRY_RUN == true ]] && return 0
  gcloud firestore fields ttls list --collection-group="$1" \
    --database="$FIRESTORE_DATABASE" --project="$PROJECT_ID" \
    --format='value(name,ttlConfig.state)' 2>/dev/null |
    while IFS=$'\t' read -r field state; do
      if [[ $field == expire_at || $field == */fields/expire_at ]]; then printf '%s\n' "$state"; fi
    done || true
}
# The instances' heartbeats of the shared region state (REGION_SYNC_S) carry one too:
# every new instance writes one, so they would pile up without it.
for ttl_group in "$FIRESTORE_COLLECTION" blobs "${FIRESTORE_COLLECTION}_instances" \
  "${FIRESTORE_COLLECTION}_ingress_instances"; do
  case $(ttl_state "$ttl_group") in
    ACTIVE | CREATING) log "TTL on $ttl_group.expire_at is already set" ;;
    *)
      # --async: the policy takes minutes to become ACTIVE and needs no waiting for.
      run gcloud firestore fields ttls update expire_at --collection-group="$ttl_group" \
        --enable-ttl --database="$FIRESTORE_DATABASE" --async --project="$PROJECT_ID"
      ;;
  esac
done

# GET /jobs and GET /usage: a caller's jobs newest first, optionally of one status.
composite_index_exists() { # FIELD:ORDER...
  local wanted
  wanted=$(printf '%s,' "$@")
  gcloud firestore indexes composite list --database="$FIRESTORE_DATABASE" \
    --project="$PROJECT_ID" --filter="collectionGroup=$FIRESTORE_COLLECTION" \
    --format='value[separator=","](fields[].fieldPath,fields[].order)' 2>/dev/null |
    while IFS= read -r line; do
      [[ "$line," == *"${wanted//:/,}"* ]] && echo yes
    done | grep -q yes
}
for index_fields in "owner:ASCENDING created_at:DESCENDING job_id:DESCENDING" \
  "owner:ASCENDING status:ASCENDING created_at:DESCENDING job_id:DESCENDING"; do
  read -r -a fields <<<"$index_fields"
  if [[ $DRY_RUN != true ]] && composite_index_exists "${fields[@]}"; then
    log "index ($index_fields) on $FIRESTORE_COLLECTION exists"
    continue
  fi
  field_flags=()
  for field in "${fields[@]}"; do
    order=${field#*:}
    field_flags+=("--field-config=field-path=${field%%:*},order=${order,,}")
  done
  run gcloud firestore indexes composite create --collection-group="$FIRESTORE_COLLECTION" \
    --query-scope=collection "${field_flags[@]}" --database="$FIRESTORE_DATABASE" --async \
    --project="$PROJECT_ID"
done

# --- 4. Service accounts and project roles ---------------------------------------------
log "service accounts"
ensure_service_account() { # ID EMAIL DESCRIPTION
  if exists gcloud iam service-accounts describe "$2" --project="$PROJECT_ID"; then
    log "service account $2 exists"
  else
    run gcloud iam service-accounts create "$1" --display-name="$3" --project="$PROJECT_ID"
  fi
}
ensure_service_account "$INGRESS_SA" "$INGRESS_SA_EMAIL" 'vertex-dispatcher ingress (runtime)'
ensure_service_account "$WORKER_SA" "$WORKER_SA_EMAIL" 'vertex-dispatcher worker (runtime)'
ensure_service_account "$INVOKER_SA" "$INVOKER_SA_EMAIL" 'vertex-dispatcher Pub/Sub push invoker'

grant_project_role() { # EMAIL ROLE
  run_retrying gcloud projects add-iam-policy-binding "$PROJECT_ID" \
    --member="serviceAccount:$1" --role="$2" --condition=None --format=none
}
grant_project_role "$INGRESS_SA_EMAIL" roles/datastore.user
grant_project_role "$WORKER_SA_EMAIL" roles/datastore.user
grant_project_role "$WORKER_SA_EMAIL" roles/aiplatform.user

# Pub/Sub's service agent mints the push tokens as the invoker account. Needed
# for projects created before 2021-04-08 and harmless after; granted on that
# one account only. https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions
run_retrying gcloud iam service-accounts add-iam-policy-binding "$INVOKER_SA_EMAIL" \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator \
  --project="$PROJECT_ID" --format=none

# --- 5. The worker ---------------------------------------------------------------
# Environment variables go through --env-vars-file: MODEL_CONFIG is JSON full of
# commas, which --set-env-vars would split (see lib.sh, write_env_file).
app_env=(
  "GOOGLE_CLOUD_PROJECT=$PROJECT_ID"
  "MODEL_ID=$MODEL_ID"
  "MODEL_CONFIG=$MODEL_CONFIG"
  "FIRESTORE_DATABASE=$FIRESTORE_DATABASE"
  "FIRESTORE_COLLECTION=$FIRESTORE_COLLECTION"
  "PUBSUB_TOPIC=$PUBSUB_TOPIC"
  "INTERACTIVE_TOPIC=$INTERACTIVE_TOPIC"
  "LOG_LEVEL=$LOG_LEVEL"
)
for name in VERTEX_MAX_RETRIES VERTEX_BACKOFF_INITIAL_S VERTEX_BACKOFF_MAX_S VERTEX_TIMEOUT_S JOB_TTL_S \
  RESULTS_TOPIC WEBHOOK_ALLOW_HOSTS; do
  if [[ -n ${!name} ]]; then app_env+=("$name=${!name}"); fi
done
# Only the worker sends webhooks, so only it holds the service's signing secret.
worker_env=()
for name in WEBHOOK_SECRET WEBHOOK_DELIVERY_MAX_S; do
  if [[ -n ${!name} ]]; then worker_env+=("$name=${!name}"); fi
done
# The worker's push settings must match the subscription created below.
write_env_file "$OUT_DIR/worker.env.json" "${app_env[@]}" ${worker_env[@]+"${worker_env[@]}"} \
  "PUSH_ACK_DEADLINE_S=$ACK_DEADLINE_S" \
  "MAX_DELIVERY_ATTEMPTS=$MAX_DELIVERY_ATTEMPTS" \
  "PUSH_AUDIENCE=$PUSH_AUDIENCE" \
  "PUSH_SERVICE_ACCOUNT=$INVOKER_SA_EMAIL"
write_env_file "$OUT_DIR/ingress.env.json" "${app_env[@]}"

# CPU throttling stays on (request-based billing) by default: the worker does
# each job inside the push request, so it has CPU exactly while there is work.
# The background recovery sweep then runs only while requests are in flight,
# which is enough because clients polling GET /jobs keep the ingress sweeping
# too. Set WORKER_CPU_THROTTLING=false with WORKER_MIN_INSTANCES=1 to sweep
# with no traffic at all. Concurrency 80: a request mostly waits on Vertex AI,
# and one asyncio process serves many such waits on one vCPU.
if [[ $WORKER_CPU_THROTTLING == true ]]; then worker_cpu_flag=--cpu-throttling; else worker_cpu_flag=--no-cpu-throttling; fi
log "deploying the worker"
# --ingress=internal by default: only sources in the project, Pub/Sub push among
# them, can reach it; IAM (run.invoker for the push account only) on top.
# https://cloud.google.com/run/docs/securing/ingress
run gcloud run deploy "$WORKER_SERVICE" --image="$WORKER_IMAGE" --region="$REGION" \
  --service-account="$WORKER_SA_EMAIL" --no-allow-unauthenticated --ingress="$WORKER_INGRESS" \
  --timeout="$WORKER_TIMEOUT_S" --concurrency="$WORKER_CONCURRENCY" \
  --cpu="$WORKER_CPU" --memory="$WORKER_MEMORY" "$worker_cpu_flag" --cpu-boost \
  --min-instances="$WORKER_MIN_INSTANCES" --max-instances="$WORKER_MAX_INSTANCES" \
  --set-custom-audiences="$PUSH_AUDIENCE" \
  --env-vars-file="$OUT_DIR/worker.env.json" --project="$PROJECT_ID"

WORKER_URL=$(lookup '<worker-url>' gcloud run services describe "$WORKER_SERVICE" \
  --region="$REGION" --project="$PROJECT_ID" --format='value(status.url)')

run_retrying gcloud run services add-iam-policy-binding "$WORKER_SERVICE" --region="$REGION" \
  --member="serviceAccount:$INVOKER_SA_EMAIL" --role=roles/run.invoker \
  --project="$PROJECT_ID" --format=none

# --- 6. Pub/Sub ------------------------------------------------------------------
# After the worker: its URL is the push endpoint.
log "Pub/Sub"
# The same policy for both job subscriptions: the batch one on PUBSUB_TOPIC and the
# interactive one, so Pub/Sub delivers the jobs of priority=interactive keys however
# deep the batch backlog is (README, Many teams, one dispatcher).
pubsub_args=(
  --project "$PROJECT_ID" --push-endpoint "$WORKER_URL/"
  --dead-letter-topic "$DEAD_LETTER_TOPIC" --dead-letter-subscription "$DEAD_LETTER_SUBSCRIPTION"
  --max-delivery-attempts "$MAX_DELIVERY_ATTEMPTS" --ack-deadline "$ACK_DEADLINE_S"
  --min-retry-delay "$MIN_RETRY_DELAY" --max-retry-delay "$MAX_RETRY_DELAY"
  --push-service-account "$INVOKER_SA_EMAIL" --audience "$PUSH_AUDIENCE"
)
if [[ $DRY_RUN == true ]]; then pubsub_args+=(--dry-run); fi
"$SCRIPT_DIR/pubsub.sh" --topic "$PUBSUB_TOPIC" --subscription "$PUSH_SUBSCRIPTION" "${pubsub_args[@]}"
"$SCRIPT_DIR/pubsub.sh" --topic "$INTERACTIVE_TOPIC" --subscription "$INTERACTIVE_SUBSCRIPTION" \
  "${pubsub_args[@]}"

# The ingress publishes new jobs; the worker republishes the ones the recovery
# sweep finds stranded. Both on the two job topics only.
for topic in "$PUBSUB_TOPIC" "$INTERACTIVE_TOPIC"; do
  for email in "$INGRESS_SA_EMAIL" "$WORKER_SA_EMAIL"; do
    run_retrying gcloud pubsub topics add-iam-policy-binding "$topic" \
      --member="serviceAccount:$email" --role=roles/pubsub.publisher \
      --project="$PROJECT_ID" --format=none
  done
done
# Completion events (RESULTS_TOPIC, optional): both services publish them (the worker
# for the jobs it finishes, the ingress for cancellations and the sweep).
if [[ -n $RESULTS_TOPIC && $WEBHOOKS == true ]]; then
  # Signed webhooks: a second push subscription, on the results topic, to the worker's
  # /webhooks, signed as the invoker like the jobs' (pubsub.sh creates the topic too).
  # A receiver that fails is retried by Pub/Sub's backoff until the worker gives up
  # (WEBHOOK_DELIVERY_MAX_S); the dead letter catches what a broken worker never acks.
  webhook_args=(
    --project "$PROJECT_ID" --topic "$RESULTS_TOPIC" --subscription "$WEBHOOK_SUBSCRIPTION"
    --push-endpoint "$WORKER_URL/webhooks"
    --dead-letter-topic "$DEAD_LETTER_TOPIC" --dead-letter-subscription "$DEAD_LETTER_SUBSCRIPTION"
    --max-delivery-attempts 100 --ack-deadline 60 --min-retry-delay 10s --max-retry-delay 600s
    --push-service-account "$INVOKER_SA_EMAIL" --audience "$PUSH_AUDIENCE"
  )
  if [[ $DRY_RUN == true ]]; then webhook_args+=(--dry-run); fi
  "$SCRIPT_DIR/pubsub.sh" "${webhook_args[@]}"
  run_retrying gcloud pubsub subscriptions add-iam-policy-binding "$WEBHOOK_SUBSCRIPTION" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber \
    --project="$PROJECT_ID" --format=none
fi
if [[ -n $RESULTS_TOPIC ]]; then
  if [[ $WEBHOOKS == true ]]; then
    : # created with its webhook subscription above
  elif exists gcloud pubsub topics describe "$RESULTS_TOPIC" --project="$PROJECT_ID"; then
    log "topic $RESULTS_TOPIC exists"
  else
    run gcloud pubsub topics create "$RESULTS_TOPIC" --project="$PROJECT_ID"
  fi
  for email in "$INGRESS_SA_EMAIL" "$WORKER_SA_EMAIL"; do
    run_retrying gcloud pubsub topics add-iam-policy-binding "$RESULTS_TOPIC" \
      --member="serviceAccount:$email" --role=roles/pubsub.publisher \
      --project="$PROJECT_ID" --format=none
  done
fi
# Dead-lettering is done by Pub/Sub's service agent: it publishes to the
# dead-letter topic and acknowledges on the source subscription.
# https://cloud.google.com/pubsub/docs/handling-failures#grant_forwarding_permissions
run_retrying gcloud pubsub topics add-iam-policy-binding "$DEAD_LETTER_TOPIC" \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher \
  --project="$PROJECT_ID" --format=none
for subscription in "$PUSH_SUBSCRIPTION" "$INTERACTIVE_SUBSCRIPTION"; do
  run_retrying gcloud pubsub subscriptions add-iam-policy-binding "$subscription" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber \
    --project="$PROJECT_ID" --format=none
done

# --- 7. The ingress ----------------------------------------------------------------
log "deploying the ingress"
if [[ $INGRESS_PUBLIC == true ]]; then ingress_auth_flag=--allow-unauthenticated; else ingress_auth_flag=--no-allow-unauthenticated; fi
run gcloud run deploy "$INGRESS_SERVICE" --image="$INGRESS_IMAGE" --region="$REGION" \
  --service-account="$INGRESS_SA_EMAIL" "$ingress_auth_flag" --ingress=all \
  --timeout="$INGRESS_TIMEOUT_S" --concurrency="$INGRESS_CONCURRENCY" \
  --cpu="$INGRESS_CPU" --memory="$INGRESS_MEMORY" --cpu-throttling --cpu-boost \
  --min-instances="$INGRESS_MIN_INSTANCES" --max-instances="$INGRESS_MAX_INSTANCES" \
  --env-vars-file="$OUT_DIR/ingress.env.json" --project="$PROJECT_ID"

INGRESS_URL=$(lookup '<ingress-url>' gcloud run services describe "$INGRESS_SERVICE" \
  --region="$REGION" --project="$PROJECT_ID" --format='value(status.url)')

# --- Done ------------------------------------------------------------------------------
summary() {
  local access='IAM: callers need roles/run.invoker'
  if [[ $INGRESS_PUBLIC == true ]]; then access=public; fi
  cat <<EOF

Ingress: $INGRESS_URL ($access)
Worker:  $WORKER_URL (reached by Pub/Sub push only)

Submit a job, then read it back with the job_id it returns:
  curl -sS -X POST '$INGRESS_URL/generate' \\
    -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H 'Content-Type: application/json' \\
    -d '{"contents": [{"role": "user", "parts": [{"text": "Explain quantum computing in simple terms."}]}]}'
  curl -sS '$INGRESS_URL/jobs/JOB_ID' -H "Authorization: Bearer \$(gcloud auth print-identity-token)"
EOF
  if [[ $INGRESS_PUBLIC != true ]]; then
    cat <<EOF

Let someone call the ingress:
  gcloud run services add-iam-policy-binding $INGRESS_SERVICE --region=$REGION \\
    --member=user:SOMEONE@example.com --role=roles/run.invoker --project=$PROJECT_ID
EOF
  fi
}
if [[ $DRY_RUN == true ]]; then summary >&2; else summary; fi
