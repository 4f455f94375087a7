#!/usr/bin/env bash
# The deploy job of CI: check out the merged commit, deploy exactly that commit to one
# environment, and turn Fraisier's exit code into the job's result and a clear message.
#
# Usage: deploy.sh ENV COMMIT
#
# Run it in the job's clone of the repository that contains this project. The fraise's source is
# that clone ('source: {git: .}' in the inventory), so --ref COMMIT deploys the code of the
# commit whose inventory and recipe are checked out here.
#
# Environment:
#   FRAISIER_PROJECT   project folder that contains inventories/ (default: this script's folder)
#   DEPLOY_JSON        file that receives the run's JSON summary (default: ./deploy.json)
#   DEPLOY_WAIT_LOCK   seconds to wait for a deploy lock held by another run (default: 300)
#   FRAISIER           the Fraisier command (default: fraisier)
# Secrets such as FRAISIER_DATABASE_PASSWORD come from the CI secret store as environment
# variables; this script never prints the environment.
#
# Exit status: Fraisier's exit code, so every code but 0 fails the job; 2 for a usage error of
# this script.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: deploy.sh ENV COMMIT" >&2
  exit 2
fi
env_name=$1
commit=$2
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=${FRAISIER_PROJECT:-$script_dir}
# Fraisier runs from inside the project below, so a relative path must be made absolute first.
if ! project=$(cd "$project" 2>/dev/null && pwd); then
  echo "error: FRAISIER_PROJECT ${FRAISIER_PROJECT:-} is not a folder" >&2
  exit 2
fi
export FRAISIER_PROJECT=$project
result=${DEPLOY_JSON:-deploy.json}
[[ $result == /* ]] || result=$PWD/$result
# A summary left by an earlier job in a reused work folder must not pass for this run's.
rm -f "$result"
wait_lock=${DEPLOY_WAIT_LOCK:-300}

if ! git -C "$project" checkout --quiet --detach "$commit"; then
  echo "error: cannot check out $commit in $project; is it a commit of this repository?" >&2
  exit 2
fi

code=0
(cd "$project" && exec ${FRAISIER:-fraisier} deploy --env "$env_name" --ref "$commit" \
  --wait-lock "$wait_lock" --json) >"$result" || code=$?

# One line per host from the JSON summary; empty when the run stopped before it started.
hosts() {
  python3 - "$result" <<'PY' || true
import json, sys
for run in json.load(open(sys.argv[1])):
    for h in run["hosts"]:
        line = f"  {run['fraise']} {h['host']}: {h['status']}, on {h['final_release'] or 'no release'}"
        print(line + (f" ({h['error']})" if h["error"] else ""))
PY
}

case $code in
  0)
    echo "deployed $commit to $env_name"
    hosts
    ;;
  1)
    echo "error: deploy of $commit to $env_name failed (exit 1); hosts that failed after the switch were rolled back" >&2
    hosts >&2
    ;;
  2)
    echo "error: deploy of $commit to $env_name not started: configuration error (exit 2); fix the inventory or recipe in this commit" >&2
    ;;
  3)
    echo "error: rollback failed during the deploy of $commit to $env_name (exit 3): a host needs manual action; check it with 'fraisier releases --env $env_name'" >&2
    hosts >&2
    ;;
  4)
    echo "error: another run held the deploy lock of $env_name for more than ${wait_lock}s (exit 4); no host changed; re-run this job when that run has ended" >&2
    ;;
  5)
    echo "error: deploy of $commit to $env_name failed on the run database (exit 5)" >&2
    ;;
  130 | 143)
    echo "error: deploy of $commit to $env_name was interrupted (exit $code); see deploy.json for each host's release" >&2
    hosts >&2
    ;;
  *)
    echo "error: deploy of $commit to $env_name exited $code" >&2
    ;;
esac
exit "$code"
