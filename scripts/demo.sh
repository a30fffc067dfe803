#!/usr/bin/env bash
# `make demo`: the whole product on this machine. First the AWS stage: site.yml with inventories/local
# builds the network, directory, database and GPU hosts in the local AWS emulator and prints the summary.
# Then the host stage: the agent, supervising the real `ollama` when it is on PATH and the simulator
# otherwise; it waits until the agent is ready, shows its status, streams a chat through the proxy with a
# key, prints the usage summary, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
DEMO_DIR="${LLMFLEET_DEMO_DIR:-/tmp/llmfleet-demo}"
AGENT_PORT="${LLMFLEET_DEMO_PORT:-18443}"
OLLAMA_PORT="${LLMFLEET_DEMO_OLLAMA_PORT:-21434}"
MODEL="${LLMFLEET_DEMO_MODEL:-tinyllama:latest}"
EMULATOR_PORT="${LLMFLEET_EMULATOR_PORT:-5000}"
export AWS_ENDPOINT_URL="http://127.0.0.1:$EMULATOR_PORT"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

for port in "$AGENT_PORT" "$OLLAMA_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use on 127.0.0.1 (set LLMFLEET_DEMO_PORT / LLMFLEET_DEMO_OLLAMA_PORT)"
  fi
done

emulator_started=""
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
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

step "ansible-playbook site.yml -i inventories/local: network, directory, database, GPU hosts (about a minute)"
"$BIN/ansible-playbook" -i inventories/local site.yml

step "the host stage: this machine as the GPU host"
if command -v ollama >/dev/null 2>&1; then
  command='["ollama", "serve"]'
  sim_env=""
  step "using the real ollama at $(command -v ollama)"
else
  command="[\"$BIN/llmfleet-ollama-sim\", \"serve\"]"
  sim_env="env: {LLMFLEET_SIM_TOKEN_DELAY: \"0.08\"}"   # slow enough to watch the stream arrive
  step "ollama is not on PATH: using llmfleet-ollama-sim, the stand-in for demos (it echoes, it is not a model)"
fi

step "writing a fresh configuration in $DEMO_DIR"
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR/models"
cat > "$DEMO_DIR/agent.yaml" <<YAML
listen: {host: 127.0.0.1, port: $AGENT_PORT}
ollama:
  command: $command
  port: $OLLAMA_PORT
  models: ["$MODEL"]
  models_dir: $DEMO_DIR/models
  $sim_env
store: {url: "sqlite:///$DEMO_DIR/agent.db"}
logging: {format: text}
YAML
"$BIN/llmfleet-agent" check-config --config "$DEMO_DIR/agent.yaml"

step "creating an operator key (shown once; only its hash is stored)"
export LLMFLEET_API_KEY
LLMFLEET_API_KEY=$("$BIN/llmfleet-agent" keys create --config "$DEMO_DIR/agent.yaml" --name demo-operator --role operator)
echo "key: ${LLMFLEET_API_KEY:0:12}… (full key in \$LLMFLEET_API_KEY for this run)"

step "starting the agent on http://127.0.0.1:$AGENT_PORT (log: $DEMO_DIR/agent.log)"
"$BIN/llmfleet-agent" serve --config "$DEMO_DIR/agent.yaml" >"$DEMO_DIR/agent.log" 2>&1 &
agent_pid=$!

step "waiting until /readyz answers 200 (Ollama running, $MODEL pulled)"
last=""
for _ in $(seq 1 600); do
  kill -0 "$agent_pid" 2>/dev/null || { tail -n 20 "$DEMO_DIR/agent.log" >&2; die "the agent exited"; }
  body=$(curl -s "http://127.0.0.1:$AGENT_PORT/readyz" || true)
  if [ "$body" != "$last" ] && [ -n "$body" ]; then echo "   readyz: $body"; last=$body; fi
  case "$body" in *'"ready": true'*) break ;; esac
  sleep 0.1
done
case "$last" in *'"ready": true'*) ;; *) die "not ready after 60 s; see $DEMO_DIR/agent.log" ;; esac

step "llmfleet-agent status"
"$BIN/llmfleet-agent" status --config "$DEMO_DIR/agent.yaml"

step "creating a user key and streaming a chat through the proxy with the openai client"
LLMFLEET_USER_KEY=$("$BIN/llmfleet-agent" keys create --config "$DEMO_DIR/agent.yaml" --name demo-user --role user) \
  "$BIN/python" scripts/demo_chat.py "http://127.0.0.1:$AGENT_PORT" "$MODEL"

step "the same request without a key is refused"
curl -s -o /dev/null -w "   HTTP %{http_code} for /v1/chat/completions without a key\n" \
  "http://127.0.0.1:$AGENT_PORT/v1/chat/completions" -d '{"model": "x", "messages": []}'

step "stopping the agent (SIGTERM): it stops Ollama and exits"
kill -TERM "$agent_pid"
wait "$agent_pid" || true
if pgrep -f -- "--config $DEMO_DIR/agent.yaml" >/dev/null || pgrep -f "$BIN/llmfleet-ollama-sim" >/dev/null; then
  die "something is still running"
fi
echo "stopped; nothing left running. Log: $DEMO_DIR/agent.log"

step "usage records (written in the background, flushed at stop: llmfleet-agent usage)"
"$BIN/llmfleet-agent" usage --config "$DEMO_DIR/agent.yaml" --by key

if [ -n "$emulator_started" ]; then
  step "stopping the emulator (what site.yml built there goes with it)"
fi
