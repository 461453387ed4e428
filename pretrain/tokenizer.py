"""The tokenizer's special tokens and chat template, shared by data, fine-tuning, export and serving.

One template renders chat messages everywhere: the fine-tuning data, the export's
``tokenizer_config.json`` and the server's ``/v1/chat/completions``.
"""

from __future__ import annotations

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
