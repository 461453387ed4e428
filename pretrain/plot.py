"""``pretrain plot runs/NAME``: a PNG of a run's train/val loss and throughput.

Reads ``metrics.jsonl`` (written by the trainer) and draws two panels: loss against step (train
and, where evaluated, val) and tokens per second against step. Matplotlib is imported only here,
with the Agg backend, so it works without a display.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/metrics.png)")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a missing or empty file is a :class:`UserError`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics found: {path} does not exist (is {run_dir} a run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not a JSON line") from None
    if not records:
        raise UserError(f"{path} holds no records yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss/throughput figure of ``run_dir``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss: {Path(run_dir).name}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if train:
        ax_tps.plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train])
    ax_tps.set(xlabel="step", ylabel="tokens / s", title="throughput")
    ax_tps.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out) if out else Path(run_dir) / "metrics.png"
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


def run(args: argparse.Namespace) -> int:
    path = plot_run(args.run, args.out)
    print(f"wrote {path}")
    return 0
