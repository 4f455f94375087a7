#!/usr/bin/env bash
# Deploy one environment from cron, and turn Fraisier's exit code into silence, an alert or a
# page. A run that succeeds, or that finds another run holding the deploy lock, prints nothing,
# so cron sends mail only when a human has something to do.
#
# Usage: deploy-scheduled.sh ENV
#
# Environment:
#   FRAISIER_PROJECT  project folder that contains inventories/ (default: this script's folder)
#   DEPLOY_LOG        JSON log file of the runs (default: $FRAISIER_PROJECT/var/log/deploy-ENV.log)
#   DEPLOY_ENV_FILE   file of NAME=value lines loaded before the deploy, for secrets such as
#                     FRAISIER_DATABASE_PASSWORD; keep it readable by the deploy user only
#   ALERT_COMMAND     command that reads an alert on stdin, such as a mail or chat client
#                     (default: none, and the alert goes to stderr, which cron mails to MAILTO)
#   PAGE_COMMAND      command that pages a human, read the same way (default: ALERT_COMMAND)
#   FRAISIER          the Fraisier command (default: fraisier)
#
# Exit status: 0 after a good deploy and when the lock is held, else Fraisier's exit code.
set -euo pipefail

env_name=${1:?usage: deploy-scheduled.sh ENV}
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=${FRAISIER_PROJECT:-$script_dir}
export FRAISIER_PROJECT=$project
log_file=${DEPLOY_LOG:-$project/var/log/deploy-$env_name.log}
mkdir -p "$(dirname "$log_file")"

if [[ -n ${DEPLOY_ENV_FILE:-} ]]; then
  # set -a exports every variable the file sets; the values are never printed.
  set -a
  # shellcheck source=/dev/null
  . "$DEPLOY_ENV_FILE"
  set +a
fi

summary=$(mktemp)
errors=$(mktemp)
trap 'rm -f "$summary" "$errors"' EXIT

# Send the alert text on stdin to COMMAND, or to stderr when COMMAND is empty.
notify() {
  local command=$1 text=$2
  if [[ -n $command ]]; then
    printf '%s\n' "$text" | bash -c "$command"
  else
    printf '%s\n' "$text" >&2
  fi
}

# The run's summary and the error lines, without the JSON log lines that go to the log file.
details() {
  cat "$summary"
  grep -v '^{' "$errors" || true
}

# Fraisier runs in the background so that this script can forward SIGINT and SIGTERM to it:
# the run then rolls back switched hosts and releases its locks before it exits 130 or 143.
(cd "$project" && exec ${FRAISIER:-fraisier} deploy --env "$env_name" \
  --log-format json --log-file "$log_file") >"$summary" 2>"$errors" &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null || true' INT
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
while :; do
  code=0
  wait "$pid" || code=$?
  # wait returns early when a forwarded signal arrives; wait again until Fraisier has exited.
  kill -0 "$pid" 2>/dev/null || break
done

alert=${ALERT_COMMAND:-}
page=${PAGE_COMMAND:-$alert}
case $code in
  0)
    ;;
  1)
    notify "$alert" "ALERT: deploy of $env_name failed (exit 1). The summary says which host is on which release.
Log: $log_file
$(details)"
    ;;
  2)
    notify "$alert" "ALERT: deploy of $env_name not started: configuration error (exit 2).
No host was contacted. Fix the inventory or recipe; retrying cannot help.
$(details)"
    ;;
  3)
    notify "$page" "PAGE: rollback failed during the deploy of $env_name (exit 3).
A host may be on either release: check it with 'fraisier releases --env $env_name' and fix it
with 'fraisier rollback --env $env_name'.
Log: $log_file
$(details)"
    ;;
  4)
    # Another run holds the deploy lock and no host changed: the next schedule tries again.
    code=0
    ;;
  5)
    notify "$alert" "ALERT: deploy of $env_name failed on the run database (exit 5).
$(details)"
    ;;
  130 | 143)
    notify "$alert" "ALERT: deploy of $env_name was interrupted (exit $code).
Log: $log_file
$(details)"
    ;;
  *)
    notify "$alert" "ALERT: deploy of $env_name exited $code, which this script does not know.
$(details)"
    ;;
esac
exit "$code"
