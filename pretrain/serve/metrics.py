"""Prometheus metrics of the server, in a registry of its own (several servers per process work).

Names follow Prometheus conventions with a ``pretrain_`` prefix; latencies are in seconds.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series only add noise to every scrape

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, slots: int = 0):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pretrain_requests", "API requests answered, by HTTP status", ["status"], registry=r
        )
        self.finished = Counter(
            "pretrain_request_finish",
            "Generated sequences ended, by finish reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pretrain_prompt_tokens", "Prompt tokens read (prefilled)", registry=r
        )
        self.generation_tokens = Counter(
            "pretrain_generation_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "pretrain_time_to_first_token_seconds",
            "From arrival at the engine to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pretrain_inter_token_latency_seconds",
            "Between consecutive generated tokens of a sequence",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pretrain_e2e_request_latency_seconds",
            "From arrival at the engine to the last token of a sequence",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("pretrain_requests_running", "Sequences in the batch", registry=r)
        self.waiting = Gauge("pretrain_requests_waiting", "Sequences queued", registry=r)
        self.slots_in_use = Gauge(
            "pretrain_kv_slots_in_use", "KV cache slots held by sequences", registry=r
        )
        self.slots_total = Gauge("pretrain_kv_slots", "KV cache slots in all", registry=r)
        self.slots_total.set(slots)

    # Called from the engine thread; prometheus_client's metrics are thread-safe.

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finished(self, request, reason: str) -> None:
        self.finished.labels(reason=reason).inc()
        self.prompt_tokens.inc(request.num_cached_prompt)
        self.generation_tokens.inc(len(request.output_ids))
        self.e2e.observe(time.perf_counter() - request.arrival)

    def set_load(self, *, running: int, waiting: int, slots_in_use: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_in_use.set(slots_in_use)

    def render(self) -> bytes:
        return generate_latest(self.registry)
