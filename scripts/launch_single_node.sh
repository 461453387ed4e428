#!/usr/bin/env bash
# Train on every GPU of one machine (or N CPU processes with gloo when there is no GPU).
#
#   bash scripts/launch_single_node.sh CONFIG DATA OUT [--section.key value ...]
#   NPROC=8 bash scripts/launch_single_node.sh configs/gpt2-124m.toml data/fineweb runs/gpt2
#
# NPROC defaults to the number of visible GPUs (1 process per GPU), or 2 on a CPU-only machine.
# Rerunning the same command after a crash or a preemption continues from the latest checkpoint.
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
run_torchrun "$PY" -m pretrain.launch --standalone --nproc_per_node="$NPROC" \
  -m pretrain.train --config "$CONFIG" --data "$DATA" --out "$OUT" \
  --checkpoint.resume auto "$@"
