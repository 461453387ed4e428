"""Shared pieces of the fine-tuning tests: a small real tokenizer and a small real export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.tokenizer import train_tokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Answer with one word: yes or no. The answer is yes.",
    "red green yellow blue stop go wait swim river house garden",
]


def make_tokenizer(path: Path) -> Path:
    """Train a byte-level BPE of ~400 tokens with the project's special tokens; save it at ``path``."""
    tok = train_tokenizer(TEXT * 20, vocab_size=400)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def small_model_config(vocab_size: int = 400, **kw) -> ModelConfig:
    shape = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(vocab_size=vocab_size, **{**shape, **kw})


def make_export(out: Path, tokenizer_path: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A real export (``pretrain.export.save_export``) of a randomly initialised model."""
    from pretrain.export import save_export
    from pretrain.model import Transformer

    torch.manual_seed(seed)
    return save_export(Transformer(cfg), str(tokenizer_path), out)


def write_rows(path: Path, rows: list) -> Path:
    """A JSONL file: dicts as JSON, strings verbatim (for broken rows)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_rows(n: int) -> list[dict[str, str]]:
    colours = {"red": "stop", "green": "go", "yellow": "wait", "blue": "swim"}
    words = "the quick brown fox river house garden".split()
    rows = []
    for i in range(n):
        colour = list(colours)[i % 4]
        filler = [words[(i * 7 + k) % len(words)] for k in range(2 + i % 5)]
        rows.append({"prompt": " ".join([*filler, colour]) + "?", "completion": colours[colour]})
    return rows
