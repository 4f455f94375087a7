# Shell functions of the blue-green recipe's steps and of its "restart", sourced from shared/.
# They run in shared/ and read PYTHON, BIND, PORT, BLUE_PORT, GREEN_PORT and PROBE_PATH.

port_of() {
  if [ "$1" = blue ]; then echo "$BLUE_PORT"; else echo "$GREEN_PORT"; fi
}

# The address at which the router and the probes reach the slots: BIND, or loopback when
# BIND is every address.
local_address() {
  case "$BIND" in 0.0.0.0 | '') echo 127.0.0.1 ;; *) echo "$BIND" ;; esac
}

# The slot that gets no traffic, which is blue before the first deploy.
idle_slot() {
  if [ "$(cat live 2>/dev/null)" = "$BLUE_PORT" ]; then echo green; else echo blue; fi
}

# True when slot $1 runs the release folder $2.
slot_runs() {
  pid=$(cat "$1.pid" 2>/dev/null) && grep -qF "$2/app.py" "/proc/$pid/cmdline" 2>/dev/null
}

# Stop slot $1 and wait up to 5 s. A zombie (State Z) has exited but is not reaped yet.
stop_slot() {
  pid=$(cat "$1.pid" 2>/dev/null) || return 0
  # A pid that now names another program, or none, has nothing to stop.
  grep -qF /app.py "/proc/$pid/cmdline" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "slot $1 (pid $pid) did not stop within 5 s" >&2
  return 1
}

# Wait up to 10 s until the URL $1 responds with a 2xx status.
wait_http() {
  "$PYTHON" -c '
import sys, time, urllib.request
for _ in range(50):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=1):
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(sys.argv[1] + " did not answer with a 2xx status within 10 s")' "$1"
}

# True when slot $1 responds on PROBE_PATH with a 2xx status within 2 s.
slot_responds() {
  "$PYTHON" -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2):
        pass
except OSError:
    sys.exit(1)' "http://$(local_address):$(port_of "$1")$PROBE_PATH"
}

# Start the release folder $2 in slot $1 and wait until it responds on PROBE_PATH.
start_slot() {
  stop_slot "$1" || return 1
  mkdir -p log
  nohup "$PYTHON" "$2/app.py" --host "$BIND" --port "$(port_of "$1")" \
    < /dev/null >> "log/$1.log" 2>&1 &
  echo $! > "$1.pid"
  if ! wait_http "http://$(local_address):$(port_of "$1")$PROBE_PATH"; then
    echo "slot $1 did not start $2; last lines of log/$1.log:" >&2
    tail -n 5 "log/$1.log" >&2
    return 1
  fi
}

# Send traffic to slot $1: a new file renamed over "live", since rename(2) is atomic.
route_to() {
  port_of "$1" > live.new && mv -f live.new live
}

# Start the router unless it runs: it keeps running across deploys and rollbacks.
start_router() {
  pid=$(cat router.pid 2>/dev/null) &&
    grep -qF router.py "/proc/$pid/cmdline" 2>/dev/null && return 0
  nohup "$PYTHON" "$PWD/router.py" --bind "$BIND" --port "$PORT" \
    --upstream "$(local_address)" --live "$PWD/live" < /dev/null >> log/router.log 2>&1 &
  echo $! > router.pid
  if ! wait_http "http://$(local_address):$PORT$PROBE_PATH"; then
    echo "the router did not start; last lines of log/router.log:" >&2
    tail -n 5 log/router.log >&2
    return 1
  fi
}
