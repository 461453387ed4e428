"""Shared by the serving tests and the serving benchmark: a small tokenizer and a random export."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import torch

from pretrain.config import ModelConfig

# Text with multi-byte characters, so that byte-level tokens split characters.
_UNICODE = "naïve café — 日本語のテキスト, emoji 🙂🚀, Ελληνικά, ümlaut ß, ∑ ∫ √ ≠ ≤. "


def training_text() -> list[str]:
    """A few hundred kilobytes of Python source and prose from the standard library."""
    import argparse
    import collections
    import json as json_module
    import pathlib as pathlib_module

    texts = [inspect.getsource(m) for m in (argparse, collections, json_module, pathlib_module)]
    return texts + [_UNICODE * 20, textwrap.dedent(__doc__ or "")]


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with the project's special tokens, trained in about a second."""
    from pretrain.tokenizer import train_tokenizer

    return train_tokenizer(training_text(), vocab_size)


def small_model_config(vocab_size: int, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=vocab_size,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        init_std=0.2,  # a random model with peaked distributions: greedy ties are unlikely
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def make_export(out: Path, cfg: ModelConfig | None = None, *, vocab_size: int = 512, seed: int = 0):
    """Export a randomly initialised model with a freshly trained tokenizer; returns the dir."""
    from pretrain.export import save_export
    from pretrain.model import Transformer

    tok = make_tokenizer(vocab_size)
    cfg = cfg or small_model_config(tok.get_vocab_size())
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return save_export(model, tok, out)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rewrite_checksums(export_dir: Path) -> None:
    """Make checksums.sha256 agree with the files again (to test checks past the checksums)."""
    import hashlib

    lines = []
    for p in sorted(Path(export_dir).iterdir()):
        if p.name != "checksums.sha256":
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    (Path(export_dir) / "checksums.sha256").write_text("".join(lines))


class ServerProcess:
    """``pretrain serve`` in a subprocess on a free loopback port."""

    def __init__(self, export_dir: Path, *args: str, log_path: Path | None = None):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "pretrain.cli", "serve", str(export_dir)]
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        self.log_path = log_path or Path(export_dir).parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=root
        )

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        self.health_seen = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.output()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                self.health_seen.append((r.status_code, r.json().get("status")))
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """Sum of a Prometheus metric's samples (all label sets) from /metrics."""
    import httpx

    total = 0.0
    for line in httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10).text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total
