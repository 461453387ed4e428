"""Fine-tuning data: chat rendering, loss masks, packing, the loader's resume, bad rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import make_tokenizer, write_rows

from pretrain.errors import UserError
from pretrain.sft import (
    IGNORE_INDEX,
    ChatTemplate,
    Example,
    SFTLoader,
    fit_to_context,
    pack,
    read_jsonl,
    split_train_val,
    tokenize_conversations,
)
from pretrain.tokenizer import END_OF_TURN, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def write_jsonl(path, rows) -> str:
    return str(write_rows(path, rows))


# --- rendering and the loss mask --------------------------------------------------------------


def test_prompt_tokens_carry_no_loss(tokenizer):
    """The masked positions are exactly the prompt's: the tokens the server feeds the model."""
    template = ChatTemplate()
    prompt, completion = "What is the capital of France?", "Paris"
    (ex,) = tokenize_conversations(
        [[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]],
        tokenizer,
        template,
    )
    # What generation is prompted with: the template with the generation prompt, tokenized whole.
    served = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(served, add_special_tokens=False).ids
    n = len(prompt_ids)
    assert ex.tokens[:n].tolist() == prompt_ids
    assert not ex.trains[:n].any() and ex.trains[n:].all()
    assert tokenizer.decode(ex.tokens[n:].tolist(), skip_special_tokens=False) == (
        completion + END_OF_TURN + "\n"
    )
    inputs, targets = ex.inputs_targets()
    # Target t predicts token t+1: the first trained target is the completion's first token.
    ignored = np.flatnonzero(targets == IGNORE_INDEX)
    assert ignored.tolist() == list(range(n - 1))
    assert targets[n - 1 :].tolist() == ex.tokens[n:].tolist()
    assert inputs.tolist() == ex.tokens[:-1].tolist()


def test_multi_turn_trains_on_every_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "The fox is quick?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "The dog is quick?"},
        {"role": "assistant", "content": "no"},
    ]
    template = ChatTemplate()
    (ex,) = tokenize_conversations([messages], tokenizer, template)
    assert tokenizer.decode(ex.tokens.tolist(), skip_special_tokens=False) == template.render(
        messages
    )
    # The trained stretches are exactly the two assistant contents with their end of turn.
    stretches, current = [], []
    for tok, trains in zip(ex.tokens.tolist(), ex.trains.tolist()):
        if trains:
            current.append(tok)
        elif current:
            stretches.append(current)
            current = []
    if current:
        stretches.append(current)
    decoded = [tokenizer.decode(s, skip_special_tokens=False) for s in stretches]
    assert decoded == [f"yes{END_OF_TURN}\n", f"no{END_OF_TURN}\n"]


def test_template_that_is_not_prefix_stable_is_refused():
    # Renders the last message first: a prefix of the conversation is not a prefix of the text.
    reversed_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="prefix"):
        ChatTemplate(reversed_template).segments(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_template_runs_sandboxed():
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ChatTemplate("{{ messages.__class__.__subclasses__() }}").render([])


def test_tokenizer_without_chat_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match="special token"):
        tokenize_conversations(
            [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}]],
            plain,
            ChatTemplate(),
        )


# --- reading and bad rows ---------------------------------------------------------------------


def test_reads_both_shapes(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p", "completion": "c"},
            "",
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    convs, report = read_jsonl(path)
    assert convs == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    ]
    assert report.rows == 2 and report.skipped_total == 0


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ({"text": "hello"}, "neither"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"prompt": "p", "completion": "  "}, "empty completion"),
    (
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
        "empty completion",
    ),
    ({"messages": [{"role": "user", "content": "u"}]}, "no assistant message"),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, row])
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert f"{path}:2:" in str(e.value) and message in str(e.value)
    assert "--skip-bad-rows" in str(e.value)


def test_skip_bad_rows_counts_them(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] + [row for row, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    convs, report = read_jsonl(path, skip_bad_rows=True)
    assert len(convs) == 1
    assert report.skipped_total == len(BAD_ROWS)
    assert report.skipped["empty completion"] == 2
    assert report.first_skipped[0].startswith(f"{path}:2:")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(UserError, match="no usable rows.*1 bad rows skipped"):
        read_jsonl(path, skip_bad_rows=True)


# --- fitting, packing, batches ----------------------------------------------------------------


def make_example(n_prompt: int, n_completion: int, start: int = 10) -> Example:
    tokens = np.arange(start, start + n_prompt + n_completion, dtype=np.int64)
    trains = np.array([False] * n_prompt + [True] * n_completion)
    return Example(tokens, trains)


def test_long_examples_are_cut_and_counted():
    examples = [make_example(3, 4), make_example(5, 10), make_example(12, 3)]
    docs, report = fit_to_context(examples, seq_len=10)
    assert [len(d) for d in docs] == [6, 10]
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 1)
    assert "1 longer than the context (10) were cut" in report.describe(10)
    assert "1 dropped" in report.describe(10)


def test_packing_keeps_every_document_once_in_order():
    lengths = [5, 7, 3, 9, 2, 6, 1]
    order = np.array([3, 0, 6, 2, 5, 1, 4])
    rows = pack(lengths, order, seq_len=10)
    assert [i for row in rows for i in row] == order.tolist()
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[3], [0, 6, 2], [5], [1, 4]]


def make_docs(n: int, rng: np.random.Generator, seq_len: int = 32):
    examples = [
        make_example(
            int(rng.integers(1, 8)), int(rng.integers(1, 12)), start=int(rng.integers(5, 90))
        )
        for _ in range(n)
    ]
    docs, _ = fit_to_context(examples, seq_len)
    return docs


def test_packed_batch_layout():
    docs = make_docs(40, np.random.default_rng(0))
    loader = SFTLoader(docs, seq_len=32, global_batch_size=4, seed=1, pad_id=0)
    batch = next(loader)
    assert batch.inputs.shape == batch.targets.shape == batch.doc_ids.shape == (4, 32)
    assert batch.inputs.dtype == batch.targets.dtype == batch.doc_ids.dtype == torch.int64
    rows = loader.rows_of_epoch(0)[:4]
    for r, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            n = len(docs[i])
            assert batch.inputs[r, pos : pos + n].tolist() == docs[i].inputs.tolist()
            assert batch.targets[r, pos : pos + n].tolist() == docs[i].targets.tolist()
            assert (batch.doc_ids[r, pos : pos + n] == d).all()
            pos += n
        assert (batch.targets[r, pos:] == IGNORE_INDEX).all()


def test_padded_batches_are_one_document_per_row():
    docs = make_docs(20, np.random.default_rng(1))
    loader = SFTLoader(docs, seq_len=32, global_batch_size=4, packing=False, pad_id=0)
    batch = next(loader)
    assert batch.doc_ids is None
    assert batch.inputs.shape[1] % 8 == 0 and batch.inputs.shape[1] <= 32
    trained = (batch.targets != IGNORE_INDEX).sum().item()
    expected = sum(
        int((docs[row[0]].targets != IGNORE_INDEX).sum()) for row in loader.rows_of_epoch(0)[:4]
    )
    assert trained == expected


def test_every_document_trains_once_per_epoch():
    docs = make_docs(30, np.random.default_rng(2))
    loader = SFTLoader(docs, seq_len=32, global_batch_size=3, seed=5)
    rows = loader.rows_per_epoch()
    seen_targets = 0
    batches = -(-rows // 3)
    for _ in range(batches):
        seen_targets += (next(loader).targets != IGNORE_INDEX).sum().item()
    per_epoch = sum(int((d.targets != IGNORE_INDEX).sum()) for d in docs)
    # The last batch may run into the next epoch; every document of epoch 0 was seen.
    assert seen_targets >= per_epoch
    assert loader.epoch == 1 or (loader.epoch == 0 and rows % 3 == 0)


def test_resume_with_another_world_size_sees_the_same_batches():
    docs = make_docs(50, np.random.default_rng(3))
    reference = SFTLoader(docs, seq_len=32, global_batch_size=4, seed=9)
    for _ in range(3):
        next(reference)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(20)]  # runs across an epoch boundary
    ranks = [
        SFTLoader(docs, seq_len=32, global_batch_size=4, seed=9, rank=r, world_size=2)
        for r in range(2)
    ]
    for loader in ranks:
        loader.load_state_dict(state)
    for want in expected:
        got = [next(loader) for loader in ranks]
        assert torch.equal(torch.cat([g.inputs for g in got]), want.inputs)
        assert torch.equal(torch.cat([g.targets for g in got]), want.targets)
        assert torch.equal(torch.cat([g.doc_ids for g in got]), want.doc_ids)


def test_state_from_other_data_is_refused():
    docs = make_docs(10, np.random.default_rng(4))
    loader = SFTLoader(docs, seq_len=32, global_batch_size=2)
    state = loader.state_dict()
    other = SFTLoader(docs[:5], seq_len=32, global_batch_size=2)
    with pytest.raises(UserError, match="same --data"):
        other.load_state_dict(state)


def test_split_is_seeded_and_disjoint():
    train, val = split_train_val(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert not set(train) & set(val)
    again = split_train_val(100, 0.1, seed=3)
    assert (again[1] == val).all()
    assert len(split_train_val(5, 0.01, seed=0)[1]) == 1


def test_packed_loss_equals_each_conversation_alone(tokenizer):
    """A packed row with doc_ids trains exactly as its conversations would, one at a time."""
    from pretrain.config import ModelConfig
    from pretrain.model import Transformer

    torch.manual_seed(0)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("The fox?", "quick"), ("Capital of France?", "Paris"), ("add(a, b)", "a + b")]
    ]
    docs, _ = fit_to_context(tokenize_conversations(conversations, tokenizer, ChatTemplate()), 64)
    cfg = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
    )
    model = Transformer(cfg).double()
    loader = SFTLoader(docs, seq_len=64, global_batch_size=1, shuffle=False)
    batch = next(loader)
    assert loader.rows_of_epoch(0) == [[0, 1, 2]]
    packed = model(batch.inputs, batch.targets, doc_ids=batch.doc_ids, reduction="sum")
    alone = sum(
        model(torch.from_numpy(d.inputs)[None], torch.from_numpy(d.targets)[None], reduction="sum")
        for d in docs
    )
    # Some ops compute in fp32 (RoPE tables), hence not float64 tolerances.
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=0.0)
    leaky = model(batch.inputs, batch.targets, reduction="sum")  # attends across conversations
    assert abs(leaky.item() - alone.item()) > 1e-3
