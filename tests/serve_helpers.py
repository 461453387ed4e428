"""Shared by the serving tests and the serving benchmark: a small tokenizer and a random export."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.tokenizer import SPECIAL_TOKENS

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    return tok


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
