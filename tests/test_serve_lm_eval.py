"""``pretrain serve`` answers the requests lm-evaluation-harness sends (``local-completions``).

The requests are lm-eval's own payloads (``lm_eval/models/openai_completions.py``): loglikelihood
is a prompt of token ids with ``echo``, ``logprobs: 1`` and ``max_tokens: 1``; generation asks for
``max_gen_toks`` tokens. A scoring request whose prompt fills the context but one token is served,
with the prompt's log-probabilities of the model's forward; a prompt longer than the context (with
``max_tokens`` 0 or 1) and a ``max_tokens`` beyond the context are 400s that name the lengths, at
once. The app runs in process (routes, middleware, engine thread) to keep the test short; the
same app behind uvicorn is what the other serving tests start.
"""

from __future__ import annotations

import argparse
import time

import pytest
import torch
from serve_helpers import make_export

from pretrain.serve import server

CONTEXT = 128  # serve_helpers.small_model_config
SEED = 1234  # lm-eval's default seed, sent with every request


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from pretrain.serve.state import ServerState

    export = make_export(tmp_path_factory.mktemp("lm-eval") / "tiny")
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args([str(export)])  # the server's defaults
    state = ServerState(
        export_dir=export,
        model_name="tiny",
        api_key=None,
        engine_options={
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
            "prefill_chunk": args.prefill_chunk,
            "step_tokens": args.step_tokens,
        },
        device="cpu",
        threads=1,
    )
    with TestClient(server.build_app(state)) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, state.load_error
            time.sleep(0.05)
        yield c, state


def loglikelihood_payload(ids: list[int], max_tokens: int = 1) -> dict:
    """lm-eval's ``_create_payload(generate=False)`` for one request of token ids."""
    return {
        "model": "tiny",
        "prompt": [ids],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": SEED,
        "echo": True,
    }


def generate_payload(ids: list[int], max_gen_toks: int) -> dict:
    """lm-eval's ``_create_payload(generate=True)``."""
    return {
        "prompt": [ids],
        "model": "tiny",
        "max_tokens": max_gen_toks,
        "temperature": 0,
        "stop": ["\n\n", "Question:"],
        "seed": SEED,
    }


def prompt_ids(state, n: int) -> list[int]:
    return torch.randint(
        3, state.loaded.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)
    ).tolist()


def error_of(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_a_scoring_request_that_fills_the_context_gets_the_forwards_logprobs(client):
    c, state = client
    ids = prompt_ids(state, CONTEXT - 1)  # lm-eval's max_length - 1, plus the token generated
    r = c.post("/v1/completions", json=loglikelihood_payload(ids))
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == CONTEXT  # the prompt's, then the generated token's
    with torch.no_grad():
        logits = state.loaded.model(torch.tensor([ids]))[0]
    expected = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert got[1:-1] == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_a_prompt_longer_than_the_context_is_a_400_naming_the_lengths(client, max_tokens):
    c, state = client
    t0 = time.perf_counter()
    error = error_of(
        c.post("/v1/completions", json=loglikelihood_payload(prompt_ids(state, 200), max_tokens))
    )
    assert time.perf_counter() - t0 < 5
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert f"200 in the prompt, {max_tokens} for the completion" in error["message"]


def test_max_tokens_0_on_a_prompt_that_fits_says_how_to_score(client):
    c, state = client
    error = error_of(
        c.post("/v1/completions", json=loglikelihood_payload(prompt_ids(state, 10), 0))
    )
    assert error["param"] == "max_tokens" and "at least 1, got 0" in error["message"]
    assert "echo, logprobs and max_tokens 1" in error["message"]


@pytest.mark.parametrize("max_gen_toks", [CONTEXT, 256, 10**15])
def test_max_gen_toks_beyond_the_context_is_a_400_not_a_hang(client, max_gen_toks):
    c, state = client
    t0 = time.perf_counter()
    error = error_of(
        c.post("/v1/completions", json=generate_payload(prompt_ids(state, 5), max_gen_toks))
    )
    assert time.perf_counter() - t0 < 5
    assert error["code"] == "context_length_exceeded"
    assert f"5 in the prompt, {max_gen_toks} for the completion" in error["message"]
    assert f"maximum context length is {CONTEXT}" in error["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_gen_toks}
    assert error_of(c.post("/v1/chat/completions", json=chat))["code"] == "context_length_exceeded"
    ok = c.post("/v1/completions", json=generate_payload(prompt_ids(state, 5), 3))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3
