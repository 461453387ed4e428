"""``pretrain eval`` and ``pretrain generate --chat`` against references outside the project.

The reference is transformers' ``LlamaForCausalLM`` loading the export in fp32, with log-
probabilities summed in float64: the per-choice log-likelihoods, accuracies and perplexity of
``pretrain eval`` must equal it, from the export and from the checkpoint of the same weights.
Malformed rows are one line naming the line and the field. ``generate --chat`` must feed the
model exactly the token ids fine-tuning trains on for the same conversation.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from serve_helpers import make_tokenizer, rewrite_checksums, small_model_config

from pretrain import cli
from pretrain.chat import ChatTemplate
from pretrain.evaluate import evaluate_choices, evaluate_text, load_eval_model
from pretrain.generate import chat_prompt_ids
from pretrain.sft import tokenize_conversations
from pretrain.tokenizer import EOS_TOKEN

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONTEXT = 32  # small, so that texts need several windows and long rows are cut

ROWS = [
    {"context": "The cat sat on the", "choices": [" mat.", " moon.", " idea of it."], "answer": 0},
    {
        "context": "Water boils at ",
        "choices": ["100 degrees", "cold", "naïve café 🙂"],
        "answer": 1,
    },
    {"context": "", "choices": ["Hello world", "xq zv", "def f(x):"], "answer": 2},
    {"context": "lorem ipsum dolor " * 12, "choices": [" sit amet", " and so on"], "answer": 0},
    {"context": "1 2 3 4", "choices": [" 5", " five", " 6 7 8 9 10"], "answer": 0},
    {"context": "def f(x):\n   ", "choices": [" return x", " pass"], "answer": 1},
]
TEXT = (
    "The model predicts the next token. Ελληνικά και 日本語のテキスト 🙂🚀 — naïve café.\n"
    "def f(x):\n    return [x * 2 for x in range(10)]\n" * 3
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random model as an export and as a checkpoint, its tokenizer and the task files."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import Config
    from pretrain.export import save_export
    from pretrain.model import Transformer
    from pretrain.parallel import DistInfo

    base = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer(512)
    cfg = small_model_config(tok.get_vocab_size(), max_seq_len=CONTEXT, init_std=0.05)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    export = save_export(model, tok, base / "export")
    tok.save(str(base / "tokenizer.json"))
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    ckpt = Checkpointer(
        base / "run",
        dist_info=single,
        config=Config(model=cfg),
        tokenizer_path=base / "tokenizer.json",
    )
    ckpt.save(1, model, torch.optim.AdamW(model.parameters()), {"step": 1, "loader": {}})
    (base / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (base / "text.txt").write_text(TEXT, encoding="utf-8")
    return {"export": export, "run": base / "run", "tok": tok, "base": base}


@pytest.fixture(scope="module")
def hf(setup):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(setup["export"], dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float64 log-probabilities of the next token after each prefix."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def reference_choice_loglikelihoods(hf, tok, row: dict) -> list[float]:
    """lm-eval's split and truncation, scored by transformers."""
    eos = tok.token_to_id(EOS_TOKEN)
    out = []
    for choice in row["choices"]:
        context = row["context"].rstrip()
        continuation = row["context"][len(context) :] + choice
        if context:
            ctx = tok.encode(context, add_special_tokens=False).ids
            cont = tok.encode(context + continuation, add_special_tokens=False).ids[len(ctx) :]
        else:
            ctx, cont = [eos], tok.encode(continuation, add_special_tokens=False).ids
        ids = (ctx + cont)[-(CONTEXT + 1) :]
        lp = hf_logprobs(hf, ids[:-1])
        n = len(cont)
        positions = range(len(ids) - 1 - n, len(ids) - 1)
        out.append(sum(float(lp[p, ids[p + 1]]) for p in positions))
    return out


def test_choices_equal_transformers_per_row_and_in_accuracy(setup, hf):
    em = load_eval_model(setup["export"], "cpu")
    result = evaluate_choices(em, setup["base"] / "mc.jsonl", batch_size=3)
    assert result.rows == len(ROWS) and result.truncated == 1  # the lorem ipsum row
    hits = hits_norm = 0
    for row, got in zip(ROWS, result.per_row):
        expected = reference_choice_loglikelihoods(hf, setup["tok"], row)
        assert got["loglikelihoods"] == pytest.approx(expected, abs=1e-4, rel=1e-6)
        best = max(range(len(expected)), key=expected.__getitem__)
        normed = [ll / len(c.encode()) for ll, c in zip(expected, row["choices"])]
        best_norm = max(range(len(normed)), key=normed.__getitem__)
        assert (got["pred"], got["pred_norm"]) == (best, best_norm)
        hits += best == row["answer"]
        hits_norm += best_norm == row["answer"]
    assert result.acc == hits / len(ROWS) and result.acc_norm == hits_norm / len(ROWS)


@pytest.mark.parametrize("stride", [CONTEXT, 12])
def test_perplexity_and_bits_per_byte_equal_transformers(setup, hf, stride):
    em = load_eval_model(setup["export"], "cpu")
    result = evaluate_text(em, setup["base"] / "text.txt", stride=stride, batch_size=2)
    seq = [setup["tok"].token_to_id(EOS_TOKEN)]
    seq += setup["tok"].encode(TEXT, add_special_tokens=False).ids
    n = len(seq) - 1
    assert n > 3 * CONTEXT and result.tokens == n and result.bytes == len(TEXT.encode())
    nll, scored, begin = 0.0, [], 0
    while not scored or scored[-1] < n:  # each window scores the targets after the last one's
        end = min(begin + CONTEXT, n)
        lp = hf_logprobs(hf, seq[begin:end])
        for target in range((scored[-1] if scored else 0) + 1, end + 1):
            nll -= float(lp[target - 1 - begin, seq[target]])
            scored.append(target)
        begin += stride
    assert scored == list(range(1, n + 1))  # every token once
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-6)


def test_eval_command_prints_both_tasks_from_a_checkpoint(setup, capsys):
    base = setup["base"]
    args = ["eval", str(setup["run"]), "--text", str(base / "text.txt"), "--stride", "12"]
    assert cli.main([*args, "--choices", str(base / "mc.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = evaluate_text(load_eval_model(setup["export"], "cpu"), base / "text.txt", stride=12)
    assert report["text"]["nll"] == pytest.approx(expected.nll, rel=1e-9)
    assert report["choices"]["rows"] == len(ROWS)
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith(f"text {base / 'text.txt'}: {expected.tokens} tokens")


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('{"choices": ["a", "b"], "answer": 0}', '"context" is missing'),
    ('{"context": "x", "answer": 0}', '"choices" is missing'),
    ('{"context": "x", "choices": ["a", "b"]}', '"answer" is missing'),
    ('{"context": 3, "choices": ["a", "b"], "answer": 0}', '"context" must be a string'),
    ('{"context": "x", "choices": ["a"], "answer": 0}', '"choices" must be a list of at least 2'),
    ('{"context": "x", "choices": ["a", 7], "answer": 0}', '"choices"[1] must be a non-empty'),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', '"answer" must be the index'),
    ('{"context": "x", "choices": ["a", "b"], "answer": true}', '"answer" must be the index'),
    ('["context", "choices"]', "a row must be an object"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_a_malformed_row_is_one_line_naming_its_line_and_field(
    setup, tmp_path, capsys, line, message
):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n")
    assert cli.main(["eval", str(setup["export"]), "--choices", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretrain eval: error: {path}:3: ") and message in err
    assert err.count("\n") == 1


def test_bad_eval_arguments_are_one_line(setup, tmp_path, capsys):
    export = str(setup["export"])
    assert cli.main(["eval", export]) == 2
    assert "give a task: --text FILE, --choices FILE" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["eval", export, "--text", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err
    text = str(setup["base"] / "text.txt")
    assert cli.main(["eval", export, "--text", text, "--stride", str(CONTEXT + 1)]) == 2
    assert f"at most the model's context ({CONTEXT})" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--text", text]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_generate_chat_feeds_the_ids_fine_tuning_trains_on(setup, tmp_path, capsys):
    tok, template = setup["tok"], ChatTemplate()
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2? naïve 🙂"},
        {"role": "assistant", "content": "4"},
    ]
    (example,) = tokenize_conversations([conversation], tok, template)
    first_trained = int(example.trains.argmax())
    expected = example.tokens[:first_trained].tolist()  # everything before the assistant's answer
    got = chat_prompt_ids(template, tok, conversation[1]["content"], conversation[0]["content"])
    assert got == expected
    assert tok.decode(got, skip_special_tokens=False).endswith("<|assistant|>\n")

    export = tmp_path / "export"
    import shutil

    shutil.copytree(setup["export"], export)
    args = ["generate", str(export), "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"]
    assert cli.main([*args, "--chat", "--system", "Be nice."]) == 0
    assert cli.main([*args, "--system", "Be nice."]) == 2
    assert "--system needs --chat" in capsys.readouterr().err
    config = json.loads((export / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (export / "tokenizer_config.json").write_text(json.dumps(config))
    rewrite_checksums(export)
    assert cli.main([*args, "--chat"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and err.count("\n") == 1
    assert cli.main(args) == 0  # without --chat it still generates
