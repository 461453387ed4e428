"""A Hugging Face model fine-tunes, exports and chats with its own special tokens and template.

The model directory is Llama 3 in miniature: a byte-level BPE with Llama 3's special tokens (no
``<|endoftext|>``) and pre-tokenizer, Llama 3's chat template in ``tokenizer_config.json``, and a
random ``LlamaForCausalLM`` saved by transformers. The reference is transformers itself: the
training ids of a conversation are ``AutoTokenizer.apply_chat_template``'s, the loss covers
exactly the assistant's content and its ``<|eot_id|>``, ``pretrain generate --chat`` prompts with
its ``add_generation_prompt`` ids, and the export loads back with the same bos/eos.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from pretrain import cli
from pretrain.chat import ChatTemplate, load_chat_template
from pretrain.errors import UserError
from pretrain.finetune import read_init
from pretrain.generate import chat_prompt_ids
from pretrain.hf import model_config_from_hf, read_json
from pretrain.sft import IGNORE_INDEX, tokenize_conversations
from pretrain.tokenizer import EOS_TOKEN, load_tokenizer, read_special_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

BOS, EOT_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL = [BOS, EOT_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT]
# Llama 3's pre-tokenizer pattern: newlines split off on their own, so a turn's header and its
# content tokenize the same apart as together.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You name colours."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green."},
]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _corpus() -> list[str]:
    words = [f"The {c} thing is {c}. What colour is the sky? Grass is green." for c in COLOURS]
    return words * 20


def make_llama3_tokenizer():
    """A byte-level BPE of under 512 tokens with Llama 3's special tokens, pre-tokenizer and
    ``<|begin_of_text|>`` post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """A transformers ``LlamaForCausalLM`` directory with a Llama-3-style tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama3")
    tok = make_llama3_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    config = LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=ids[BOS], eos_token_id=ids[EOT_TEXT], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": {"__type": "AddedToken", "content": EOT_TEXT, "special": True},
        "model_max_length": 128,
        "chat_template": LLAMA3_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    gen = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOT_TEXT], ids[EOT]]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_dir)


def apply_chat_template(hf_tokenizer, messages, **kw) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def our_example(model_dir: Path, messages):
    init = read_init(model_dir)
    tokenizer = load_tokenizer(init.tokenizer_path)
    template = ChatTemplate(init.chat_template, variables=init.special_tokens.template_variables())
    (example,) = tokenize_conversations([messages], tokenizer, template)
    return example, tokenizer


def test_training_ids_are_transformers_chat_template_ids_and_train_the_assistant(
    llama3_dir, hf_tokenizer
):
    example, tokenizer = our_example(llama3_dir, CONVERSATION)
    assert example.tokens.tolist() == apply_chat_template(hf_tokenizer, CONVERSATION)
    assert example.tokens[0] == tokenizer.token_to_id(BOS)
    trained = example.tokens[example.trains]
    eot = tokenizer.token_to_id(EOT)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [
        i for a in answers for i in [*tokenizer.encode(a, add_special_tokens=False).ids, eot]
    ]
    assert trained.tolist() == expected  # exactly the assistant's content and its end of turn
    _, targets = example.inputs_targets()
    assert (targets != IGNORE_INDEX).sum() == len(expected)


def test_prompt_completion_rows_end_with_the_end_of_turn_token(llama3_dir, hf_tokenizer):
    pair = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]
    example, tokenizer = our_example(llama3_dir, pair)
    assert example.tokens.tolist() == apply_chat_template(hf_tokenizer, pair)
    assert example.tokens[-1] == tokenizer.token_to_id(EOT) and example.trains[-1]
    assert tokenizer.token_to_id(EOS_TOKEN) is None  # nothing of ours was needed


def test_special_tokens_come_from_the_directory(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    tokens = read_special_tokens(llama3_dir, tok)
    assert (tokens.bos, tokens.eos, tokens.pad) == (BOS, EOT_TEXT, None)
    assert tokens.all_stop_ids(tok) == [tok.token_to_id(EOT_TEXT), tok.token_to_id(EOT)]
    assert tokens.pad_id(tok) == tok.token_to_id(EOT_TEXT)  # padding falls back to eos
    assert tokens.chat_template == LLAMA3_TEMPLATE and not tokens.is_own


def test_generate_chat_prompt_is_the_generation_prompt_of_transformers(llama3_dir, hf_tokenizer):
    template = load_chat_template(llama3_dir / "tokenizer_config.json")
    ids = chat_prompt_ids(
        template, load_tokenizer(llama3_dir), "What colour is grass?", "Be brief."
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is grass?"},
    ]
    assert ids == apply_chat_template(hf_tokenizer, messages, add_generation_prompt=True)


def test_a_template_in_chat_template_jinja_is_used(llama3_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT_TEXT}))
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    template = load_chat_template(tmp_path / "tokenizer_config.json")
    assert template.source == LLAMA3_TEMPLATE
    tokens = read_special_tokens(tmp_path, load_tokenizer(tmp_path))
    assert tokens.chat_template == LLAMA3_TEMPLATE and tokens.bos is None


def test_no_end_of_text_token_anywhere_is_one_line_naming_file_and_key(llama3_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
    with pytest.raises(UserError, match=r"add \"eos_token\".*tokenizer_config.json") as e:
        read_special_tokens(tmp_path, load_tokenizer(tmp_path))
    assert "\n" not in str(e.value)


def test_export_writes_the_models_own_tokens_back(llama3_dir, hf_tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pretrain.export import write_export
    from pretrain.hf import from_hf_names

    cfg = model_config_from_hf(read_json(llama3_dir / "config.json"))
    weights = from_hf_names(load_file(llama3_dir / "model.safetensors"), cfg.tie_embeddings)
    out = write_export(cfg, weights, llama3_dir / "tokenizer.json", tmp_path / "export")
    back = AutoTokenizer.from_pretrained(out)
    assert (back.bos_token, back.eos_token) == (BOS, EOT_TEXT)
    assert apply_chat_template(back, CONVERSATION) == apply_chat_template(
        hf_tokenizer, CONVERSATION
    )
    gen = read_json(out / "generation_config.json")
    assert gen["eos_token_id"] == read_json(llama3_dir / "generation_config.json")["eos_token_id"]
    assert read_json(out / "config.json")["bos_token_id"] == back.bos_token_id


def _quiet(*argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main([str(a) for a in argv])


def _rows(path: Path, kind: str) -> Path:
    rows = []
    for i in range(24):
        c = COLOURS[i % len(COLOURS)]
        if kind == "messages":
            rows.append({"messages": [{"role": "user", "content": f"The {c} thing?"},
                                      {"role": "assistant", "content": f"It is {c}."}]})  # fmt: skip
        else:
            rows.append({"prompt": f"The {c} thing?", "completion": f"It is {c}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["messages", "prompt"])
def test_fine_tune_export_and_chat_with_the_models_own_tokens(
    llama3_dir, hf_tokenizer, kind, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = tmp_path / "run", tmp_path / "export"
    args = ["--init-from", llama3_dir, "--data", _rows(tmp_path / "rows.jsonl", kind),
            "--out", run, "--train.steps", "4", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "4", "--data.seq_len", "64", "--eval.every", "0",
            "--logging.every", "100"]  # fmt: skip
    assert _quiet("finetune", *args) == 0
    assert _quiet("export", run, "--out", out) == 0
    back = AutoTokenizer.from_pretrained(out)
    assert (back.bos_token, back.eos_token) == (BOS, EOT_TEXT)
    assert back.chat_template == LLAMA3_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.generation_config.eos_token_id == [
        back.eos_token_id,
        back.convert_tokens_to_ids(EOT),
    ]
    example, _ = our_example(out, CONVERSATION)  # the fine-tuned export renders as transformers
    assert example.tokens.tolist() == apply_chat_template(back, CONVERSATION)
    from types import SimpleNamespace

    from pretrain.generate import prompt_ids
    from pretrain.inference import load_for_inference

    loaded = load_for_inference(out, device="cpu")  # what `pretrain generate --chat` prompts with
    assert loaded.eos_ids == model.generation_config.eos_token_id
    asked = SimpleNamespace(chat=True, prompt="And grass?", system="You name colours.")
    messages = [{"role": "system", "content": "You name colours."}, CONVERSATION[3]]
    assert prompt_ids(loaded, asked) == apply_chat_template(
        back, messages, add_generation_prompt=True
    )
