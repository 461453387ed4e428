"""``pretrain serve`` as a real process on a loopback port, driven by the official openai client
and raw httpx: completions and chat, plain and streamed, against the uncached model and
``pretrain generate``; batch invariance under 32 concurrent clients; every bad input."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import torch
from serve_helpers import ServerProcess, make_export

from pretrain.export import load_model
from pretrain.tokenizer import load_tokenizer

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def server(export):
    proc = ServerProcess(export, "--max-batch", "8", "--max-queue", "64", "--api-key", KEY)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(export):
    return load_model(export)


@pytest.fixture(scope="module")
def tokenizer(export):
    return load_tokenizer(export)


def _sse_events(lines) -> list:
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _stream(http, path, body) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_health_models_and_metrics_answer(server, client, http):
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without the key
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    raw = http.get("/v1/models").json()["data"][0]
    assert raw["max_model_len"] == 128 and raw["root"].endswith("tiny-chat")
    text = httpx.get(f"{server.url}/metrics").text  # open without the key
    for name in (
        "pretrain_requests_total",
        "pretrain_time_to_first_token_seconds_bucket",
        "pretrain_inter_token_latency_seconds_bucket",
        "pretrain_requests_running",
        "pretrain_requests_waiting",
        "pretrain_kv_slots_in_use",
        "pretrain_prompt_tokens_total",
        "pretrain_generation_tokens_total",
    ):
        assert name in text


def test_completion_stream_joins_to_the_plain_text(client):
    kw = dict(model="tiny-chat", prompt="def main(args):", max_tokens=40, temperature=0)
    plain = client.completions.create(**kw)
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks)  # usage only when asked for

    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_joins_to_the_plain_message(client):
    kw = dict(
        model="tiny-chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "naïve café 🙂, what is a list?"},
        ],
        max_tokens=30,
        temperature=0,
    )
    plain = client.chat.completions.create(**kw)
    message = plain.choices[0].message
    assert message.role == "assistant" and plain.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    joined = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert joined == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]


@torch.no_grad()
def test_greedy_equals_the_uncached_argmax_and_pretrain_generate(http, model, tokenizer, export):
    prompt = "import json\n\ndef load(path):"
    ids = tokenizer.encode(prompt).ids
    body = {"prompt": ids, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    got = http.post("/v1/completions", json=body).json()
    seq = list(ids)
    for _ in range(30):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got["choices"][0]["text"] == tokenizer.decode(seq[len(ids) :])
    assert got["usage"]["completion_tokens"] == 30

    text = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0})
    cmd = [sys.executable, "-m", "pretrain.cli", "generate", str(export), "--prompt", prompt]
    cmd += ["--max-tokens", "20", "--temperature", "0", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.removesuffix("\n") == text.json()["choices"][0]["text"]


def test_seeded_sampling_repeats(http):
    body = {"prompt": "class Foo:", "max_tokens": 25, "temperature": 1.0, "top_p": 0.95}
    a = http.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    b = http.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    c = http.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert a == b and a != c
    two = http.post("/v1/completions", json={**body, "seed": 7, "n": 2}).json()
    assert [ch["index"] for ch in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == a  # choice 0 draws with the seed itself


def test_stop_strings_are_trimmed_and_never_streamed(http):
    body = {"prompt": "for i in range(10):", "max_tokens": 40, "temperature": 0}
    full = http.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    text = full["choices"][0]["text"]
    stop = text[10:13]
    assert len(stop) == 3
    expected = text[: text.index(stop)]
    cut = http.post("/v1/completions", json={**body, "ignore_eos": True, "stop": [stop, "\x00"]})
    choice = cut.json()["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "stop"
    events = _stream(http, "/v1/completions", {**body, "ignore_eos": True, "stop": stop})
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == expected and not any(stop in p for p in pieces)


def test_logprobs_echo_and_chat_logprobs(http, tokenizer):
    body = {"prompt": "x = [1, 2", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    body["ignore_eos"] = True
    out = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = out["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values()), abs=1e-5)

    echoed = http.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "x = [1, 2" + out["text"]
    n_prompt = len(tokenizer.encode("x = [1, 2").ids)
    assert len(echoed["logprobs"]["tokens"]) == n_prompt + 5
    assert echoed["logprobs"]["token_logprobs"][0] is None

    chat = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)


def test_tokenize_and_detokenize(http):
    ids = http.post("/tokenize", json={"prompt": "héllo wörld"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 128
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {
        "prompt": "héllo wörld"
    }
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > ids["count"] // 4


def test_32_concurrent_clients_get_their_solo_results(server):
    """Different prompts, lengths and settings; greedy and seeded: the same tokens as alone."""
    bodies = []
    for i in range(32):
        body = {
            "prompt": f"{'#' * (i % 5)} item {i}: " + "abc def " * (i % 9),
            "max_tokens": 8 + (i * 7) % 17,
            "temperature": 0 if i % 2 == 0 else 0.9,
            "ignore_eos": True,
        }
        if i % 2:
            body["seed"] = 1000 + i
        bodies.append(body)

    async def run_all(concurrent: bool):
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as c:

            async def one(body):
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            if concurrent:
                return await asyncio.gather(*(one(b) for b in bodies))
            return [await one(b) for b in bodies]

    solo = asyncio.run(run_all(False))
    together = asyncio.run(run_all(True))
    assert together == solo


AUTH_CASES = [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
]


@pytest.mark.parametrize("headers,status", AUTH_CASES)
def test_api_key_is_required_on_the_api_only(server, headers, status):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"}, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


BAD = [
    # (path, body or raw bytes, status, param, code)
    ("/v1/completions", b'{"prompt": "a", ', 400, None, None),
    ("/v1/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "a", "max_tokens": "3"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature", None),
    (
        "/v1/completions",
        {"prompt": "a", "temperature": -1, "stream": True},
        400,
        "temperature",
        None,
    ),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p", None),
    (
        "/v1/completions",
        {"prompt": "a", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        None,
    ),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs", None),
    (
        "/v1/completions",
        {"prompt": "a b " * 100, "max_tokens": 10},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "/v1/completions",
        {"prompt": "a", "max_tokens": 500},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages.0.role",
        None,
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1000},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        None,
    ),
    ("/v1/nothing", {}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_carries_on(
    http, path, body, status, param, code
):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    if code == "context_length_exceeded":
        assert "128" in error["message"]  # the context and the requested total are both named
        assert any(ch.isdigit() for ch in error["message"].split("requested")[1])
    ok = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "frobnicate": [1]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_every_prompt_form_gives_one_choice_per_prompt(http, tokenizer):
    texts = ["def f(x):", "import os"]
    ids = [tokenizer.encode(t).ids for t in texts]
    common = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    singles = [
        http.post("/v1/completions", json={**common, "prompt": t}).json()["choices"][0]["text"]
        for t in texts
    ]
    for prompt in (texts, ids):
        out = http.post("/v1/completions", json={**common, "prompt": prompt}).json()
        assert [c["text"] for c in out["choices"]] == singles
        assert out["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
        assert out["usage"]["completion_tokens"] == 12
    one = http.post("/v1/completions", json={**common, "prompt": ids[0]}).json()
    assert one["choices"][0]["text"] == singles[0]
