"""Sampling and uncached generation, against distributions computed independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.generate import generate
from pretrain.model import Transformer
from pretrain.sampling import sample_next_token

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])


def expected_distribution(logits, temperature, top_k, top_p) -> list[float]:
    """The filtered, renormalised distribution, written out plainly in float64."""
    p = [math.exp(x / temperature) for x in logits.double().tolist()]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k else order)
    total = sum(p[i] for i in keep)
    mass, nucleus = 0.0, set()
    for i in order:
        if i in keep and mass < top_p:
            nucleus.add(i)
            mass += p[i] / total
    z = sum(p[i] for i in nucleus)
    return [p[i] / z if i in nucleus else 0.0 for i in range(len(p))]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.9), (2.0, 3, 0.99)],
)
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    n = 200_000
    logits = LOGITS.expand(n, -1)
    g = torch.Generator().manual_seed(0)
    tokens = sample_next_token(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g
    )
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    want = expected_distribution(LOGITS, temperature, top_k, top_p)
    for f, p in zip(freq.tolist(), want):
        if p == 0:
            assert f == 0
        else:
            assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_greedy_is_argmax_and_draws_no_random_numbers():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    for temperature in (0, 0.0, None):
        out = sample_next_token(logits, temperature=temperature, top_k=5, generator=g)
        assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(g.get_state(), before)
    assert torch.equal(sample_next_token(logits, temperature=5.0, top_k=1), logits.argmax(-1))
    tiny_p = sample_next_token(logits, temperature=1.0, top_p=1e-6, generator=g)
    assert torch.equal(tiny_p, logits.argmax(-1))


def test_per_row_settings_and_generators_make_rows_independent():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = [sample_next_token(logits, temperature=[1.0, 0, 0.8], top_p=[1.0, 1.0, 0.9], generator=gens(5, 6, 7)) for _ in range(2)]  # fmt: skip
    assert torch.equal(batch[0], batch[1])
    assert batch[0][1] == logits[1].argmax()
    alone = sample_next_token(logits[2:], temperature=0.8, top_p=0.9, generator=gens(7))
    assert batch[0][2] == alone[0]
    draws = {int(sample_next_token(logits[:1], temperature=1.0, generator=gens(s))[0]) for s in range(30)}  # fmt: skip
    assert len(draws) > 5  # seeds matter


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 1.5}]
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(2, 10), **{"temperature": 1.0, **kwargs})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16
    )
    return Transformer(cfg).eval()


def test_greedy_generation_follows_the_argmax_of_each_full_forward(model):
    prompt = [3, 1, 4]
    out = generate(model, prompt, max_tokens=8, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for token in out:
            assert token == int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
    assert len(out) == 8


def test_generation_stops_at_a_stop_token_and_at_the_context_end(model):
    prompt = [3, 1, 4]
    free = generate(model, prompt, max_tokens=8, temperature=0)
    stopped = generate(model, prompt, max_tokens=8, temperature=0, stop_ids=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]
    long = generate(model, prompt, max_tokens=100, temperature=0)
    assert len(prompt) + len(long) == model.config.max_seq_len


def test_seeded_sampling_repeats(model):
    a = generate(model, [1, 2], max_tokens=10, temperature=1.0, seed=11)
    b = generate(model, [1, 2], max_tokens=10, temperature=1.0, seed=11)
    assert a == b
    others = {
        tuple(generate(model, [1, 2], max_tokens=10, temperature=1.0, seed=s)) for s in range(5)
    }
    assert len(others) > 1
