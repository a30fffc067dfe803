#!/usr/bin/env bash
# `make demo`: the whole product on this machine, in one site.yml with inventories/local. First the AWS
# stage builds the network, directory, database and GPU hosts in the local AWS emulator and prints the
# summary; then the host stage (playbooks/configure.yml) makes this machine the GPU host (no root, every
# path under .llmfleet/llmfleet-local/host): Ollama (the real `ollama` when it is on PATH, else the
# simulator) and the agent with its keys; and the gateway (under .llmfleet/llmfleet-local/gateway). The
# demo starts that agent, waits until it is ready, shows the endpoint, the keys and the status, streams a
# chat through the proxy with a key, starts the gateway and streams the same chat through it, prints the
# usage summary, then shows wake on request and the idle sweep (scripts/demo_wake.py: the host stopped, a
# request wakes it, the answer streams, the gateway's sweep stops it again), and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
MODEL="${LLMFLEET_DEMO_MODEL:-tinyllama:latest}"
EMULATOR_PORT="${LLMFLEET_EMULATOR_PORT:-5000}"
export AWS_ENDPOINT_URL="http://127.0.0.1:$EMULATOR_PORT"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

emulator_started=""
agent_pid=""
gateway_pid=""
cleanup() {
  for pid in "$gateway_pid" "$agent_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ -n "$emulator_started" ]; then "$BIN/python" scripts/emulator.py stop --port "$EMULATOR_PORT" >/dev/null; fi
}
trap cleanup EXIT

step "the AWS stage: starting the local AWS emulator (moto's server mode) on $AWS_ENDPOINT_URL"
if "$BIN/python" scripts/emulator.py status --port "$EMULATOR_PORT" >/dev/null; then
  echo "   already running: using it (and leaving it running)"
else
  "$BIN/python" scripts/emulator.py start --port "$EMULATOR_PORT"
  emulator_started=yes
fi

if command -v ollama >/dev/null 2>&1; then
  ollama_note="the real ollama at $(command -v ollama)"
else
  ollama_note="llmfleet-ollama-sim, as ollama is not on PATH (it echoes the prompt; it is not a model)"
fi
step "ansible-playbook site.yml -i inventories/local (a minute or two)"
echo "   the AWS stage in the emulator: network, directory, database, GPU hosts, gateway, summary"
echo "   then the host stage on this machine as the GPU host, no root, under .llmfleet/: Ollama is $ollama_note"
"$BIN/ansible-playbook" -i inventories/local site.yml

STATE=.llmfleet/llmfleet-local
CONFIG="$STATE/host/etc/llmfleet/agent.yaml"
AGENT="$STATE/host/opt/llmfleet-agent/venv/bin/llmfleet-agent"
AGENT_PORT=$("$BIN/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['listen']['port'])" "$CONFIG")
OLLAMA_PORT=$("$BIN/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['ollama']['port'])" "$CONFIG")
for port in "$AGENT_PORT" "$OLLAMA_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use on 127.0.0.1"; fi
done

step "starting the agent as the role installed and configured it (no systemd here: started by hand)"
echo "   $AGENT serve --config $CONFIG   (log: $STATE/agent.log)"
"$AGENT" serve --config "$CONFIG" >"$STATE/agent.log" 2>&1 &
agent_pid=$!

step "waiting until /readyz answers 200 (Ollama running, $MODEL pulled)"
last=""
for _ in $(seq 1 600); do
  kill -0 "$agent_pid" 2>/dev/null || { tail -n 20 "$STATE/agent.log" >&2; die "the agent exited"; }
  body=$(curl -s "http://127.0.0.1:$AGENT_PORT/readyz" || true)
  if [ "$body" != "$last" ] && [ -n "$body" ]; then echo "   readyz: $body"; last=$body; fi
  case "$body" in *'"ready": true'*) break ;; esac
  sleep 0.1
done
case "$last" in *'"ready": true'*) ;; *) die "not ready after 60 s; see $STATE/agent.log" ;; esac

step "the endpoint and its keys (made on the controller; the host keeps only their hashes)"
echo "   endpoint      http://127.0.0.1:$AGENT_PORT  (OpenAI API under /v1, Ollama's under /api)"
for key in "$STATE"/keys/*.key; do
  printf '   %-13s %s…  (%s)\n' "$(basename "$key" .key)" "$(head -c 12 "$key")" "$key"
done
export LLMFLEET_API_KEY
LLMFLEET_API_KEY=$(cat "$STATE/keys/demo-operator.key")

step "llmfleet-agent status"
"$AGENT" status --config "$CONFIG"

step "a streamed chat through the proxy with the openai client and the demo-user key"
LLMFLEET_USER_KEY=$(cat "$STATE/keys/demo-user.key") \
  "$BIN/python" scripts/demo_chat.py "http://127.0.0.1:$AGENT_PORT" "$MODEL"

GW_CONFIG="$STATE/gateway/etc/llmfleet/agent.yaml"
GATEWAY="$STATE/gateway/opt/llmfleet-agent/venv/bin/llmfleet-agent"
GW_PORT=$("$BIN/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['listen']['port'])" "$GW_CONFIG")
if (exec 3<>"/dev/tcp/127.0.0.1/$GW_PORT") 2>/dev/null; then die "port $GW_PORT is in use on 127.0.0.1"; fi
step "starting the gateway, the fleet's one endpoint (llmfleet-agent gateway, as the role configured it)"
echo "   $GATEWAY gateway --config $GW_CONFIG   (log: $STATE/gateway.log)"
"$GATEWAY" gateway --config "$GW_CONFIG" >"$STATE/gateway.log" 2>&1 &
gateway_pid=$!
last=""
for _ in $(seq 1 300); do
  kill -0 "$gateway_pid" 2>/dev/null || { tail -n 20 "$STATE/gateway.log" >&2; die "the gateway exited"; }
  status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW_PORT/gateway/status" \
             -H "Authorization: Bearer $LLMFLEET_API_KEY" || true)
  models=$(curl -s "http://127.0.0.1:$GW_PORT/api/tags" -H "Authorization: Bearer $LLMFLEET_API_KEY" || true)
  case "$models" in *"$MODEL"*) break ;; esac
  sleep 0.1
done
case "$models" in *"$MODEL"*) echo "   ready: the gateway sees $MODEL on gpu-a" ;; *) die "the gateway does not see $MODEL after 30 s (status $status); see $STATE/gateway.log" ;; esac
echo "   endpoint      http://127.0.0.1:$GW_PORT  (the same APIs; on AWS the load balancer or the gateway's address)"

step "the same chat through the gateway: gateway -> agent -> Ollama, one usage record"
LLMFLEET_USER_KEY=$(cat "$STATE/keys/demo-user.key") \
  "$BIN/python" scripts/demo_chat.py "http://127.0.0.1:$GW_PORT" "$MODEL"

step "the same request without a key is refused"
curl -s -o /dev/null -w "   HTTP %{http_code} for /v1/chat/completions without a key\n" \
  "http://127.0.0.1:$AGENT_PORT/v1/chat/completions" -d '{"model": "x", "messages": []}'

step "stopping the gateway and the agent (SIGTERM): the agent stops Ollama and exits"
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
kill -TERM "$agent_pid"
wait "$agent_pid" || true
if pgrep -f -- "--config $CONFIG" >/dev/null; then die "the agent is still running"; fi
echo "   stopped; nothing of it is left running. Log: $STATE/agent.log"

step "usage records (written in the background, flushed at stop: llmfleet-agent usage)"
"$AGENT" usage --config "$CONFIG" --by key

# wake on request and the idle sweep: the emulator's fleet runs the installed agent as gpu-a while its
# instance runs; the gateway finds it in EC2, starts it for a request, and stops it again when idle
"$BIN/python" scripts/demo_wake.py "$AWS_ENDPOINT_URL" llmfleet-local "$STATE" "$MODEL"
for _ in $(seq 1 300); do pgrep -f -- "--config $CONFIG" >/dev/null || break; sleep 0.1; done
if pgrep -f -- "--config $CONFIG" >/dev/null; then die "the agent is still running after the wake demo"; fi

if [ -n "$emulator_started" ]; then
  step "stopping the emulator (what site.yml built there goes with it)"
fi
