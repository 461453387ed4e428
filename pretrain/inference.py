"""Loading an export for inference: the one path ``pretrain generate`` and ``pretrain serve`` share.

Both get the same :class:`LoadedModel` (weights checked against their checksums and config,
tokenizer, chat template, end tokens), on a device and in a dtype chosen the same way, so the
two commands decode the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from pretrain.chat import ChatTemplate, load_chat_template
from pretrain.devices import resolve_device
from pretrain.errors import UserError
from pretrain.export import DTYPES, load_model
from pretrain.hf import CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, read_json
from pretrain.model import Transformer
from pretrain.tokenizer import eos_token_ids, load_tokenizer

DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass
class LoadedModel:
    """Everything inference needs from an export, read and checked once."""

    model: Transformer
    tokenizer: object  # a tokenizers.Tokenizer
    eos_ids: list[int]  # generation stops at any of these
    chat_template: ChatTemplate | None  # None: the export has none
    name: str  # the export directory's name

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes one token can stand for: a text of B bytes has at least B / this many
        tokens. None when the tokenizer normalizes text first (then no such bound holds)."""
        return longest_token_bytes(self.tokenizer)


def load_for_inference(
    path: str | Path, device: str = "auto", dtype: str | None = "auto"
) -> LoadedModel:
    """Load and verify an export; every problem is a UserError that lists them all.

    ``dtype`` ``auto`` runs fp32 on a CPU (its fastest) and keeps the export's dtype on a GPU;
    None keeps the export's dtype everywhere.
    """
    path = Path(path)
    dev = resolve_device(device)
    model = load_model(path, device=dev, dtype=torch_dtype(dtype, dev))
    tok_config = path / TOKENIZER_CONFIG  # a Hugging Face directory may come without one
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path / TOKENIZER),
        chat_template=load_chat_template(tok_config) if tok_config.is_file() else None,
        eos_ids=stop_token_ids(path),
        name=path.name,
    )


def torch_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype to load weights in (None: the export's own), from ``--dtype``."""
    if name is None:
        return None
    if name not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return torch.float32 if device.type == "cpu" else None
    return DTYPES[name]


def stop_token_ids(export_dir: str | Path) -> list[int]:
    """The end tokens of an export's ``generation_config.json`` (one id or a list), or of its
    ``config.json`` in a Hugging Face directory saved without the first."""
    path = Path(export_dir) / GENERATION_CONFIG
    if not path.is_file() and (Path(export_dir) / CONFIG).is_file():
        path = Path(export_dir) / CONFIG
    config = read_json(path)
    ids = list(eos_token_ids(path, config))
    if not ids:
        raise UserError(
            f"{path}: 'eos_token_id' must be a token id or a list of them, "
            f"got {config.get('eos_token_id')!r}"
        )
    return ids


def longest_token_bytes(tokenizer) -> int | None:
    """The UTF-8 length of the longest vocabulary entry or added token, or None if unbounded.

    Byte-level BPE pieces are written with one printable character per byte, and those
    characters take one or two bytes in UTF-8, so this over-counts: the bound it gives (a text
    of B bytes has at least B / this many tokens) is safe, never refusing a text that fits.
    """
    if tokenizer.normalizer is not None:
        return None  # normalization can shorten a text before it is split
    pieces = list(tokenizer.get_vocab(with_added_tokens=True))
    return max((len(p.encode("utf-8")) for p in pieces), default=1) or 1
