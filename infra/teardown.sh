#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
#
# Removes what infra/deploy.sh created, read from the same config file: both
# Cloud Run services, the subscriptions and topics, the project-level role
# bindings and the service accounts, and the Artifact Registry repository with
# its images. The Firestore database (the jobs) stays unless --delete-data is
# given. APIs stay enabled: other things in the project may use them.
#
# Idempotent: what is already gone is skipped.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: infra/teardown.sh [--config FILE] [--delete-data] [--dry-run] [-h]

Deletes the services, Pub/Sub resources, service accounts and image repository
that infra/deploy.sh created.

  --config FILE   the settings deploy.sh used (default: infra/config.env)
  --delete-data   also delete the Firestore database, with every job in it
  --dry-run       print every gcloud command, one per line, prefixed by "+ ",
                  without running any
EOF
}

CONFIG_FILE="$SCRIPT_DIR/config.env"
DELETE_DATA=false
teardown_option() {
  case $1 in
    --delete-data) DELETE_DATA=true ;;
    --config) take_value "$@" && CONFIG_FILE=$2 ;;
    *) return 1 ;;
  esac
}
parse_options teardown_option "$@"

load_deploy_config "$CONFIG_FILE"
check_names || exit 1
[[ $DRY_RUN == true ]] || require_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"

# delete_if_present DESCRIPTION DESCRIBE-ARGS -- DELETE-ARGS: both are gcloud
# argument lists; the delete runs only when describe finds the resource.
delete_if_present() {
  local what=$1 describe=() arg
  shift
  while (($#)); do
    arg=$1
    shift
    [[ $arg == -- ]] && break
    describe+=("$arg")
  done
  if [[ $DRY_RUN == false ]] && ! gcloud "${describe[@]}" >/dev/null 2>&1; then
    log "$what is already gone"
    return 0
  fi
  run gcloud "$@" --quiet
}

region=(--region="$REGION" --project="$PROJECT_ID")
project=(--project="$PROJECT_ID")

log "Cloud Run services"
delete_if_present "service $INGRESS_SERVICE" run services describe "$INGRESS_SERVICE" "${region[@]}" \
  -- run services delete "$INGRESS_SERVICE" "${region[@]}"
# The push subscriptions go before the worker, so nothing pushes to a service
# that no longer exists.
log "Pub/Sub"
for subscription in "$PUSH_SUBSCRIPTION" "$INTERACTIVE_SUBSCRIPTION"; do
  delete_if_present "subscription $subscription" pubsub subscriptions describe "$subscription" "${project[@]}" \
    -- pubsub subscriptions delete "$subscription" "${project[@]}"
done
delete_if_present "service $WORKER_SERVICE" run services describe "$WORKER_SERVICE" "${region[@]}" \
  -- run services delete "$WORKER_SERVICE" "${region[@]}"
delete_if_present "subscription $DEAD_LETTER_SUBSCRIPTION" pubsub subscriptions describe "$DEAD_LETTER_SUBSCRIPTION" "${project[@]}" \
  -- pubsub subscriptions delete "$DEAD_LETTER_SUBSCRIPTION" "${project[@]}"
# The results topic too (not its subscriptions: they are the consumers' own).
for topic in "$PUBSUB_TOPIC" "$INTERACTIVE_TOPIC" "$DEAD_LETTER_TOPIC" ${RESULTS_TOPIC:+"$RESULTS_TOPIC"}; do
  delete_if_present "topic $topic" pubsub topics describe "$topic" "${project[@]}" \
    -- pubsub topics delete "$topic" "${project[@]}"
done

# Bindings on the topics, the subscription, the worker and the invoker account
# go with those resources; the project-level ones must be removed by hand, or
# they linger as "deleted:serviceAccount:..." members.
log "project roles and service accounts"
revoke_project_role() { # EMAIL ROLE
  run gcloud projects remove-iam-policy-binding "$PROJECT_ID" --member="serviceAccount:$1" \
    --role="$2" --condition=None --format=none ||
    warn "no $2 binding for $1 to remove"
}
revoke_project_role "$INGRESS_SA_EMAIL" roles/datastore.user
revoke_project_role "$WORKER_SA_EMAIL" roles/datastore.user
revoke_project_role "$WORKER_SA_EMAIL" roles/aiplatform.user
for email in "$INGRESS_SA_EMAIL" "$WORKER_SA_EMAIL" "$INVOKER_SA_EMAIL"; do
  delete_if_present "service account $email" iam service-accounts describe "$email" "${project[@]}" \
    -- iam service-accounts delete "$email" "${project[@]}"
done

log "images"
delete_if_present "repository $ARTIFACT_REPOSITORY" artifacts repositories describe "$ARTIFACT_REPOSITORY" \
  --location="$REGION" "${project[@]}" \
  -- artifacts repositories delete "$ARTIFACT_REPOSITORY" --location="$REGION" "${project[@]}"

if [[ $DELETE_DATA == true ]]; then
  log "Firestore database $FIRESTORE_DATABASE, with every job in it"
  delete_if_present "database $FIRESTORE_DATABASE" firestore databases describe \
    --database="$FIRESTORE_DATABASE" "${project[@]}" \
    -- firestore databases delete --database="$FIRESTORE_DATABASE" "${project[@]}"
else
  log "keeping Firestore database $FIRESTORE_DATABASE (--delete-data removes it)"
fi
