#!/usr/bin/env bash
# The main job on a fresh clone: set up the environment, then run every stage on the default
# corpus with the tiny config. Stops with a clear message at the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo; echo "==> $*"; }
trap 'echo; echo "quickstart: FAILED at: ${CURRENT:-setup}" >&2' ERR

CURRENT="environment"; step "setting up the environment"
bash scripts/setup_env.sh dev
export PATH="$PWD/.venv/bin:$PATH"

CURRENT="model check"; step "building the tiny model"
python - <<'PY'
import torch
from pretrain.config import load_config
from pretrain.model import Transformer
cfg = load_config("configs/tiny.toml")
model = Transformer(cfg.model)
idx = torch.randint(0, cfg.model.vocab_size, (2, 32))
print(f"tiny model: {model.num_params()/1e6:.2f}M parameters, loss at init {model(idx, idx).item():.3f}")
PY
echo; echo "quickstart: done"
