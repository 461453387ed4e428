#!/usr/bin/env bash
# GPU check for any CUDA machine, from the checkout (PYTHONPATH=., nothing installed), in under
# 10 minutes:
#   1. kernel correctness on the GPU (scripts/gpu_correctness.py: every op, AdamW plain and
#      clipped, Newton-Schulz and Muon against a float64 reference and PyTorch's own ops,
#      fp32/bf16/fp16),
#   2. kernel benchmarks against PyTorch (scripts/bench_kernels.py --quick),
#   3. llama-1b (configs/llama-1b.toml) on one GPU with activation checkpointing none, selective
#      and full: tokens/s, MFU and peak memory of each (scripts/bench_train.py --only ac; random
#      tokens, micro batch AC_MICRO x 2048, 3 warm-up and AC_STEPS timed steps),
#   4. a short gpt2-124m training run (configs/gpt2-124m.toml, fewer steps) reporting MFU, on data
#      prepared on the fly from this Python's standard library (needs tokenizers, nothing else
#      beyond torch and numpy; skipped with a message otherwise),
#   5. the gpt2-124m run on 2 processes (torchrun) when the machine has 2 or more GPUs,
# then one summary table, also written as JSON to OUT/gpu_check.json.
#
#   bash scripts/gpu_check.sh [OUT]        (default OUT: runs/gpu_check)
# Environment: PYTHON (default: .venv/bin/python if present, else python3), TRAIN_STEPS (30),
# AC_STEPS (10), AC_MICRO (8: about 60 GB without checkpointing; use 2 on a 40 GB GPU).
# Exit status: 0 when every step that ran passed, 1 otherwise; 0 with a message without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
STEPS=${TRAIN_STEPS:-30}
BUDGET=590  # seconds for the whole check, the summary included
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check"
  exit 0
fi
N_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: $N_GPUS GPU(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name())"), results in $OUT"

: >"$OUT/steps.tsv"
# run_step NAME MAX_SECONDS CMD...: run CMD with a timeout that keeps the whole check in budget,
# log it to OUT/NAME.log and record "name status seconds" for the summary.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS - 15))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    printf '%s\tskipped (time budget spent)\t0\n' "$name" >>"$OUT/steps.tsv"
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  case ${PIPESTATUS[0]} in
    0) status=ok ;;
    124 | 137) status="FAIL (timed out after ${limit}s)" ;;
    *) status=FAIL ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$OUT/steps.tsv"
}

run_step correctness 150 "$PY" scripts/gpu_correctness.py --json "$OUT/correctness.json"
run_step bench 230 "$PY" scripts/bench_kernels.py --quick --json "$OUT/bench.json"
# llama-1b with each activation checkpointing mode (random tokens: needs no data)
rm -f "$OUT/train_ac.json"
run_step train_ac 150 "$PY" scripts/bench_train.py --only ac --gpu-steps "${AC_STEPS:-10}" \
  --ac-micro "${AC_MICRO:-8}" --json "$OUT/train_ac.json"

# Training data: the standard library's top-level modules, tokenized with a GPT-2-sized BPE.
# Plain text files need only tokenizers (not datasets; blake2b checksums when xxhash is missing).
if "$PY" -c "import tokenizers" 2>/dev/null; then
  STDLIB=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  run_step prepare 90 "$PY" -m pretrain.cli prepare --out "$OUT/data" --input "$STDLIB/*.py" \
    --vocab-size 50304 --val-fraction 0.02
  VOCAB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
    "$OUT/data/manifest.json" 2>/dev/null || echo 50304)
  TRAIN_ARGS=(--config configs/gpt2-124m.toml --data "$OUT/data" --model.vocab_size "$VOCAB"
    --train.steps "$STEPS" --train.warmup_steps 5 --train.global_batch_size 64
    --train.micro_batch_size 16 --eval.every 0 --logging.every 10 --checkpoint.every 0
    --logging.wandb false)
  rm -rf "$OUT/train-1gpu" "$OUT/train-2gpu"
  run_step train_1gpu 150 "$PY" -m pretrain.train "${TRAIN_ARGS[@]}" --out "$OUT/train-1gpu"
  if ((N_GPUS >= 2)); then
    run_step train_2gpu 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
      -m pretrain.train "${TRAIN_ARGS[@]}" --out "$OUT/train-2gpu"
  else
    printf 'train_2gpu\tskipped (one GPU)\t0\n' >>"$OUT/steps.tsv"
  fi
else
  printf 'train_1gpu\tskipped (needs tokenizers: pip install tokenizers)\t0\n' \
    >>"$OUT/steps.tsv"
fi

"$PY" - "$OUT" <<'EOF'
"""One summary table of the whole check (printed last) and OUT/gpu_check.json."""
import json
import os
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else {}


def last_train_record(run):
    path = out / run / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    return train[-1] if train else {}


def best(rows, impl, key, **match):
    values = [r[key] for r in rows if r.get("impl") == impl and key in r
              and all(r.get(k) == v for k, v in match.items())]
    return max(values) if values else None


def ac_note(rows):
    """'none 41,000 tok/s MFU 45.1% 60 GB; selective ...' for the summary line."""
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"{r.get('activation_checkpointing')} failed")
            continue
        m = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.0f} GB"
        parts.append(f"AC {r['activation_checkpointing']}: {r['tokens_per_s']:,.0f} tok/s "
                     f"MFU {m} peak {mem}")
    return "; ".join(parts)


def num(x, unit=""):
    return "-" if x is None else (f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:.0f}{unit}")


steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
corr, bench, ac = load("correctness.json"), load("bench.json"), load("train_ac.json")
notes = {}
if ac:
    notes["train_ac"] = ac_note(ac.get("activation_checkpointing", []))
if corr:
    checks = corr.get("checks", [])
    notes["correctness"] = f"{sum(c['ok'] for c in checks)}/{len(checks)} checks pass"
if bench:
    att, adam = bench.get("attention", []), bench.get("adamw", [])
    xent, pw = bench.get("linear_cross_entropy", []), bench.get("pointwise", [])
    parts = []
    for case in ("mha d128 T4096", "gqa d128 T4096"):
        parts.append(f"attn {case} fwd+bwd TFLOP/s ours {num(best(att, 'ours', 'fwd_bwd_tflops', case=case))}"
                     f" flash {num(best(att, 'sdpa-flash', 'fwd_bwd_tflops', case=case))}")
    for dtype in ("float32", "bfloat16"):
        parts.append(f"adamw {dtype} GB/s ours {num(best(adam, 'ours', 'gbps', dtype=dtype))}"
                     f" fused {num(best(adam, 'torch-fused', 'gbps', dtype=dtype))}")
    parts.append(f"linear+CE peak MiB ours {num(best(xent, 'ours', 'peak_mib'))}"
                 f" unfused {num(best(xent, 'torch-unfused', 'peak_mib'))}")
    for op in ("rms_norm", "swiglu", "rope"):
        parts.append(f"{op} fwd+bwd GB/s ours {num(best(pw, 'ours', 'fwd_bwd_gbps', op=op))}"
                     f" compile {num(best(pw, 'torch-compile', 'fwd_bwd_gbps', op=op))}")
    notes["bench"] = "; ".join(parts)
for run, name in (("train-1gpu", "train_1gpu"), ("train-2gpu", "train_2gpu")):
    rec = last_train_record(run)
    if rec:
        notes[name] = (f"step {rec.get('step')} loss {num(rec.get('loss'))} "
                       f"tokens/s {num(rec.get('tokens_per_s'))} MFU {num(rec.get('mfu'))}")

rows = [(name, status, secs, notes.get(name, "")) for name, status, secs in steps]
report = {"steps": [dict(zip(("step", "status", "seconds", "result"), r)) for r in rows],
          "correctness": corr, "bench": bench, "train_ac": ac,
          "train_1gpu": last_train_record("train-1gpu"), "train_2gpu": last_train_record("train-2gpu"),
          "ok": all(r[1] == "ok" or r[1].startswith("skipped") for r in rows)}
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(report, indent=2) + "\n")
os.replace(tmp, out / "gpu_check.json")

print("\n== gpu_check summary")
width = max(len(r[0]) for r in rows)
swidth = max(len(r[1]) for r in rows)
for name, status, secs, note in rows:
    print(f"{name:<{width}}  {status:<{swidth}}  {secs:>4}s  {note.replace('; ', chr(10) + ' ' * (width + swidth + 10))}")
print(f"report: {out / 'gpu_check.json'}")
sys.exit(0 if report["ok"] else 1)
EOF
