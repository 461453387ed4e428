"""``pretrain serve`` against hostile and careless clients, as real processes on loopback ports:
values no field can use (NaN, a lone surrogate, a seed out of range), bodies over the limit,
prompts that cannot fit, requests that can never fit, a request whose model output turns NaN
(it fails alone; the others finish and the gauges read zero), the published schema, the API key
on every path but /health and /metrics, and a prompt exit after draining. Last, while 8 clients
stream, one client sends every poisonous request: all 8 get their solo outputs and /health
keeps answering."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import ServerProcess, make_export, make_tokenizer, metric, small_model_config

from pretrain.export import save_export
from pretrain.model import Transformer

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEFAULT_LIMIT = 4 * 1024 * 1024
VICTIM_TOKENS = 60  # greedy tokens each victim of the poisoned model generates


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("hardening") / "tiny-chat")


@pytest.fixture(scope="module")
def server(export):
    proc = ServerProcess(export, "--max-batch", "16", "--max-queue", "16", "--api-key", KEY)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def _post_raw(http, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --------------------------------------------------------------------------- values


NON_FINITE = [
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "a", "temperature": Infinity}', "temperature"),
    ("/v1/completions", b'{"prompt": "a", "top_p": -Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "a", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"prompt": "a", "presence_penalty": NaN}', "presence_penalty"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
        "temperature",
    ),
]


@pytest.mark.parametrize("path,raw,param", NON_FINITE)
def test_a_non_finite_number_in_any_field_is_a_400(http, path, raw, param):
    error = _error(_post_raw(http, path, raw), 400)
    assert error["param"] == param and "finite" in error["message"]


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-6])
def test_a_tiny_temperature_is_greedy(http, temperature):
    body = {"prompt": "def f(x):", "max_tokens": 12, "ignore_eos": True}
    greedy = http.post("/v1/completions", json={**body, "temperature": 0})
    tiny = http.post("/v1/completions", json={**body, "temperature": temperature})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("seed,n", [(2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1)])
def test_a_seed_out_of_range_is_a_400(http, seed, n):
    r = http.post("/v1/completions", json={"prompt": "a", "seed": seed, "n": n, "max_tokens": 2})
    assert _error(r, 400)["param"] == "seed"


def test_the_largest_seeds_still_work(http):
    body = {"prompt": "a", "max_tokens": 2, "temperature": 1.0}
    assert http.post("/v1/completions", json={**body, "seed": 2**64 - 2, "n": 2}).status_code == 200
    assert http.post("/v1/completions", json={**body, "seed": -(2**63)}).status_code == 200


SURROGATES = [
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\\ud800"}]}',
        "messages.1.content",
    ),
    ("/tokenize", b'{"prompt": "\\ud83d"}', "prompt"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATES)
def test_a_lone_surrogate_is_a_400_naming_the_field(http, path, raw, param):
    error = _error(_post_raw(http, path, raw), 400)
    assert error["param"] == param and "surrogate" in error["message"]


def test_a_message_without_a_role_names_the_role(http):
    body = {"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.1.role" and "messages[1].role" in error["message"]


# --------------------------------------------------------------------------- sizes


def test_a_body_over_the_limit_is_a_413_naming_the_limit(http):
    raw = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    t0 = time.perf_counter()
    declared = _error(_post_raw(http, "/v1/completions", raw), 413)
    assert str(DEFAULT_LIMIT) in declared["message"] and declared["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is found while reading
        yield raw[:1000]
        for i in range(1000, len(raw), 1 << 16):
            yield raw[i : i + (1 << 16)]

    streamed = _error(http.post("/v1/completions", content=chunks()), 413)
    assert streamed["code"] == "request_too_large"
    assert time.perf_counter() - t0 < 5  # refused, not parsed or tokenized
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(http):
    body = {"prompt": "lorem ipsum " * 250_000, "max_tokens": 2}  # 3 MB, under the body limit
    t0 = time.perf_counter()
    error = _error(http.post("/v1/completions", json=body), 400)
    elapsed = time.perf_counter() - t0
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "3000000 bytes" in error["message"] and "128" in error["message"]
    assert elapsed < 3, elapsed  # tokenizing 3 MB takes several seconds here
    chat = {"messages": [{"role": "user", "content": "x" * 1_000_000}]}
    error = _error(http.post("/v1/chat/completions", json=chat), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


def test_a_prompt_that_fits_is_never_refused_by_the_early_check(http):
    """The bound is a safe one: a prompt just short of the context is served."""
    source = "naïve café: def f(x):\n    return [x * 2 for x in range(10)]  # 🙂\n" * 40

    def count(n):
        return http.post("/tokenize", json={"prompt": source[:n]}).json()["count"]

    lo, hi = 1, len(source)  # a long prefix of at most 127 tokens (counts are not monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= 127 else (lo, mid - 1)
    assert 120 <= count(lo) <= 127
    text = source[:lo]
    r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"prompt": source[: lo + 40], "max_tokens": 1})
    assert _error(r, 400)["code"] == "context_length_exceeded"


def test_a_request_that_can_never_fit_is_a_400_not_a_429(http):
    r = http.post("/v1/completions", json={"prompt": ["a"] * 20, "n": 16, "max_tokens": 2})
    error = _error(r, 400)
    assert "Retry-After" not in r.headers
    assert error["param"] == "n" and error["code"] == "too_many_sequences"
    assert "320" in error["message"] and "32" in error["message"]  # asked for, and the limit
    many = _error(http.post("/v1/completions", json={"prompt": ["a"] * 33, "max_tokens": 2}), 400)
    assert many["param"] == "prompt"


# --------------------------------------------------------------------------- schema and key


def test_openapi_publishes_request_bodies_errors_and_content_types(http):
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    bodies = {
        "/v1/completions": "CompletionRequest",
        "/v1/chat/completions": "ChatRequest",
        "/tokenize": "TokenizeRequest",
        "/detokenize": "DetokenizeRequest",
    }
    for path, model in bodies.items():
        op = schema["paths"][path]["post"]
        content = op["requestBody"]["content"]["application/json"]["schema"]
        assert content == {"$ref": f"#/components/schemas/{model}"}
        assert model in components
        for status in ("400", "401", "404", "413", "503"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "prompt" in components["CompletionRequest"]["required"]
    assert "messages" in components["ChatRequest"]["properties"]
    assert set(components["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "text/event-stream" in responses["200"]["content"]
        assert "429" in responses
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/v1/models", "/nothing"])
def test_every_path_but_health_and_metrics_needs_the_key(server, path):
    r = httpx.get(f"{server.url}{path}")
    assert _error(r, 401)["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code in (200, 404)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_models_show_the_model_id_not_the_export_path(http, export):
    r = http.get("/v1/models")
    assert str(export) not in r.text and str(export.parent) not in r.text
    model = r.json()["data"][0]
    assert model["id"] == "tiny-chat" and model.get("root", "tiny-chat") == "tiny-chat"


# --------------------------------------------------------------------------- a failing request


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A model whose embedding of one token is NaN; the victims' prompts and greedy outputs
    never hold that token, so only a request that reads it can fail."""
    tok = make_tokenizer(512)
    torch.manual_seed(3)
    model = Transformer(small_model_config(tok.get_vocab_size(), tie_embeddings=False)).eval()
    prompts = [[10 + i, 40 + 3 * i, 200 + i] for i in range(8)]
    used = set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (60x slower)
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(VICTIM_TOKENS):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            used |= set(ids)
        bad = next(t for t in range(300, model.config.vocab_size) if t not in used)
        model.embed_tokens.weight[bad] = float("nan")
    torch.set_num_threads(threads)
    out = save_export(model, tok, tmp_path_factory.mktemp("poisoned") / "poisoned")
    proc = ServerProcess(out, "--max-batch", "16", "--max-body-bytes", "100000")
    try:
        proc.wait_ready()
        proc.victims, proc.bad_token = prompts, bad
        yield proc
    finally:
        proc.stop()


def _stream_text(client: httpx.Client, path: str, body: dict, started=None) -> tuple[int, str]:
    """(status, the streamed text); an error event inside the stream raises."""
    text = ""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise AssertionError(f"error event in a stream: {event}")
            if started is not None:
                started.set()
            choice = event["choices"][0]
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return r.status_code, text


def test_a_request_whose_output_turns_nan_fails_alone_and_the_gauges_reset(poisoned):
    url = poisoned.url
    bodies = [
        {"prompt": p, "max_tokens": VICTIM_TOKENS, "temperature": 0, "ignore_eos": True}
        for p in poisoned.victims
    ]
    with httpx.Client(base_url=url, timeout=120) as c:
        solo = [_stream_text(c, "/v1/completions", b) for b in bodies]
    assert all(status == 200 for status, _ in solo)

    results: dict[int, tuple] = {}
    started = [threading.Event() for _ in bodies]

    def victim(i):
        with httpx.Client(base_url=url, timeout=120) as c:
            try:
                results[i] = _stream_text(c, "/v1/completions", bodies[i], started[i])
            except AssertionError as e:
                results[i] = (500, str(e))

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    bad = {"prompt": [11, poisoned.bad_token], "max_tokens": 5, "temperature": 1.0, "seed": 0}
    failed = httpx.post(f"{url}/v1/completions", json=bad, timeout=60)
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(bodies))] == solo  # every victim finished, unchanged
    for gauge in ("pretrain_requests_running", "pretrain_requests_waiting"):
        assert metric(url, gauge) == 0
    assert metric(url, "pretrain_kv_slots_in_use") == 0
    assert metric(url, 'pretrain_request_finish_total{reason="error"}') == 1
    error = _error(failed, 500)
    assert error["type"] == "server_error" and "not finite" in error["message"]


def test_the_body_limit_is_configurable(poisoned):
    r = httpx.post(f"{poisoned.url}/v1/completions", json={"prompt": "a" * 200_000})
    assert "100000" in _error(r, 413)["message"]
    r = httpx.post(f"{poisoned.url}/v1/completions", json={"prompt": "x " * 500, "max_tokens": 1})
    assert _error(r, 400)["code"] == "context_length_exceeded"  # under the limit: read and checked


def test_after_draining_the_process_exits_promptly(poisoned):
    """SIGTERM during a stream: the stream finishes, then the process is gone within a second
    or so (the interpreter's teardown of torch and the web stack used to add about 5 s)."""
    body = {"prompt": poisoned.victims[0], "max_tokens": VICTIM_TOKENS, "temperature": 0}
    body["ignore_eos"] = True
    started, done = threading.Event(), {}

    def stream():
        with httpx.Client(base_url=poisoned.url, timeout=60) as c:
            done["result"] = _stream_text(c, "/v1/completions", body, started)
            done["at"] = time.monotonic()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    poisoned.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert done["result"][0] == 200
    assert poisoned.proc.wait(timeout=30) == 0
    lag = time.monotonic() - done["at"]
    assert lag < 1.5, f"the process exited {lag:.1f}s after the last answer"


# --------------------------------------------------------------------------- all at once

HEALTH_POLLER = """
import json, select, sys, time
import httpx
latencies = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as c:
    c.get("/health")
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        t0 = time.perf_counter()
        status = c.get("/health").status_code
        latencies.append((time.perf_counter() - t0, status))
print(json.dumps(latencies), flush=True)
"""


def test_poisonous_requests_never_disturb_8_streaming_clients(server):
    """While 8 clients stream (greedy and seeded, completions and chat), one client sends
    temperature 1e-300 and NaN, a 16 MB body, a 3 MB prompt, seed 2**64 and lone surrogates.
    Every stream ends with 200 and its solo text; /health (polled by another process, so this
    process's threads cannot delay it) answers within 100 ms throughout (within 1 s when the
    machine has more runnable processes than cores, and half of them within 100 ms always)."""
    bodies = []
    for i in range(8):
        body = {"max_tokens": 90, "ignore_eos": True, "temperature": 0.0 if i % 2 else 0.9}
        if i % 2 == 0:
            body["seed"] = 700 + i
        if i < 6:
            body["prompt"] = f"victim {i}: " + "abc " * i
            bodies.append(("/v1/completions", body))
        else:
            body["messages"] = [{"role": "user", "content": f"victim {i}"}]
            bodies.append(("/v1/chat/completions", body))
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        solo = [_stream_text(c, path, body) for path, body in bodies]
    assert all(status == 200 for status, _ in solo)

    poller = subprocess.Popen(
        [sys.executable, "-c", HEALTH_POLLER, server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert poller.stdout.readline().strip() == "ready"
        results, ended, started = {}, {}, [threading.Event() for _ in bodies]

        def victim(i):
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
                path, body = bodies[i]
                results[i] = _stream_text(c, path, body, started[i])
                ended[i] = time.monotonic()

        threads = [threading.Thread(target=victim, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        poison = _send_poison(server.url)
        poison_done = time.monotonic()
        for t in threads:
            t.join(120)
        latencies = json.loads(poller.communicate("stop\n", timeout=30)[0])
    finally:
        if poller.poll() is None:
            poller.kill()

    assert poison == [200, 400, 413, 400, 400, 400, 400], poison
    assert poison_done < min(ended.values()), "the streams ended before the poison was sent"
    assert [results[i] for i in range(len(bodies))] == solo
    assert len(latencies) > 20 and all(status == 200 for _, status in latencies)
    times = sorted(t for t, _ in latencies)
    worst, median = times[-1], times[len(times) // 2]
    print(f"/health: {len(times)} polls, median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    # On a machine with more runnable processes than cores, the scheduler alone delays a
    # process by 100-400 ms now and then (measured here with the 8 streams and no poison at
    # all); then a stall of one second is what would show a blocked event loop (a 16 MB body
    # used to block it for 43 s, a 3 MB prompt for seconds).
    busy = os.getloadavg()[0] / (os.cpu_count() or 1) > 1.5
    bound = 1.0 if busy else 0.1
    assert median < 0.1, f"/health median {median * 1000:.0f} ms"
    assert worst < bound, f"/health took {worst * 1000:.0f} ms (bound {bound * 1000:.0f} ms)"


def _send_poison(url: str) -> list[int]:
    statuses = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        raw = {"Content-Type": "application/json"}
        tiny = {"prompt": "a", "temperature": 1e-300, "max_tokens": 4}
        statuses.append(c.post("/v1/completions", json=tiny).status_code)
        nan = b'{"prompt": "a", "temperature": NaN, "max_tokens": 4}'
        statuses.append(c.post("/v1/completions", content=nan, headers=raw).status_code)
        huge = b'{"prompt": "' + b"a" * (16 * 1024 * 1024) + b'"}'
        statuses.append(c.post("/v1/completions", content=huge, headers=raw).status_code)
        long = {"prompt": "lorem ipsum " * 250_000, "max_tokens": 2}
        statuses.append(c.post("/v1/completions", json=long).status_code)
        seed = {"prompt": "a", "seed": 2**64, "max_tokens": 2}
        statuses.append(c.post("/v1/completions", json=seed).status_code)
        lone = b'{"prompt": "a\\ud800b", "max_tokens": 2}'
        statuses.append(c.post("/v1/completions", content=lone, headers=raw).status_code)
        chat = b'{"messages": [{"role": "user", "content": "\\udc00"}]}'
        statuses.append(c.post("/v1/chat/completions", content=chat, headers=raw).status_code)
    return statuses
