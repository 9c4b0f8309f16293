#!/usr/bin/env bash
# The main job on one machine: installs what is missing, builds, starts the project's
# ThingsBoard-compatible CoAP server on loopback and runs tb-agent against it. You see the agent
# provision itself, then telemetry arrive. Usage: scripts/demo.sh [SECONDS]   (default 20; 0 = until Ctrl-C)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20}
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target tb-agent tb-test-server

demo=$(mktemp -d /tmp/tb-agent-demo.XXXXXX)
server_log="$demo/server.out"
cleanup() {
  [[ -n "${agent_pid:-}" ]] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [[ -n "${server_pid:-}" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

# The server: "allow create new devices" provisioning, like a ThingsBoard device profile.
mkfifo "$demo/ctl"
build/tests/server/tb-test-server --port 0 --bind 127.0.0.1 --state "$demo/server-state.json" \
  --record "$demo/requests.jsonl" --provision-key demo-key --provision-secret demo-secret \
  --strategy allow_create <"$demo/ctl" >"$server_log" &
server_pid=$!
exec 3>"$demo/ctl"  # keep the control pipe open so the server keeps running
for _ in $(seq 100); do grep -q "listening on" "$server_log" 2>/dev/null && break; sleep 0.05; done
port=$(awk '/listening on/ {print $NF; exit}' "$server_log")
echo "== tb-test-server listening on 127.0.0.1:$port (requests logged below)"

# The machine's own health (built in), a program's JSON (exec) and, where there is one, a sysfs
# file: one source of each type.
sources='
  - name: host
    type: system
    interval: 2s
  - name: processes
    type: exec
    command: ["/bin/sh", "-c", "printf \"{\\\"processes\\\": %s}\" $(ls -d /proc/[0-9]* | wc -l)"]
    interval: 5s
    timeout: 1s'
if [[ -r /sys/class/thermal/thermal_zone0/temp ]]; then
  sources+='
  - name: zone0
    type: file
    path: /sys/class/thermal/thermal_zone0/temp
    key: zone0_temperature
    scale: 0.001
    interval: 5s'
fi
cat >"$demo/tb-agent.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $port
device:
  name: demo-$(hostname)
provisioning:
  key: demo-key
  secret: demo-secret
state_dir: $demo/state
sources:$sources
delivery:
  flush_interval: 1s
dbus:
  bus: none
YAML
echo "== config: $demo/tb-agent.yaml"
build/src/tb-agent --check-config --config "$demo/tb-agent.yaml"
echo "== tb-agent running (Ctrl-C to stop)"
build/src/tb-agent --config "$demo/tb-agent.yaml" --log-target=stderr &
agent_pid=$!
if [[ "$duration" == 0 ]]; then
  wait "$agent_pid"
else
  sleep "$duration"
  kill -TERM "$agent_pid"
  wait "$agent_pid" && echo "== tb-agent stopped cleanly (exit 0)"
  agent_pid=""
fi
echo "== what the server received"
echo "stats" >&3
sleep 0.3
tail -n 1 "$server_log"
echo "last telemetry payload received:"
grep '"feature":"telemetry"' "$demo/requests.jsonl" | tail -n 1 |
  python3 -c 'import json,sys; print(json.dumps(json.loads(json.loads(sys.stdin.read())["payload"]), indent=2))'
echo "credentials stored in $demo/state/credentials.json:"
ls -l "$demo/state/credentials.json"
