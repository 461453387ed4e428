"""The chat template renders the same text for fine-tuning and for serving, whatever it uses."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.chat import ROLES, ChatTemplate, load_chat_template, read_chat_template
from pretrain.errors import UserError
from pretrain.serve.api import APIError, ChatMessage
from pretrain.serve.state import ServerState
from pretrain.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, ROLE_TOKENS

# Ends every assistant turn with the end-of-text token, as many Hugging Face templates do.
EOS_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
]


def _export_with(tmp_path: Path, template: str | None) -> Path:
    config = {"model_max_length": 128}
    if template is not None:
        config["chat_template"] = template
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    return path


def _server_rendering(config_path: Path, messages, add_generation_prompt: bool) -> str:
    """What /v1/chat/completions and /tokenize feed the tokenizer for these messages."""
    state = ServerState(
        export_dir=config_path.parent, model_name="m", api_key=None, engine_options={}
    )
    state.loaded = SimpleNamespace(chat_template=load_chat_template(config_path))
    chat = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return state.render_chat(chat, add_generation_prompt)


def _sft_rendering(config_path: Path, messages) -> tuple[str, str]:
    """What fine-tuning trains on: the whole conversation (its segments) and the prompt header."""
    template = ChatTemplate(read_chat_template(config_path))
    whole = "".join(text for text, _ in template.segments(messages))
    return whole, template.render(messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("source", [EOS_TEMPLATE, CHAT_TEMPLATE], ids=["eos_token", "default"])
def test_a_template_renders_the_same_for_fine_tuning_and_serving(tmp_path, source):
    config_path = _export_with(tmp_path, source)
    conversation = MESSAGES[:3]
    trained, trained_prompt = _sft_rendering(config_path, conversation)
    assert _server_rendering(config_path, conversation, False) == trained
    assert _server_rendering(config_path, conversation[:-1], True) == trained_prompt
    if source is EOS_TEMPLATE:
        assert f"Hello.{EOS_TOKEN}\n" in trained


def test_the_default_template_renders_as_before(tmp_path):
    served = _server_rendering(_export_with(tmp_path, CHAT_TEMPLATE), MESSAGES, True)
    assert served == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nBye?<|end|>\n<|assistant|>\n"
    )


def test_roles_are_the_tokenizers_and_an_unknown_one_is_refused(tmp_path):
    assert ROLES == tuple(ROLE_TOKENS)
    with pytest.raises(APIError) as e:
        _server_rendering(
            _export_with(tmp_path, CHAT_TEMPLATE), [{"role": "tool", "content": ""}], True
        )
    assert e.value.param == "messages.0.role"


def test_a_template_runs_in_a_sandbox_and_may_raise(tmp_path):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(APIError, match="the chat template failed"):
        _server_rendering(_export_with(tmp_path, escape), MESSAGES, True)
    refuse = "{{ raise_exception('no system messages') }}"
    with pytest.raises(APIError, match="no system messages"):
        _server_rendering(_export_with(tmp_path, refuse), MESSAGES, True)


def test_reading_tokenizer_config(tmp_path):
    assert read_chat_template(_export_with(tmp_path, None)) is None
    assert read_chat_template(_export_with(tmp_path, "  ")) is None
    assert load_chat_template(_export_with(tmp_path, CHAT_TEMPLATE)).source == CHAT_TEMPLATE
    broken = _export_with(tmp_path, "{% for %}")
    with pytest.raises(
        UserError, match="tokenizer_config.json: the chat template does not compile"
    ):
        load_chat_template(broken)
    broken.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_chat_template(broken)
    with pytest.raises(UserError, match="cannot be read"):
        read_chat_template(tmp_path / "missing.json")
