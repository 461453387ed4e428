"""The trainer learns: on text from a Markov chain with a known entropy rate, the tiny model's
validation loss comes within 0.05 nats/token of that rate on CPU (the time it took is printed;
the README records it for a 2-core CPU)."""

from __future__ import annotations

import math
import time

import numpy as np

from pretrain.config import load_config
from pretrain.train import train

ALPHABET = "abcdefgh"


def markov_chain(seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """A random transition matrix over ALPHABET, its stationary distribution and entropy rate."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((len(ALPHABET), len(ALPHABET)))
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    evals, evecs = np.linalg.eig(P.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi /= pi.sum()
    rate = float(-(pi[:, None] * P * np.log(P)).sum())  # nats per symbol
    return P, pi, rate


def write_documents(directory, P, pi, num_docs: int, length: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    cum = P.cumsum(axis=1)
    for d in range(num_docs):
        state = rng.choice(len(pi), p=pi)
        symbols = []
        for u in rng.random(length):
            symbols.append(ALPHABET[state])
            state = min(int(np.searchsorted(cum[state], u)), len(pi) - 1)
        (directory / f"doc-{d:03d}.txt").write_text("".join(symbols))


def test_val_loss_approaches_the_entropy_rate(tmp_path):
    from pretrain.data import prepare_dataset
    from pretrain.tokenizer import min_vocab_size

    P, pi, rate = markov_chain()
    write_documents(tmp_path / "corpus", P, pi, num_docs=60, length=4000)
    # The smallest byte-level vocabulary has no merges: one token per symbol.
    manifest = prepare_dataset(tmp_path / "data", [str(tmp_path / "corpus")],
                               vocab_size=min_vocab_size(), val_fraction=0.2,
                               log=lambda *a: None)  # fmt: skip
    overrides = [
        ("data.path", str(tmp_path / "data")), ("model.vocab_size", str(manifest.vocab_size)),
        ("model.n_layers", "2"), ("model.d_model", "64"), ("model.n_heads", "4"),
        ("model.n_kv_heads", "2"), ("model.max_seq_len", "128"), ("data.seq_len", "128"),
        ("train.steps", "80"), ("train.global_batch_size", "16"),
        ("train.micro_batch_size", "16"), ("train.lr", "3e-3"), ("train.warmup_steps", "10"),
        ("train.device", "cpu"), ("eval.every", "40"), ("eval.batches", "16"),
        ("logging.every", "20"), ("checkpoint.every", "0"),
    ]  # fmt: skip
    start = time.perf_counter()
    result = train(load_config(None, overrides), tmp_path / "run")
    elapsed = time.perf_counter() - start
    print(f"entropy rate {rate:.4f} nats, val loss {result.val_loss:.4f}, {elapsed:.0f} s")
    assert math.log(len(ALPHABET)) - rate > 0.3  # the chain is far from uniform
    assert result.val_loss - rate < 0.05
