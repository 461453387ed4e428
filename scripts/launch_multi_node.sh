#!/usr/bin/env bash
# Train on several machines: run this same command on every node.
#
#   MASTER_ADDR=node0.example NNODES=4 JOB_ID=run7 bash scripts/launch_multi_node.sh CONFIG DATA OUT [overrides]
#
# The nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:PORT (any node's address;
# that node hosts the rendezvous store), so no node rank needs to be given. DATA and OUT must be
# on a filesystem every node sees (checkpoints are written by all ranks into OUT).
#   NNODES         number of machines (required)
#   MASTER_ADDR    host name or IP of one of them (required)
#   JOB_ID         a name shared by the nodes of one job, different for every job (default:
#                  $SLURM_JOB_ID, else pretrain-$(basename OUT)); it is the rendezvous id and
#                  gives the port: 20000 + id mod 9000 for a number, a hash of it otherwise
#                  (python -m pretrain.launch --print-port --job-id ID prints it), so two jobs
#                  whose agents share a node do not both ask for torchrun's 29500
#   MASTER_PORT    a port to use instead of the derived one
#   NPROC          processes per node (default: its GPU count)
#   MAX_RESTARTS   times torchrun restarts the processes after one fails (default 0); each
#                  restart resumes from the latest checkpoint of OUT. Every node must use the
#                  same value
#   DIST_TIMEOUT   seconds a collective may wait for the slowest rank (default: torch's, 10 min)
# The ranks' environment (NCCL error handling, the flight recorder, threads) is pretrain.launch's;
# export NCCL_SOCKET_IFNAME / NCCL_IB_HCA / GLOO_SOCKET_IFNAME here when NCCL or gloo picks the
# wrong network interface (docs/training.md, "Clusters").
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
JOB_ID=${JOB_ID:-${SLURM_JOB_ID:-pretrain-$(basename "$OUT")}}
source scripts/forward_signals.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# An endpoint without a port gets the job's port from pretrain.launch.
run_torchrun "$PY" -m pretrain.launch --job-id="$JOB_ID" \
  ${DIST_TIMEOUT:+--dist-timeout="$DIST_TIMEOUT"} \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR${MASTER_PORT:+:$MASTER_PORT}" \
  --rdzv-id="$JOB_ID" \
  -m pretrain.train --config "$CONFIG" --data "$DATA" --out "$OUT" \
  --checkpoint.resume auto "$@"
