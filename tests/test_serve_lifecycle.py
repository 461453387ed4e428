"""The server's life around the requests: health while loading, clients that go away (mid-stream
and mid-prefill) free their slot, a full queue answers 429, an export without a chat template,
and SIGTERM under load drains then exits. One server; the drain test ends it, so it runs last."""

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from serve_helpers import (
    ServerProcess,
    make_tokenizer,
    metric,
    rewrite_checksums,
    small_model_config,
)

from pretrain.export import save_export
from pretrain.model import Transformer

LONG_PROMPT = [(7 * i) % 300 + 10 for i in range(1000)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("lifecycle") / "no-template"
    tok = make_tokenizer(512)
    torch.manual_seed(1)
    save_export(Transformer(small_model_config(tok.get_vocab_size(), max_seq_len=1024)), tok, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    rewrite_checksums(out)
    # One prompt token per step: a 1000-token prompt takes long enough to leave mid-prefill.
    proc = ServerProcess(
        out, "--max-batch", "2", "--max-queue", "2", "--prefill-chunk", "1", "--step-tokens", "1"
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_health_says_loading_before_ready(server):
    assert (503, "loading") in server.health_seen
    assert server.health_seen[-1] == (200, "ok")


def test_chat_without_a_template_is_a_400(server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_client_leaving_mid_prefill_frees_its_slot(server):
    aborted = metric(server.url, 'pretrain_request_finish_total{reason="abort"}')
    prompt_tokens = metric(server.url, "pretrain_prompt_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": LONG_PROMPT, "max_tokens": 5},
            timeout=httpx.Timeout(10, read=0.3),
        )
    assert _wait_for(
        lambda: metric(server.url, 'pretrain_request_finish_total{reason="abort"}') == aborted + 1
    )
    assert metric(server.url, "pretrain_kv_slots_in_use") == 0
    read = metric(server.url, "pretrain_prompt_tokens_total") - prompt_tokens
    assert 0 < read < len(LONG_PROMPT)  # it really was cancelled before its prompt was read


def test_client_leaving_mid_stream_frees_its_slot(server):
    aborted = metric(server.url, 'pretrain_request_finish_total{reason="abort"}')
    generated = metric(server.url, "pretrain_generation_tokens_total")
    body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                break
    assert _wait_for(
        lambda: metric(server.url, 'pretrain_request_finish_total{reason="abort"}') == aborted + 1
    )
    assert metric(server.url, "pretrain_kv_slots_in_use") == 0
    assert metric(server.url, "pretrain_generation_tokens_total") - generated < 1000


def test_a_full_queue_answers_429_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            body = {"prompt": LONG_PROMPT[:300], "max_tokens": 2}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

    answers = asyncio.run(main())
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    assert set(statuses) == {200, 429}
    busy = next(r for r in answers if r.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert _wait_for(lambda: metric(server.url, "pretrain_kv_slots_in_use") == 0)
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200  # and it serves again


def test_sigterm_drains_running_requests_then_exits(server):
    results: dict[int, list] = {}
    started = [threading.Event(), threading.Event()]

    def stream(i):
        body = {"prompt": "b" * (i + 1), "max_tokens": 600, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started[i].set()
        results[i] = events

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    server.proc.send_signal(signal.SIGTERM)
    assert _wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503, 10)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    for t in threads:
        t.join(120)
    for i in range(2):
        events = results[i]
        assert events[-1] == "[DONE]"
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert [f for f in finishes if f] == ["length"]  # finished, not cut off
    assert server.proc.wait(timeout=60) == 0
