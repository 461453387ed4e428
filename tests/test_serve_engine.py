"""The inference engine without HTTP: KV cache against the uncached model, batch invariance,
chunked prefill, cancellation, bounded queue, incremental detokenisation and stop strings."""

import pytest
import torch
from qk_norm_launcher import QKNormKernels
from serve_helpers import make_tokenizer, small_model_config

import pretrain.model
from pretrain.model import Transformer
from pretrain.serve.engine import Engine, QueueFull, SamplingParams, invariant_batch_sizes
from pretrain.serve.text import IncrementalDetokenizer, StopStringFilter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add synchronisation (and the server uses one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(512)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(small_model_config(tokenizer.get_vocab_size())).eval()


def _engine(model, tokenizer, **kw):
    kw = {"max_batch": 8, "max_queue": 32, "prefill_chunk": 16, "step_tokens": 32, **kw}
    return Engine(model, tokenizer, eos_ids=[tokenizer.token_to_id("<|endoftext|>")], **kw)


def _prompts(n, vocab, seed=1, max_len=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def _step_until(engine, done, max_steps=2_000):
    for _ in range(max_steps):
        if done():
            return
        engine.step()
    raise AssertionError(f"not done after {max_steps} steps")


def _run_together(engine, prompts, params):
    requests = [engine.make_request(p, sp, lambda r, o: None) for p, sp in zip(prompts, params)]
    engine.submit(requests)
    for _ in range(10_000):
        if all(r.finished for r in requests):
            break
        engine.step()
    return [r.output_ids for r in requests]


@torch.no_grad()
def _uncached_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_decode_with_the_cache_equals_the_uncached_argmax(model, tokenizer):
    engine = _engine(model, tokenizer)
    for prompt in _prompts(4, model.config.vocab_size, seed=2):  # prompts of several chunks
        params = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
        assert engine.generate(prompt, params) == _uncached_greedy(model, prompt, 25)


def test_an_op_added_to_the_model_reaches_prefill_and_decode(tokenizer, monkeypatch):
    """QK-norm patched into pretrain.model changes the engine's tokens exactly as the model's."""
    torch.manual_seed(0)
    model = Transformer(small_model_config(tokenizer.get_vocab_size())).eval()
    prompt = _prompts(1, model.config.vocab_size, seed=6)[0]
    plain = _uncached_greedy(model, prompt, 20)
    monkeypatch.setattr(pretrain.model, "kernels", QKNormKernels())
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    patched = _engine(model, tokenizer).generate(prompt, params)
    assert patched == _uncached_greedy(model, prompt, 20) != plain


def test_decode_logits_match_the_full_forward(model, tokenizer):
    """The cached decode step's logits equal the uncached forward's at the same position."""
    engine = _engine(model, tokenizer)
    prompt = _prompts(1, model.config.vocab_size, seed=3)[0] + [5, 7]
    request = engine.make_request(prompt[:-1], SamplingParams(max_tokens=5), lambda r, o: None)
    engine.submit([request])
    _step_until(engine, lambda: request.prefilled)
    n = len(prompt) - 1
    size = engine.batch_sizes[0]
    tokens = torch.tensor([prompt[-1]] + [0] * (size - 1))
    positions = torch.tensor([n] + [0] * (size - 1))
    slots = torch.tensor([request.slot] + [engine.cache.scratch] * (size - 1))
    got = engine.decode_forward(tokens, positions, slots)[0]
    expected = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_every_request_gets_its_solo_tokens_in_any_company(model, tokenizer):
    """Greedy and seeded sampling: bitwise the same tokens alone and among 20 others."""
    engine = _engine(model, tokenizer)
    prompts = _prompts(20, model.config.vocab_size, seed=4)
    params = [
        SamplingParams(
            max_tokens=10 + 3 * (i % 7),
            temperature=0.0 if i % 2 else 0.8,
            top_p=0.9,
            top_k=0 if i % 3 else 50,
            seed=100 + i,
            ignore_eos=True,
        )
        for i in range(20)
    ]
    solo = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    assert _run_together(engine, prompts, params) == solo
    # Another arrival order changes slots, batch positions and padding; never the tokens.
    order = list(reversed(range(20)))
    shuffled = _run_together(engine, [prompts[i] for i in order], [params[i] for i in order])
    assert shuffled == [solo[i] for i in order]


def test_decode_logits_of_a_row_do_not_depend_on_the_batch(model, tokenizer):
    """Bitwise: a row's logits are the same with 0 to 7 other rows beside it, at any position."""
    engine = _engine(model, tokenizer)
    g = torch.Generator().manual_seed(5)
    V, L = model.config.vocab_size, model.config.max_seq_len
    engine.cache.k.normal_(generator=g)
    engine.cache.v.normal_(generator=g)
    reference = None
    for n in range(1, 9):
        size = engine.decode_batch_size(n)
        tokens = torch.randint(0, V, (size,), generator=g)
        positions = torch.randint(0, L, (size,), generator=g)
        others = torch.tensor([s for s in range(8) if s != 3])  # nobody else writes slot 3
        slots = others[torch.randperm(7, generator=g)].repeat(2)[:size]
        row = int(torch.randint(0, n, (1,), generator=g))
        tokens[row], positions[row], slots[row] = 11, 40, 3
        slots[n:] = engine.cache.scratch
        # the cache entry at the row's own position is rewritten by the step itself
        logits = engine.decode_forward(tokens, positions, slots, rows=n)[row]
        reference = logits if reference is None else reference
        assert torch.equal(logits, reference), f"row logits changed with {n} rows"


def test_batch_sizes_always_include_the_largest(model):
    sizes = invariant_batch_sizes(
        [m.weight for m in model.modules() if hasattr(m, "in_features")], 12
    )
    assert sizes[-1] == 12 and sizes == sorted(set(sizes))


def test_a_long_prompt_is_read_in_chunks_while_others_decode(model, tokenizer):
    engine = _engine(model, tokenizer, prefill_chunk=8, step_tokens=16)
    short = engine.make_request(
        [1, 2, 3],
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
        lambda r, o: None,
    )
    engine.submit([short])
    engine.step()
    long = engine.make_request(
        list(range(100)), SamplingParams(max_tokens=2, temperature=0.0), lambda r, o: None
    )
    engine.submit([long])
    produced = []
    for _ in range(1_000):
        if long.prefilled:
            break
        before = len(short.output_ids)
        engine.step()
        produced.append(len(short.output_ids) - before)
    assert len(produced) >= 100 // 16  # the 100-token prompt took several steps...
    assert all(p == 1 for p in produced)  # ...and the short request decoded in every one


def test_cancel_mid_prefill_frees_the_slot(model, tokenizer):
    engine = _engine(model, tokenizer, prefill_chunk=8, step_tokens=8)
    outputs = []
    request = engine.make_request(
        list(range(100)), SamplingParams(max_tokens=5), lambda r, o: outputs.append(o)
    )
    engine.submit([request])
    engine.step()
    assert 0 < request.num_cached < 100 and len(engine.free_slots) == 7
    engine.cancel(request)
    engine.step()
    assert request.finished and outputs[-1].finish_reason == "abort"
    assert len(engine.free_slots) == 8 and not engine.running


def test_queue_is_bounded(model, tokenizer):
    engine = _engine(model, tokenizer, max_batch=2, max_queue=3)
    make = lambda: engine.make_request([1, 2], SamplingParams(max_tokens=2), lambda r, o: None)  # noqa: E731
    engine.submit([make() for _ in range(4)])
    with pytest.raises(QueueFull):
        engine.submit([make(), make()])  # all or nothing
    engine.submit([make()])
    with pytest.raises(QueueFull):
        engine.submit([make()])


def test_eos_and_max_tokens_finish(model, tokenizer):
    engine = _engine(model, tokenizer)
    prompt = [3, 4, 5]
    greedy = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outputs = []
    request = engine.make_request(
        prompt,
        SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[greedy[2]]),
        lambda r, o: outputs.append(o),
    )
    engine.submit([request])
    _step_until(engine, lambda: request.finished)
    assert request.output_ids == greedy[:3] and outputs[-1].finish_reason == "stop"
    assert sum(len(o.token_ids) for o in outputs) == 3


def test_incremental_detokenizer_never_splits_a_character(tokenizer):
    text = "naïve café — 日本語 🙂🚀 done"
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens completed no character


@pytest.mark.parametrize(
    "pieces,stop,released",
    [
        (["Hello wo", "rld. EN", "D here"], ["END"], "Hello world. "),
        (["ab", "c", "d"], ["cd", "bcx"], "abc"[:2]),
        (["x", "y", "z"], ["q"], "xyz"),
        (["a<", "/s", ">b"], ["</s>"], "a"),
    ],
)
def test_stop_strings_are_cut_and_never_released(pieces, stop, released):
    f = StopStringFilter(stop)
    out = []
    for p in pieces:
        out.append(f.feed(p))
        if f.stopped:
            break
    if not f.stopped:
        out.append(f.flush())
    assert "".join(out) == released
    for s in stop:
        assert s not in "".join(out)


def test_a_request_whose_logits_go_bad_mid_decode_fails_alone(tokenizer):
    """One row of the batched decode turns NaN: that request ends with "error", the others
    (greedy and seeded) get their solo tokens, and the gauges count nobody afterwards."""
    from pretrain.serve.metrics import Metrics

    torch.manual_seed(0)
    model = Transformer(small_model_config(tokenizer.get_vocab_size(), tie_embeddings=False))
    model.eval()
    vocab = model.config.vocab_size
    prompts = _prompts(6, vocab, seed=9, max_len=20)
    params = [
        SamplingParams(max_tokens=12, temperature=0.9 * (i % 2), seed=300 + i, ignore_eos=True)
        for i in range(6)
    ]
    solo = [_engine(model, tokenizer).generate(p, sp) for p, sp in zip(prompts, params)]
    used = {t for ids in prompts + solo for t in ids}
    # A seed whose first draw is a token nobody else reads: poisoning that token's embedding
    # leaves every other request's numbers alone and breaks this one at its first decode.
    bad_prompt = [5, 6, 7]
    for seed in range(100):
        bad_params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        first = _engine(model, tokenizer).generate(bad_prompt, bad_params)[0]
        if first not in used and first not in bad_prompt:
            break
    with torch.no_grad():
        model.embed_tokens.weight[first] = float("nan")

    metrics = Metrics(slots=8)
    engine = _engine(model, tokenizer, metrics=metrics)
    outputs = {}
    requests = [
        engine.make_request(p, sp, lambda r, o: outputs.setdefault(r.id, []).append(o))
        for p, sp in zip([bad_prompt, *prompts], [bad_params, *params])
    ]
    engine.submit(requests)
    _step_until(engine, lambda: all(r.finished for r in requests))
    bad, *good = requests
    assert bad.output_ids == [first]  # it did reach the decode batch before failing
    last = outputs[bad.id][-1]
    assert last.finish_reason == "error" and "not finite" in last.error
    assert [r.output_ids for r in good] == solo
    assert all(outputs[r.id][-1].finish_reason == "length" for r in good)
    for gauge in ("pretrain_requests_running", "pretrain_kv_slots_in_use"):
        assert metrics.registry.get_sample_value(gauge) == 0
