"""The tokenizer's special tokens and chat template, shared by data, fine-tuning, export and serving.

One template renders chat messages everywhere: the fine-tuning data, the export's
``tokenizer_config.json`` and the server's ``/v1/chat/completions``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
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


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template


@dataclass(frozen=True)
class SpecialTokens:
    """A model's special tokens and chat template, as its directory's metadata names them.

    ``eos`` ends a document and pads when there is no ``pad``; ``stop_ids`` are every id that
    ends a generation (``generation_config.json`` ``eos_token_id``: Llama 3 stops at
    ``<|eot_id|>`` as well as ``<|end_of_text|>``). ``add_bos`` is the tokenizer config's
    ``add_bos_token``: plain text gets ``bos`` in front, while a chat template places it itself
    (transformers' ``apply_chat_template`` adds no token of its own).
    """

    eos: str = EOS_TOKEN
    bos: str | None = EOS_TOKEN
    pad: str | None = EOS_TOKEN
    add_bos: bool = False
    stop_ids: tuple[int, ...] = ()
    chat_template: str = CHAT_TEMPLATE

    @property
    def is_own(self) -> bool:
        """True for the project's own tokens and template (``pretrain prepare``'s tokenizer)."""
        return self.eos == EOS_TOKEN and self.chat_template == CHAT_TEMPLATE

    def template_variables(self) -> dict[str, str]:
        """The special-token variables a chat template sees, as transformers passes them."""
        names = {"bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad}
        return {k: v for k, v in names.items() if v is not None}

    def token_id(self, tokenizer, token: str, origin: str) -> int:
        """The id of ``token``, which must be one token of ``tokenizer``."""
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(
                f"{origin} names the special token {token!r}, which the tokenizer lacks"
            )
        return token_id

    def eos_id(self, tokenizer) -> int:
        return self.token_id(tokenizer, self.eos, "eos_token")

    def bos_id(self, tokenizer) -> int | None:
        return None if self.bos is None else self.token_id(tokenizer, self.bos, "bos_token")

    def pad_id(self, tokenizer) -> int:
        """Padding: the pad token, else end of text (padding positions never train)."""
        return self.token_id(tokenizer, self.pad or self.eos, "pad_token")

    def all_stop_ids(self, tokenizer) -> list[int]:
        """End of text first, then every other id generation stops at."""
        eos = self.eos_id(tokenizer)
        return [eos, *(i for i in dict.fromkeys(self.stop_ids) if i != eos)]


def token_text(value, path: Path, key: str) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise UserError(f'{path}: {key!r} must be a token string or {{"content": ...}}')
    return value


def read_json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def chat_template_source(model_dir: Path, tok_config: dict) -> str | None:
    """The directory's own template: ``chat_template`` of the tokenizer config (a string, or
    transformers' list of named templates, of which the "default" one), else
    ``chat_template.jinja``; None when it has neither."""
    source = tok_config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str) and source.strip():
        return source
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        text = jinja_file.read_text()
        return text if text.strip() else None
    return None


def eos_token_ids(path: Path, gen_config: dict) -> tuple[int, ...]:
    """The ``eos_token_id`` of a generation config (or a ``config.json``) read from ``path``:
    one id or a list of them; none when it is absent."""
    value = gen_config.get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(
            f"{path}: 'eos_token_id' must be a token id or a list of them, got {value!r}"
        )
    return tuple(ids)


def read_special_tokens(model_dir: str | Path, tokenizer) -> SpecialTokens:
    """The special tokens and chat template of a model directory (export, Hugging Face model or
    checkpoint), from ``tokenizer_config.json``, ``generation_config.json`` and
    ``chat_template.jinja``; the project's own where the directory names none.

    A tokenizer without ``<|endoftext|>`` whose directory names no end-of-text token is a
    :class:`UserError` saying which file and key to add.
    """
    model_dir = Path(model_dir)
    tok_path, gen_path = model_dir / TOKENIZER_CONFIG_FILE, model_dir / GENERATION_CONFIG_FILE
    tok_config, gen_config = read_json_file(tok_path), read_json_file(gen_path)
    stop_ids = eos_token_ids(gen_path, gen_config)
    eos = token_text(tok_config.get("eos_token"), tok_path, "eos_token")
    if eos is None and stop_ids:
        eos = tokenizer.id_to_token(stop_ids[0])
    if eos is None:
        if tokenizer.token_to_id(EOS_TOKEN) is None:
            raise UserError(
                f"{model_dir} names no end-of-text token and its tokenizer has no {EOS_TOKEN}: "
                f'add "eos_token": "<the token>" to {tok_path} (or "eos_token_id" to {gen_path})'
            )
        eos = EOS_TOKEN
    own = not tok_config and not gen_config
    template = chat_template_source(model_dir, tok_config) or CHAT_TEMPLATE
    default_bos = EOS_TOKEN if own else None
    bos = token_text(tok_config.get("bos_token", default_bos), tok_path, "bos_token")
    pad = token_text(tok_config.get("pad_token"), tok_path, "pad_token") or (
        EOS_TOKEN if own else None
    )
    tokens = SpecialTokens(
        eos=eos,
        bos=bos,
        pad=pad,
        add_bos=bool(tok_config.get("add_bos_token", False)),
        stop_ids=stop_ids,
        chat_template=template,
    )
    for token in (tokens.eos, tokens.bos, tokens.pad):
        if token is not None and tokenizer.token_to_id(token) is None:
            raise UserError(
                f"{tok_path} names the special token {token!r}, which the tokenizer of {model_dir} "
                "lacks: correct the token or use the tokenizer it belongs to"
            )
    return tokens


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
