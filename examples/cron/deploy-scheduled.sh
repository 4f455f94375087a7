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
#   DEPLOY_ENV_FILE   file of NAME=value lines exported before the deploy, for secrets such as
#                     FRAISIER_DATABASE_PASSWORD; keep it readable by the deploy user only. The
#                     value is everything after the first '=', taken as is: no quotes, no
#                     expansion. Blank lines and lines that start with '#' are skipped.
#   ALERT_COMMAND     command that reads an alert on stdin, such as a mail or chat client
#                     (default: none, and the alert goes to stderr, which cron mails to MAILTO)
#   PAGE_COMMAND      command that pages a human, read the same way (default: ALERT_COMMAND)
#   FRAISIER          the Fraisier command (default: fraisier)
#
# Exit status: 0 after a good deploy and when the lock is held, 2 for a usage error of this
# script, else Fraisier's exit code.
set -euo pipefail

usage_error() {
  printf 'deploy-scheduled.sh: %s\n' "$1" >&2
  exit 2
}

[[ $# -eq 1 ]] || usage_error "usage: deploy-scheduled.sh ENV"
env_name=$1

# Export the NAME=value lines of DEPLOY_ENV_FILE first, so that the file may set
# FRAISIER_PROJECT too. The file is read as data, never run as shell code, and no value is
# printed, not even in an error.
load_env_file() {
  local file=$1 line number=0
  [[ -f $file && -r $file ]] || usage_error "DEPLOY_ENV_FILE $file is missing or not readable"
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line=${line%$'\r'} # a file saved with CRLF line ends
    [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
    [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
      usage_error "DEPLOY_ENV_FILE $file line $number is not NAME=value"
    # bash exits at once when export meets a read-only variable, so try it in a subshell.
    (export "${line%%=*}=${line#*=}") 2>/dev/null ||
      usage_error "DEPLOY_ENV_FILE $file line $number sets a read-only variable"
    export "${line%%=*}=${line#*=}"
  done <"$file"
}

if [[ -n ${DEPLOY_ENV_FILE:-} ]]; then
  load_env_file "$DEPLOY_ENV_FILE"
fi

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=${FRAISIER_PROJECT:-$script_dir}
# Fraisier runs from inside the project below, so a relative path must be made absolute first.
project=$(cd "$project" 2>/dev/null && pwd) ||
  usage_error "FRAISIER_PROJECT ${FRAISIER_PROJECT:-} is not a folder"
export FRAISIER_PROJECT=$project
log_file=${DEPLOY_LOG:-$project/var/log/deploy-$env_name.log}
[[ $log_file == /* ]] || log_file=$PWD/$log_file
mkdir -p "$(dirname "$log_file")"

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

# The run's summary and the messages of the error lines; the other JSON log lines are in the
# log file.
details() {
  cat "$summary"
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        record = json.loads(line)
    except ValueError:
        print(line, end="")
        continue
    if record.get("level") in ("ERROR", "CRITICAL"):
        print("error:", record.get("message"))
' <"$errors" || true
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
  kill -0 "$pid" 2>/dev/null && continue
  # Fraisier has exited. bash keeps its status, so this wait returns Fraisier's own code even
  # when a signal cut the wait above short.
  code=0
  wait "$pid" || code=$?
  break
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
