#!/usr/bin/env bash
# Train on every GPU of one machine (or N CPU processes with gloo when there is no GPU).
#
#   bash scripts/launch_single_node.sh CONFIG DATA OUT [--section.key value ...]
#   NPROC=8 MAX_RESTARTS=3 bash scripts/launch_single_node.sh configs/gpt2-124m.toml data/fineweb runs/gpt2
#
#   NPROC          processes (default: the number of visible GPUs, 1 per GPU; 2 on a CPU-only machine)
#   MAX_RESTARTS   times torchrun restarts all processes after one fails (default 0); each restart
#                  resumes from the latest checkpoint of OUT
#   DIST_TIMEOUT   seconds a collective may wait for the slowest rank (default: torch's, 10 min)
# Rerunning the same command after a crash or a preemption continues from the latest checkpoint.
# The rendezvous is torchrun's --standalone: a free port of its own, so two runs on one machine
# never collide. The environment the ranks see (NCCL error handling, thread counts) is
# pretrain.launch's (python -m pretrain.launch --print-env prints it); export a variable to override.
#
# SIGTERM, SIGUSR1 or Ctrl-C to this script is passed to the training processes: they save and
# exit 0 and OUT/status.json says "preempted" (a finished run: "finished"). A signal to the
# torchrun agent itself works too (pretrain.launch; see scripts/forward_signals.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG DATA OUT [--section.key value ...]" >&2
  exit 2
fi
CONFIG=$1 DATA=$2 OUT=$3
shift 3
PY="${VENV:-.venv}/bin/python"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
source scripts/forward_signals.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run_torchrun "$PY" -m pretrain.launch ${DIST_TIMEOUT:+--dist-timeout="$DIST_TIMEOUT"} \
  --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  -m pretrain.train --config "$CONFIG" --data "$DATA" --out "$OUT" \
  --checkpoint.resume auto "$@"
