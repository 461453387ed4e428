#!/usr/bin/env bash
# Set up the environment and run the test suite on CPU.
#   bash scripts/test.sh            the default suite (fast; under 15 minutes on 2 cores)
#   bash scripts/test.sh --slow     only the slow end-to-end tests
#   bash scripts/test.sh --all      everything
# Any other arguments go to pytest (e.g. bash scripts/test.sh tests/test_config.py -x).
# The tests run in TEST_WORKERS parallel processes (default: the number of cores, at most 4),
# each file's tests in one process (their shared fixtures are built once); TEST_WORKERS=0 runs
# them all in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
PY="${VENV:-.venv}/bin/python"

marker=()
case "${1:-}" in
  --slow) marker=(-m slow); shift ;;
  --all) marker=(-m "slow or not slow"); shift ;;
esac
workers=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
# One BLAS thread per worker: the workers, not the threads, share out the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( workers > 1 ? 1 : 2 ))} OPENBLAS_NUM_THREADS=1
export WANDB_MODE=offline
exec "$PY" -m pytest "${parallel[@]}" "${marker[@]}" "$@"
