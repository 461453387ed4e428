#!/usr/bin/env bash
# Train on several machines: run this same command on every node.
#
#   MASTER_ADDR=node0.example NNODES=4 bash scripts/launch_multi_node.sh CONFIG DATA OUT [overrides]
#
# The nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (any node's
# address; that node hosts the rendezvous store), so no node rank needs to be given. DATA and OUT
# must be on a filesystem every node sees (checkpoints are written by all ranks into OUT).
#   NNODES        number of machines (required)
#   MASTER_ADDR   host name or IP of one of them (required)
#   MASTER_PORT   a free TCP port on it (default 29500)
#   NPROC         processes per node (default: its GPU count)
#   RDZV_ID       a name shared by the nodes of one job (default: pretrain-$OUT)
# SIGTERM, SIGUSR1 or Ctrl-C to this script is passed to this node's training processes, which
# save (with the other nodes' ranks, which stop at the same step) and exit 0; OUT/status.json
# then says "preempted". A signal to the torchrun agent itself works too (pretrain.launch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ] || [ -z "${NNODES:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
  echo "usage: MASTER_ADDR=HOST NNODES=N $0 CONFIG DATA OUT [--section.key value ...]" >&2
  exit 2
fi
CONFIG=$1 DATA=$2 OUT=$3
shift 3
PY="${VENV:-.venv}/bin/python"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
source scripts/forward_signals.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run_torchrun "$PY" -m pretrain.launch \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-pretrain-$(basename "$OUT")}" \
  -m pretrain.train --config "$CONFIG" --data "$DATA" --out "$OUT" \
  --checkpoint.resume auto "$@"
