"""LoRA against full fine-tuning on the toy task: memory, seconds per step, held-out accuracy.

The toy task is the one of ``scripts/finetune_demo.py`` (and ``tests/test_finetune_toy.py``):
a briefly pretrained tiny model learns to answer "... red ...?" with "stop", "green" with "go"
and so on. Every mode fine-tunes the same base on the same rows with the same recipe
(``configs/sft-tiny.toml``), as its own ``pretrain finetune`` process, then is exported and
asked the same held-out prompts through ``pretrain generate``:

- ``full``: every weight trained (the recipe's learning rate);
- ``lora``: rank ``--rank`` adapters on q/k/v/o and gate/up/down, base frozen in fp32;
- ``lora-head``: the same plus an adapter on the output head (``lm_head`` among the targets);
- ``lora-bf16``: ``lora`` with the frozen projections kept in bf16 (``finetune.lora.base_dtype``).

Reported per mode: the peak resident memory of the fine-tuning process (``wait4``'s
``ru_maxrss``: the whole process, Python and torch included; with glibc's mmap threshold fixed
at 1 MiB by default so that freed activations do not stay in its heap, ``--mmap-threshold 0``
for glibc's own, which is faster), the bytes of the training state
(weights + gradients + AdamW's two moments, counted from the parameters), the median seconds
per step over the run's logging windows (no evaluation or checkpoint inside a window), the final
checkpoint's size, and the held-out accuracy of the exported model.

    python scripts/bench_lora.py --work runs/bench-lora              # pretrains a base first
    python scripts/bench_lora.py --work runs/bench-lora --base runs/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from finetune_demo import accuracy, export, pretrain_cli, toy_rows, write_jsonl  # noqa: E402

from pretrain.config import LORA_HEAD, LoRAConfig, ModelConfig  # noqa: E402
from pretrain.finetune import read_init  # noqa: E402
from pretrain.lora import adapter_count  # noqa: E402
from pretrain.model import Transformer  # noqa: E402

LOG_EVERY = 5  # steps per timing window


def modes(rank: int) -> dict[str, LoRAConfig | None]:
    """Each mode's adapters (None: full fine-tuning), alpha twice the rank."""
    blocks = LoRAConfig(rank=rank, alpha=2.0 * rank)
    return {
        "full": None,
        "lora": blocks,
        "lora-head": replace(blocks, targets=[*blocks.targets, LORA_HEAD]),
        "lora-bf16": replace(blocks, base_dtype="bf16"),
    }


def lora_args(lora: LoRAConfig | None, lr: float) -> list[str]:
    """The ``pretrain finetune`` overrides of a mode (full fine-tuning keeps the recipe's lr)."""
    if lora is None:
        return []
    return ["--finetune.lora.rank", str(lora.rank), "--finetune.lora.alpha", str(lora.alpha),
            "--finetune.lora.targets", ",".join(lora.targets),
            "--finetune.lora.base_dtype", lora.base_dtype, "--train.lr", str(lr)]  # fmt: skip


def num_params(model: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return Transformer(model).num_params()


def state_bytes(model: ModelConfig, lora: LoRAConfig | None) -> int:
    """Weights + gradients + AdamW moments in bytes (fp32 unless the frozen base is bf16)."""
    n = num_params(model)
    if lora is None:
        return 16 * n  # fp32 weight, gradient, exp_avg, exp_avg_sq
    trained = adapter_count(model, lora)
    with torch.device("meta"):
        m = Transformer(model)
    projections = sum(
        p.numel()
        for name, p in m.named_parameters()
        if any(f"{t}.weight" in name or f"{t}.bias" in name for t in lora.targets)
    )
    base_bytes = (2 if lora.base_dtype == "bf16" else 4) * projections + 4 * (n - projections)
    return base_bytes + 16 * trained


def finetune_process(argv: list[str], log: Path, mmap_threshold: int) -> tuple[float, int]:
    """Run ``pretrain finetune ARGV`` as a child; its wall seconds and peak RSS in bytes.

    A fixed mmap threshold (``mmap_threshold`` bytes, 0: glibc's default) hands every freed
    tensor at least that large back to the system, so the peak is what the tensors need: glibc's
    default threshold grows with the sizes freed, after which activations come from a heap that
    keeps what it ever held. Fresh pages cost time, so s/step is measured without it.
    """
    cmd = [sys.executable, "-m", "pretrain.cli", "finetune", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"fine-tuning failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux: kilobytes


def seconds_per_step(metrics: Path) -> float:
    """Median over the logging windows of (window seconds / window steps)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    times, prev_step, prev_tokens = [], 0, 0
    for r in train:
        steps, tokens = r["step"] - prev_step, r["tokens"] - prev_tokens
        if prev_step > 0:  # the first window holds the warm-up (allocation, first calls)
            times.append(tokens / r["tokens_per_s"] / steps)
        prev_step, prev_tokens = r["step"], r["tokens"]
    return statistics.median(times)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="runs/bench-lora")
    p.add_argument("--base", default=None, help="a checkpoint or export to fine-tune")
    p.add_argument("--data", default="data/stdlib", help="corpus for pretraining the base")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument(
        "--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
        help="a pretraining override, e.g. train.global_batch_size=8 (repeatable)",
    )  # fmt: skip
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument(
        "--eval-rows",
        type=int,
        default=100,
        help="held-out prompts to ask (0: memory and time only)",
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's learning rate")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=2**20,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the fine-tuning processes, for peak RSS "
        "(default 1 MiB; 0 keeps glibc's own, for s/step)",
    )
    p.add_argument("--only", default="", help="comma-separated modes (default: all)")
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides for every mode, after --")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.base:
        base = Path(args.base)
    else:
        base = work / "base"
        if not base.exists():
            print(f"==> pretraining configs/tiny.toml for {args.pretrain_steps} steps", flush=True)
            pretrain_cli("train", "--config", "configs/tiny.toml", "--data", args.data,
                         "--out", str(base), "--train.steps", str(args.pretrain_steps),
                         "--eval.every", "0", *(f"--{kv}" for kv in args.pretrain_set),
                         quiet=True)  # fmt: skip
    model_cfg = read_init(base).model
    train_rows = toy_rows(args.rows, seed=1)
    held_out = toy_rows(args.eval_rows, seed=2, exclude={r["prompt"] for r in train_rows})
    write_jsonl(train_rows, work / "train.jsonl")

    results = {}
    chosen = modes(args.rank)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    if model_cfg.tie_embeddings and chosen.pop("lora-head", None):
        print("==> lora-head: skipped (the base's head is tied to its embedding)", flush=True)
    for name, lora in chosen.items():
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        print(f"==> {name}: fine-tuning", flush=True)
        argv = ["--init-from", str(base), "--data", str(work / "train.jsonl"), "--out", str(out),
                "--config", "configs/sft-tiny.toml", "--logging.every", str(LOG_EVERY),
                "--eval.every", "0", "--checkpoint.every", "0", *lora_args(lora, args.lora_lr),
                *args.overrides]  # fmt: skip
        wall, rss = finetune_process(argv, work / f"{name}.log", args.mmap_threshold)
        acc = None
        if held_out:
            print(f"==> {name}: exporting and asking {len(held_out)} held-out prompts", flush=True)
            acc, _ = accuracy(export(out, work / f"{name}-export"), held_out, name)
        steps = json.loads((out / "finetune_data.json").read_text())["steps"]
        results[name] = {
            "trainable": num_params(model_cfg) if lora is None else adapter_count(model_cfg, lora),
            "peak_rss_mb": rss / 2**20,
            "state_mb": state_bytes(model_cfg, lora) / 2**20,
            "s_per_step": seconds_per_step(out / "metrics.jsonl"),
            "steps": steps,
            "wall_s": wall,
            "checkpoint_mb": dir_bytes(next((out / "checkpoints").glob("step-*"))) / 2**20,
            "accuracy": acc,
        }
        print(json.dumps({name: results[name]}), flush=True)
    (work / "result.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.rank))
    return results


def table(results: dict, rank: int) -> str:
    lines = [
        f"rank {rank}; {len(results)} modes on the same base and rows",
        "",
        "| mode | trainable | peak RSS | weights+grads+AdamW | s/step | checkpoint | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['trainable'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} MB | "
            f"{r['state_mb']:.1f} MB | {r['s_per_step']:.3f} | {r['checkpoint_mb']:.1f} MB | "
            f"{'not asked' if r['accuracy'] is None else format(r['accuracy'], '.0%')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
