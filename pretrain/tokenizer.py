"""The tokenizer's special tokens and chat template, shared by data, fine-tuning, export and serving.

One template renders chat messages everywhere: the fine-tuning data, the export's
``tokenizer_config.json`` and the server's ``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pretrain.errors import UserError

EOS_TOKEN = "<|endoftext|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [EOS_TOKEN, *ROLE_TOKENS.values(), END_OF_TURN]

# Jinja, as Hugging Face tokenizers and OpenAI-compatible servers render it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def load_tokenizer(path: str | Path):
    """Load a ``tokenizer.json``; a missing or unparsable file is a :class:`UserError`."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"tokenizer file {path} does not parse: {e}") from None


def min_vocab_size() -> int:
    """The smallest vocabulary a byte-level BPE can have: every byte plus the special tokens."""
    return 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    length: int | None = None,
    show_progress: bool = False,
):
    """Train a byte-level BPE tokenizer on ``texts`` with :data:`SPECIAL_TOKENS` as its first ids.

    Byte-level means every string round-trips (no unknown token, no normalisation), so decoding a
    document's ids gives back the document. The special tokens come first, so ``EOS_TOKEN`` is
    id 0, then the 256 byte symbols, then the learned merges. A small corpus may support fewer
    merges than asked for; the vocabulary is then smaller than ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < min_vocab_size():
        raise UserError(
            f"vocabulary size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{min_vocab_size()} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer
