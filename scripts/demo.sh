#!/usr/bin/env bash
# The main job on one machine: installs what is missing, builds, starts the project's
# ThingsBoard-compatible CoAP server on loopback and runs tb-agent against it. You see the agent
# provision itself, then telemetry arrive. Usage: scripts/demo.sh [--dtls] [SECONDS]
# (default 20; 0 = until Ctrl-C). With --dtls the same runs over CoAP over DTLS 1.2 (coaps): a
# throwaway CA and server certificate are made with openssl, tb-test-dtls-proxy terminates DTLS
# in front of the server as ThingsBoard's transport does, and the agent verifies the server's
# certificate against that CA (server.dtls.ca_file) and sends its token over one-way DTLS.
set -euo pipefail
cd "$(dirname "$0")/.."
dtls=0
if [[ "${1:-}" == "--dtls" ]]; then
  dtls=1
  shift
fi
duration=${1:-20}
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
targets=(tb-agent tb-test-server)
[[ $dtls == 1 ]] && targets+=(tb-test-dtls-proxy)
cmake --build build -j"$(nproc)" --target "${targets[@]}"

demo=$(mktemp -d /tmp/tb-agent-demo.XXXXXX)
server_log="$demo/server.out"
cleanup() {
  [[ -n "${agent_pid:-}" ]] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [[ -n "${proxy_pid:-}" ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true
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
host=127.0.0.1
dtls_config=""
if [[ $dtls == 1 ]]; then
  # A throwaway CA and a server certificate it signs (ECDSA, as ThingsBoard's docs require).
  pki="$demo/pki"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=tb-agent demo CA" -days 2 -out ca.crt
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
      -extfile server.ext -out server.crt
  ) >"$pki/openssl.log" 2>&1
  build/tests/server/tb-test-dtls-proxy --listen 127.0.0.1:0 --upstream "127.0.0.1:$port" \
    --cert "$pki/server.crt" --key "$pki/server.key" >"$demo/proxy.out" &
  proxy_pid=$!
  for _ in $(seq 100); do grep -q "listening" "$demo/proxy.out" 2>/dev/null && break; sleep 0.05; done
  port=$(awk '/listening/ {n = split($2, a, ":"); print a[n]; exit}' "$demo/proxy.out")
  host=localhost  # the name in the server certificate, which the agent checks
  dtls_config="
  dtls:
    ca_file: $pki/ca.crt"
  echo "== tb-test-dtls-proxy: coaps://localhost:$port -> the server (CA: $pki/ca.crt)"
fi

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
  host: $host
  port: $port$dtls_config
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
