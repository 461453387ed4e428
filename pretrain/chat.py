"""The chat template: one Jinja source rendered the same way by fine-tuning, export and serving.

A template is rendered in an immutable sandbox (it cannot reach Python internals or change the
messages it is given), with the variables Hugging Face tokenizers give it: ``messages``,
``add_generation_prompt``, ``eos_token`` and the ``raise_exception`` function. Training data and
served prompts therefore agree token for token, whatever the template uses.

Jinja is imported when a template is compiled, not with this module: preparing data and
pretraining never need it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.errors import UserError
from pretrain.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    ROLE_TOKENS,
    chat_template_source,
    read_json_file,
    token_text,
)

ROLES = tuple(ROLE_TOKENS)  # system, user, assistant
__all__ = ["CHAT_TEMPLATE", "ROLES", "ChatTemplate", "read_chat_template"]


def _compile(source: str):
    """Compile ``source`` in the sandbox as transformers does (loop controls, ``tojson``,
    ``raise_exception``, ``strftime_now``); a syntax error raises jinja's TemplateError."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template; ``origin`` (the file it came from) prefixes a compile error.

    ``variables`` are the special tokens the template may use (``bos_token``, ``eos_token``,
    ``pad_token``: :meth:`pretrain.tokenizer.SpecialTokens.template_variables`); by default the
    project's end-of-text token.
    """

    def __init__(
        self,
        source: str = CHAT_TEMPLATE,
        origin: str | Path | None = None,
        variables: dict[str, str] | None = None,
    ):
        from jinja2.exceptions import TemplateError

        self.variables = {"eos_token": EOS_TOKEN} if variables is None else dict(variables)

        try:
            self._template = _compile(source)
        except TemplateError as e:
            if origin is None:
                raise UserError(f"the chat template does not parse: {e}") from None
            raise UserError(f"{origin}: the chat template does not compile: {e}") from None
        self.source = source

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text; a failing template raises jinja's TemplateError."""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trains)`` pieces that concatenate to the whole.

        ``trains`` is True for what the assistant says (content and end of turn); the header
        that opens an assistant turn is rendered as the generation prompt and does not train.
        Needs a template whose rendering of a prefix of the messages is a prefix of the whole.
        """
        from jinja2.exceptions import TemplateError

        pieces: list[tuple[str, bool]] = []
        try:
            done = self.render([])
        except TemplateError:  # a template that reads messages[0] (a default system turn)
            done = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self.render(messages[:i], add_generation_prompt=True)
                pieces.append((self._after(done, header), False))
                done = header
            upto = self.render(messages[: i + 1])
            pieces.append((self._after(done, upto), message["role"] == "assistant"))
            done = upto
        return [(text, trains) for text, trains in pieces if text]

    @staticmethod
    def _after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise UserError(
                "the chat template renders a conversation differently from its beginning, so "
                "prompt and completion tokens cannot be told apart; use a template whose output "
                "for the first k messages is a prefix of its output for all of them"
            )
        return text[len(prefix) :]


def read_chat_template(config_path: str | Path) -> str | None:
    """The chat template of a ``tokenizer_config.json`` (or of the ``chat_template.jinja`` beside
    it); None when there is none (or it is blank).

    An unreadable or malformed file is a :class:`UserError` naming it.
    """
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"{path} cannot be read: no such file")
    return chat_template_source(path.parent, read_json_file(path))


def template_variables(config_path: str | Path) -> dict[str, str]:
    """The special tokens a ``tokenizer_config.json`` gives its template; ours where it has none."""
    path = Path(config_path)
    config = read_json_file(path)
    names = {"bos_token": None, "eos_token": EOS_TOKEN, "pad_token": None, "unk_token": None}
    out = {}
    for key, default in names.items():
        value = token_text(config.get(key), path, key) or default
        if value is not None:
            out[key] = value
    return out


def load_chat_template(config_path: str | Path) -> ChatTemplate | None:
    """The compiled template of a ``tokenizer_config.json``, or None when it has none."""
    source = read_chat_template(config_path)
    if source is None:
        return None
    return ChatTemplate(source, origin=config_path, variables=template_variables(config_path))
