#!/usr/bin/env bash
# Set up the environment and run the test suite on CPU.
#   bash scripts/test.sh            the default suite (fast; under 15 minutes on 2 cores)
#   bash scripts/test.sh --slow     only the slow end-to-end tests
#   bash scripts/test.sh --all      everything
# Any other arguments go to pytest (e.g. bash scripts/test.sh tests/test_config.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
PY="${VENV:-.venv}/bin/python"

marker=()
case "${1:-}" in
  --slow) marker=(-m slow); shift ;;
  --all) marker=(-m "slow or not slow"); shift ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=1 WANDB_MODE=offline
exec "$PY" -m pytest "${marker[@]}" "$@"
