"""``pretrain serve`` answers the requests lm-evaluation-harness sends (``local-completions``).

The requests are lm-eval's own payloads (``lm_eval/models/openai_completions.py``): loglikelihood
is a prompt of token ids with ``echo``, ``logprobs: 1`` and ``max_tokens: 1``; generation asks for
``max_gen_toks`` tokens. A scoring request whose prompt fills the context but one token is served,
with the prompt's log-probabilities of the model's forward. The legacy OpenAI form of scoring,
``echo`` with ``max_tokens: 0``, gives the same prompt log-probabilities and generates nothing, up
to a prompt that fills the whole context, streamed or not. A prompt longer than the context (with
``max_tokens`` 0 or 1) and a ``max_tokens`` beyond the context are 400s that name the lengths, at
once. The app runs in process (routes, middleware, engine thread) to keep the test short; the
same app behind uvicorn is what the other serving tests start.
"""

from __future__ import annotations

import argparse
import json
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


def ok_json(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def forward_logprobs(state, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from the model's own forward, in float64."""
    with torch.no_grad():
        logits = state.loaded.model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), ids[1:]].tolist()


def metric(c, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_scoring_request_that_fills_the_context_gets_the_forwards_logprobs(client):
    c, state = client
    ids = prompt_ids(state, CONTEXT - 1)  # lm-eval's max_length - 1, plus the token generated
    got = ok_json(c.post("/v1/completions", json=loglikelihood_payload(ids)))
    got = got["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == CONTEXT  # the prompt's, then the generated token's
    assert got[1:-1] == pytest.approx(forward_logprobs(state, ids), abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(client):
    c, state = client
    ids = prompt_ids(state, 40)
    generated = metric(c, "pretrain_generation_tokens_total")
    scored = ok_json(c.post("/v1/completions", json=loglikelihood_payload(ids, 0)))
    one = ok_json(c.post("/v1/completions", json=loglikelihood_payload(ids, 1)))["choices"][0]
    choice = scored["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == state.loaded.tokenizer.decode(ids)
    assert one["text"].startswith(choice["text"]) and len(one["text"]) > len(choice["text"])
    assert scored["usage"] == {"prompt_tokens": 40, "completion_tokens": 0, "total_tokens": 40}
    lp, lp1 = choice["logprobs"], one["logprobs"]
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert lp["tokens"][0] is None and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    # Exactly the prompt part of the max_tokens 1 answer, which holds one more (generated) entry.
    assert lp["tokens"] == lp1["tokens"][:-1] and lp["text_offset"] == lp1["text_offset"][:-1]
    assert lp["token_logprobs"][1:] == pytest.approx(lp1["token_logprobs"][1:-1], abs=1e-5)
    for top, top1 in zip(lp["top_logprobs"][1:], lp1["top_logprobs"][1:-1]):
        assert top.keys() == top1.keys() and list(top.values()) == pytest.approx(
            list(top1.values()), abs=1e-5
        )
    assert lp["token_logprobs"][1:] == pytest.approx(forward_logprobs(state, ids), abs=1e-5)
    # The two requests generated one token (the max_tokens 1 one); the metrics took both.
    assert metric(c, "pretrain_generation_tokens_total") == generated + 1


def test_a_streamed_score_is_one_chunk_with_the_prompt_and_its_logprobs(client):
    c, state = client
    body = {"prompt": "def main(", "max_tokens": 0, "echo": True, "logprobs": 2}
    plain = ok_json(c.post("/v1/completions", json=body))
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/completions", json=stream) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 3, events
    first, last = json.loads(events[0]), json.loads(events[1])
    assert len(first["choices"]) == 1
    streamed = first["choices"][0]
    assert streamed["text"] == "def main(" == plain["choices"][0]["text"]
    assert streamed["finish_reason"] == "length"
    want = plain["choices"][0]["logprobs"]
    assert streamed["logprobs"]["tokens"] == want["tokens"]
    assert streamed["logprobs"]["text_offset"] == want["text_offset"]
    assert streamed["logprobs"]["token_logprobs"][0] is None
    assert streamed["logprobs"]["token_logprobs"][1:] == pytest.approx(
        want["token_logprobs"][1:], abs=1e-5
    )
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 0
    assert last["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_a_streamed_echo_joins_to_the_plain_answer_offsets_included(client):
    c, _ = client
    body = {"prompt": "def main(", "max_tokens": 3, "echo": True, "logprobs": 1}
    body.update(temperature=0, ignore_eos=True)
    want = ok_json(c.post("/v1/completions", json=body))["choices"][0]
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert chunks[0]["text"].startswith("def main(")  # the prompt comes with its logprobs
    assert "".join(ch["text"] for ch in chunks) == want["text"]
    for key in ("tokens", "text_offset"):
        assert [x for ch in chunks for x in ch["logprobs"][key]] == want["logprobs"][key]
    lp = want["logprobs"]
    assert lp["text_offset"][:2] == [0, len("def")]  # the first token takes its place too
    for token, offset in zip(lp["tokens"][1:], lp["text_offset"][1:]):
        assert want["text"][offset : offset + len(token)] == token


def test_a_prompt_that_fills_the_whole_context_can_be_scored(client):
    c, state = client
    ids = prompt_ids(state, CONTEXT)
    out = ok_json(c.post("/v1/completions", json={**loglikelihood_payload(ids, 0), "n": 2}))
    assert out["usage"]["completion_tokens"] == 0
    first, second = out["choices"]  # n choices of a score are the same echo
    assert first["text"] == second["text"] and first["logprobs"] == second["logprobs"]
    got = first["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == CONTEXT
    assert got[1:] == pytest.approx(forward_logprobs(state, ids), abs=1e-5)
    # One token less than that, the same prompt cannot be continued by even one token.
    error = error_of(c.post("/v1/completions", json=loglikelihood_payload(ids, 1)))
    assert f"{CONTEXT} in the prompt, 1 for the completion" in error["message"]


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


def test_max_tokens_0_without_echo_is_a_400_that_says_it_is_for_scoring(client):
    c, state = client
    body = {**loglikelihood_payload(prompt_ids(state, 10), 0), "echo": False}
    error = error_of(c.post("/v1/completions", json=body))
    assert error["param"] == "max_tokens" and "at least 1, got 0" in error["message"]
    assert "max_tokens 0 is only for scoring" in error["message"] and "echo" in error["message"]
    error = error_of(c.post("/v1/completions", json=loglikelihood_payload([5, 6], -1)))
    assert error["param"] == "max_tokens" and "at least 0 with echo, got -1" in error["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}
    assert error_of(c.post("/v1/chat/completions", json=chat))["param"] == "max_tokens"


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
