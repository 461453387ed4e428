"""Test setup: Triton runs in its interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator executes, i.e. before
``kernels`` is imported, so it is set here at import time when no CUDA device is present.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if "kernels" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_buffers(monkeypatch) -> list:
    """Make every attention kernel output buffer start as NaN (a value never written stays
    NaN and fails the comparison); returns the list of buffers handed out."""
    import importlib

    import torch

    attn = importlib.import_module("kernels.attention")  # the module, not the op
    handed_out = []

    def nan_empty(shape, *, dtype, device):
        buf = torch.full(shape, float("nan"), dtype=dtype, device=device)
        handed_out.append(buf)
        return buf

    monkeypatch.setattr(attn, "_empty", nan_empty)
    return handed_out


@pytest.fixture
def root() -> Path:
    return ROOT


def write_tiny_corpus(directory: Path, num_docs: int = 160, seed: int = 0) -> list[Path]:
    """Deterministic small text files (one document each) of English-like sentences."""
    import random

    rng = random.Random(seed)
    words = (
        "the a model data token batch layer loss step learns predicts next small large fast slow "
        "train val text shard window epoch seed rank worker gradient weight attention head"
    ).split()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_docs):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(3, 30))
        ]
        path = directory / f"doc-{i:04d}.txt"
        path.write_text(f"Document {i}. " + " ".join(sentences) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset for tests that need real shards: 160 generated documents, vocab 512,
    about 21k train and 2.4k val tokens, built in a second or two."""
    from pretrain.data import prepare_dataset

    base = tmp_path_factory.mktemp("tiny-dataset")
    write_tiny_corpus(base / "corpus")
    out = base / "data"
    prepare_dataset(
        out, [str(base / "corpus")], vocab_size=512, val_fraction=0.1, log=lambda *a: None
    )
    return out
