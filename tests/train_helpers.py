"""Helpers for the trainer and checkpoint tests: real `pretrain train` / torchrun subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a torchrun pair starts, trains and saves in seconds on 2 cores.
TINY = [
    "--model.vocab_size", "512",
    "--model.n_layers", "2",
    "--model.d_model", "32",
    "--model.n_heads", "4",
    "--model.n_kv_heads", "2",
    "--model.max_seq_len", "32",
    "--data.seq_len", "32",
    "--train.steps", "8",
    "--train.global_batch_size", "8",
    "--train.micro_batch_size", "4",
    "--train.warmup_steps", "2",
    "--train.lr", "3e-3",
    "--train.dtype", "fp32",
    "--train.device", "cpu",
    "--eval.every", "4",
    "--eval.batches", "2",
    "--logging.every", "1",
    "--checkpoint.every", "4",
    "--checkpoint.keep_last", "0",
]  # fmt: skip


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", WANDB_MODE="offline")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(data: Path, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    args = ["--data", str(data), "--out", str(out), *TINY, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.cli", "train", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "pretrain.train", *args,
    ]  # fmt: skip


def run_train(data: Path, out: Path, *overrides: str, nproc: int = 1, check: bool = True):
    """Run the trainer as a real subprocess; fail the test with its output when it fails."""
    proc = subprocess.run(
        train_cmd(data, out, *overrides, nproc=nproc),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"trainer exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def assert_losses_close(a: dict[int, float], b: dict[int, float], rtol: float, steps=None):
    steps = sorted(steps if steps is not None else a)
    assert steps and all(s in a and s in b for s in steps), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    assert worst < rtol, {s: (a[s], b[s]) for s in steps}
    return worst


def load_checkpoint(path: Path) -> dict:
    """A whole DCP checkpoint as plain tensors, read the way any consumer would."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and k.startswith(("model.", "optimizer.state"))
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    return state


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
