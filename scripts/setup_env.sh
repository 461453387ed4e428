#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv, or $VENV) and install the project.
#
# torch: on a machine with an NVIDIA GPU, pip's default torch (a CUDA build). Without one, the
# CPU build: TORCH_SPEC (default torch==2.13.0) from TORCH_INDEX_URL when set, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, so no multi-GB CUDA wheel is pulled.
# Usage: source-free; `bash scripts/setup_env.sh [extra]` installs .[extra] (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRA=${1:-dev}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "$PY" -m pip install -q torch
  else
    spec=${TORCH_SPEC:-torch==2.13.0}
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch ($spec)"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "$PY" -m pip install -q "$spec" --index-url "$TORCH_INDEX_URL"
    else
      "$PY" -m pip install -q "$spec"
    fi
  fi
fi

# Reinstall the project only when its dependency list changed.
stamp="$VENV/.pretrain-installed-$EXTRA"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import pretrain" 2>/dev/null; then
  echo "[setup] installing pretrain[$EXTRA] (editable)"
  "$PY" -m pip install -q -e ".[$EXTRA]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")')"
