#!/usr/bin/env bash
# The main job on a fresh clone, every stage on the default corpus with the tiny config:
#   set up .venv -> prepare (Python's own stdlib as the corpus) -> train -> plot -> export
#   -> serve in the background -> one completion and one chat request with curl -> stop.
# Runs on a CPU (about 6 minutes on 2 cores from a fresh clone) or a GPU. Stops with a clear message at the first
# failing step. Knobs: QUICKSTART_STEPS (training steps, default 200), QUICKSTART_PORT (8765).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${QUICKSTART_STEPS:-200}
PORT=${QUICKSTART_PORT:-8765}
DATA=data/stdlib
RUN=runs/quickstart
MODEL=models/quickstart
CURRENT="setup"
SERVER_PID=""

step() {
  CURRENT="$*"
  echo
  echo "==> [$(date +%H:%M:%S)] $*"
}
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap 'status=$?; cleanup; if [ $status -ne 0 ]; then echo; echo "quickstart: FAILED at step: $CURRENT (exit $status)" >&2; fi' EXIT

step "setting up the environment (.venv)"
bash scripts/setup_env.sh dev
export PATH="$PWD/.venv/bin:$PATH"
export WANDB_MODE=${WANDB_MODE:-offline}

step "preparing the default corpus (the Python standard library) into $DATA"
pretrain prepare --out "$DATA" --vocab-size 8192

step "training the tiny model for $STEPS steps into $RUN"
rm -rf "$RUN"
pretrain train --config configs/tiny.toml --data "$DATA" --out "$RUN" \
  --train.steps "$STEPS" --train.warmup_steps 20 --eval.every 50 --logging.every 10 \
  --checkpoint.every 100

step "plotting the loss curves"
pretrain plot "$RUN"

step "exporting the final checkpoint to $MODEL (Hugging Face Llama layout)"
pretrain export "$RUN" --out "$MODEL" --overwrite

step "generating from the export"
pretrain generate "$MODEL" --prompt "def fibonacci(n):" --max-tokens 48 --temperature 0

step "serving $MODEL on 127.0.0.1:$PORT"
pretrain serve "$MODEL" --host 127.0.0.1 --port "$PORT" &
SERVER_PID=$!
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null

step "a completion request"
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "quickstart", "prompt": "import os\nimport sys\n\ndef main(", "max_tokens": 48, "temperature": 0}' \
  | python -c 'import json, sys; r = json.load(sys.stdin); print(r["choices"][0]["text"]); print("usage:", r["usage"])'

step "a chat request"
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "quickstart", "messages": [{"role": "user", "content": "Write a function that adds two numbers."}], "max_tokens": 48, "temperature": 0}' \
  | python -c 'import json, sys; r = json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print("usage:", r["usage"])'

step "stopping the server"
cleanup
SERVER_PID=""

echo
echo "quickstart: done. Loss curves: $RUN/metrics.png  metrics: $RUN/metrics.jsonl  export: $MODEL"
