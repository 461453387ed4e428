"""The inference engine: a slotted KV cache and continuous batching on a thread of its own.

Each step (one iteration of the engine thread):

1. cancelled requests leave and free their cache slot; waiting requests take free slots;
2. every request that has its prompt in the cache decodes one token, all in one batched forward;
3. prompts still being read are prefilled in fixed chunks of ``prefill_chunk`` tokens while the
   step's token budget lasts, so one long prompt cannot stall the requests already decoding.

Finished requests leave at once. Results go to each request's ``emit`` callback, called on the
engine thread; the HTTP server hands them to its event loop from there.

A failure belongs to the request that caused it: a request whose logits are not finite, whose
sampling or output raises, or whose prefill fails finishes with ``"error"`` and the others go on.
A batched decode forward that raises is retried one request at a time, so only a request that
fails alone is failed. Every request that leaves updates the load gauges.

Batch invariance: a greedy or seeded request yields the same tokens alone or among any number of
others. A row's numbers must therefore not depend on the batch it shares. Prefill runs one
request at a time in chunks whose boundaries depend only on that request; decode runs its linear
layers on a batch padded to a size whose per-row results were checked at start-up to be bitwise
those of the largest batch (BLAS kernels change with the number of rows: on CPU one row takes a
different path than four), the output projection row by row (:class:`~pretrain.model.RowwiseHead`,
on CPU), attention over each row's own slot and length, and sampling with each request's own
generator.

Prefill and decode are both the model's own forward (:class:`~pretrain.model.Transformer`), with
a view of the cache as its ``cache``: the architecture is written once, in :mod:`pretrain.model`.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.decode_attention import decode_attention
from pretrain.model import RowwiseHead, fuse_projections, product_weights
from pretrain.sampling import GREEDY_BELOW, check_settings, sample_next_token
from pretrain.serve.text import IncrementalDetokenizer, StopStringFilter

log = logging.getLogger("pretrain.serve")


class QueueFull(Exception):
    """More requests than running slots plus queue places: the caller should retry later."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new requests."""


class NeverFits(Exception):
    """More requests at once than running slots plus queue places: retrying cannot help."""


@dataclass
class SamplingParams:
    """What one request asked for; validated by the HTTP layer before it gets here."""

    max_tokens: int = 16  # 0: read the prompt and end, sampling nothing (scoring)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token and the top k
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens too (echo)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k likeliest (id, logprob), most likely first


@dataclass
class StepOutput:
    """What one step added to a request: tokens, their text, and whether it is over."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only, when asked
    error: str | None = None


_ids = itertools.count()


class Request:
    """One sequence being generated; owned by the engine thread once submitted."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[Request, StepOutput], None],
        tokenizer,
        eos_ids: list[int],
        device: torch.device | str = "cpu",
    ):
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        check_settings(params.temperature, params.top_p, params.top_k)
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.output_ids: list[int] = []
        self.slot: int | None = None
        self.num_cached = 0  # tokens whose keys/values are in the cache
        self.cancelled = False
        self.finished = False
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.generator = torch.Generator(device=device)  # where the logits are sampled
        self.generator.manual_seed(params.seed if params.seed is not None else _random_seed())
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_filter = StopStringFilter(params.stop)
        self.prompt_logprobs: list[TokenLogprob | None] = [None]

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= len(self.prompt_ids)

    @property
    def num_cached_prompt(self) -> int:
        """Prompt tokens already prefilled."""
        return min(self.num_cached, len(self.prompt_ids))

    @property
    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - 1


def _random_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class KVCache:
    """Keys and values of every layer for ``slots`` sequences of up to ``max_len`` tokens.

    Shape (layers, slots + 1, kv_heads, max_len, head_dim), allocated once. The extra last slot
    is scratch: padding rows of a decode batch write there and nobody reads it.
    """

    def __init__(self, n_layers, slots, kv_heads, max_len, head_dim, *, dtype, device):
        shape = (n_layers, slots + 1, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = slots

    def prefill_view(self, slot: int, start: int) -> _PrefillView:
        return _PrefillView(self, slot, start)

    def decode_view(self, slots: torch.Tensor, positions: torch.Tensor) -> _DecodeView:
        return _DecodeView(self, slots, positions)


class _PrefillView:
    """The cache as the model's ``forward(cache=...)`` sees it while reading one prompt chunk."""

    def __init__(self, cache: KVCache, slot: int, start: int):
        self.cache, self.slot, self.start = cache, slot, start

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        end = self.start + k.shape[2]
        self.cache.k[layer_idx, self.slot, :, self.start : end] = k[0]
        self.cache.v[layer_idx, self.slot, :, self.start : end] = v[0]
        return (
            self.cache.k[layer_idx, self.slot, :, :end][None],
            self.cache.v[layer_idx, self.slot, :, :end][None],
        )


class _DecodeView:
    """The cache as the model's ``forward(cache=...)`` sees it in a decode step: one new token per
    row, row b at slot ``slots[b]`` and position ``positions[b]``.

    It owns the attention call: each row attends to its own slot up to its own length
    (kernels.decode_attention), which no causal mask over a shared length can express.
    """

    def __init__(self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor):
        self.cache, self.slots, self.positions = cache, slots, positions
        self.lengths = positions + 1

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, 1, D) at (slots[b], :, positions[b]); return the layer's cache."""
        self.cache.k[layer_idx][self.slots, :, self.positions] = k[:, :, 0]
        self.cache.v[layer_idx][self.slots, :, self.positions] = v[:, :, 0]
        return self.cache.k[layer_idx], self.cache.v[layer_idx]  # (slots + 1, Hkv, max_len, D)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Row b's query (B, H, 1, D) against the first lengths[b] keys of its slot."""
        return decode_attention(q[:, :, 0], k, v, self.slots, self.lengths)[:, :, None]


def invariant_batch_sizes(weights: list[torch.Tensor], max_batch: int) -> list[int]:
    """Decode batch sizes whose per-row results equal those of ``max_batch`` rows, bitwise.

    Every distinct weight shape of the decode step is multiplied with the same random rows at
    each candidate size (powers of two below max_batch); a size is kept only if every row of it
    is bitwise the same as at max_batch. BLAS picks its kernel by shape, not by values, so this
    settles which sizes may share one padded decode batch without changing anyone's tokens.
    """
    by_shape = {tuple(w.shape): w for w in weights}
    keep = {1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (_, in_features), w in by_shape.items():
            x = torch.randn(max_batch, 1, in_features, generator=gen).to(w.device, w.dtype)
            full = torch.nn.functional.linear(x, w)
            for size in list(keep):
                if not torch.equal(torch.nn.functional.linear(x[:size], w), full[:size]):
                    keep.discard(size)
    return sorted(keep) + [max_batch]


class Engine:
    """Owns the model and the cache; runs steps on its own thread.

    The engine takes the model over and prepares it for inference, in place: eval mode and fused
    projections (:func:`~pretrain.model.fuse_projections`); it must not be trained afterwards.
    ``submit`` and ``cancel`` may be called from any thread. ``max_batch`` requests run at once
    (one cache slot each), ``max_queue`` more may wait; beyond that ``submit`` raises QueueFull.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_ids: list[int],
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        step_tokens: int = 256,
        metrics=None,
    ):
        self.model = fuse_projections(model)
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.config = model.config
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.step_tokens = max(step_tokens, prefill_chunk)
        self.metrics = metrics
        self.max_len = self.config.max_seq_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.config
        self.cache = KVCache(
            cfg.n_layers,
            max_batch,
            cfg.n_kv_heads,
            self.max_len,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.head = RowwiseHead.if_exact(model.lm_head.weight, max_batch)
        decode_weights = product_weights(model, head=self.head is None)
        self.batch_sizes = invariant_batch_sizes(decode_weights, max_batch)
        self.free_slots = list(range(max_batch))
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ thread-safe interface

    def make_request(self, prompt_ids, params: SamplingParams, emit) -> Request:
        return Request(prompt_ids, params, emit, self.tokenizer, self.eos_ids, self.device)

    @property
    def capacity(self) -> int:
        """Requests the engine can hold at once: running slots plus queue places."""
        return self.max_batch + self.max_queue

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none); QueueFull when the queue cannot take them all now,
        NeverFits when it never could."""
        if len(requests) > self.capacity:
            raise NeverFits(f"{len(requests)} requests; at most {self.capacity} fit")
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            free = self.max_batch + self.max_queue - len(self.running) - len(self.waiting)
            if len(requests) > free:
                raise QueueFull(f"{len(self.running)} running and {len(self.waiting)} waiting")
            self.waiting.extend(requests)
            self._lock.notify()
        self._update_gauges()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed within one step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    def close(self) -> None:
        """Take no new requests; those already in run to the end (draining)."""
        with self._lock:
            self._closed = True

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self.running and not self.waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and not self.running and not self.waiting:
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a bug outside any one request's work: nobody can go on
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {e}")
            finally:
                self._update_gauges()

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = [r for r in self.running if r.prefilled]
        if decoding:
            self._decode(decoding)
        budget = self.step_tokens - len(decoding)
        for request in [r for r in self.running if not r.prefilled]:
            while not request.prefilled and not request.finished:
                chunk = min(self.prefill_chunk, len(request.prompt_ids) - request.num_cached)
                if chunk > budget and budget < self.step_tokens - len(decoding):
                    break  # the budget is spent; at least one chunk runs every step
                if request.cancelled:
                    break
                try:
                    self._prefill_chunk(request, chunk)
                except Exception as e:
                    self._fail(request, e)
                    break
                budget -= chunk
        self._drop_cancelled()
        self._update_gauges()

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and self.free_slots:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._finish(request, "abort", flush=False)
                    continue
                request.slot = self.free_slots.pop(0)
                self.running.append(request)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "abort", flush=False)
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                self.waiting.remove(request)
        for request in gone:
            self._finish(request, "abort", flush=False)

    def _prefill_chunk(self, request: Request, chunk: int) -> None:
        start = request.num_cached
        ids = torch.tensor([request.prompt_ids[start : start + chunk]], device=self.device)
        positions = torch.arange(start, start + chunk, device=self.device)
        logits = self.model(
            ids, positions=positions, cache=self.cache.prefill_view(request.slot, start)
        )
        request.num_cached += chunk
        if request.params.prompt_logprobs:
            # Position i predicts prompt token i + 1; the last one predicts the first output.
            targets = request.prompt_ids[start + 1 : start + chunk + 1]
            logprobs = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)
            request.prompt_logprobs += _token_logprobs(
                logprobs, targets, request.params.logprobs or 0
            )
        if request.prefilled:
            if request.params.max_tokens == 0:
                self._finish_scored(request)
            else:
                self._sample([request], logits[:, -1])

    def _finish_scored(self, request: Request) -> None:
        """End a request that asked for no tokens (scoring a prompt, echo with max_tokens 0) once
        its prompt is read: nothing is sampled, the prompt's log-probabilities are its output."""
        out = StepOutput([], "", [])
        if request.params.prompt_logprobs:
            scored = request.prompt_logprobs[1:]
            if not all(math.isfinite(e.logprob) for e in scored):
                self._fail(request, "the model's output for this prompt is not finite (NaN or inf)")
                return
            out.prompt_logprobs = request.prompt_logprobs
        self._finish(request, "length", last=out)

    def _decode(self, requests: list[Request]) -> None:
        try:
            logits = self._decode_logits(requests)
        except Exception:
            # Which row made the batch fail is unknown: each request runs alone, and only one
            # that fails alone is failed (an invariant batch size gives the same numbers).
            log.exception("batched decode failed; decoding each request alone")
            for request in requests:
                try:
                    logits = self._decode_logits([request])
                except Exception as e:
                    self._fail(request, e)
                else:
                    self._sample([request], logits)
            return
        self._sample(requests, logits)

    def _decode_logits(self, requests: list[Request]) -> torch.Tensor:
        n = len(requests)
        size = self.decode_batch_size(n)
        scratch = self.cache.scratch
        tokens = torch.zeros(size, dtype=torch.long)
        positions = torch.zeros(size, dtype=torch.long)
        slots = torch.full((size,), scratch, dtype=torch.long)
        for i, r in enumerate(requests):
            tokens[i] = r.output_ids[-1]
            positions[i] = r.next_position
            slots[i] = r.slot
        return self.decode_forward(
            tokens.to(self.device), positions.to(self.device), slots.to(self.device), rows=n
        )

    def decode_batch_size(self, n: int) -> int:
        """Rows of the padded decode batch for n requests: the smallest invariant size >= n."""
        return next(b for b in self.batch_sizes if b >= n)

    def decode_forward(self, tokens, positions, slots, rows: int | None = None) -> torch.Tensor:
        """Logits (rows, vocab) for one new token per row, each at its own position and slot.

        The model's forward over a decode view of the cache, whose attention reads each row's
        slot up to the row's length; the head runs on the first ``rows`` rows only (the others
        are padding), row by row where that is exact.
        """
        project = self.model.lm_head if self.head is None else self.head
        logits = self.model(
            tokens[:, None],
            positions=positions[:, None],
            cache=self.cache.decode_view(slots, positions),
            head=lambda h: project(h[:rows]),  # (rows, 1, d_model): padding rows need no logits
        )
        return logits[:, 0]

    # ------------------------------------------------------------------ sampling and output

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> None:
        """One token for each request from its row of ``logits``; a row that cannot be sampled
        fails its own request only."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        keep = []
        for i, (request, ok) in enumerate(zip(requests, finite)):
            if ok:
                keep.append(i)
            else:
                self._fail(
                    request, "the model's output for this request is not finite (NaN or inf)"
                )
        if len(keep) < len(requests):
            requests, logits = [requests[i] for i in keep], logits[keep]
        if not requests:
            return
        tokens = self._draw(requests, logits)
        p = [r.params for r in requests]
        want_logprobs = [
            i
            for i, (r, t) in enumerate(zip(requests, tokens))
            if r.params.logprobs is not None and t is not None
        ]
        logprobs = {}
        if want_logprobs:
            lp = torch.log_softmax(logits[want_logprobs].float(), dim=-1)
            for j, i in enumerate(want_logprobs):
                logprobs[i] = _token_logprobs(lp[j : j + 1], [tokens[i]], p[i].logprobs)[0]
        now = time.perf_counter()
        for i, (request, token) in enumerate(zip(requests, tokens)):
            if token is None:
                continue
            try:
                self._append(request, token, logprobs.get(i), now)
            except Exception as e:
                self._fail(request, e)

    def _draw(self, requests: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Tokens for the rows, all in one call; if that raises, row by row (None: that row
        failed, and its request with it).

        Seeded rows get their generator's state back before the retry, so a row that did draw
        before the failure draws the very same number again.
        """
        seeded = [
            r.generator.get_state()
            if r.params.seed is not None and r.params.temperature >= GREEDY_BELOW
            else None
            for r in requests
        ]
        try:
            return self._sample_rows(requests, logits)
        except Exception:
            log.exception("batched sampling failed; sampling each request alone")
        tokens: list[int | None] = []
        for i, (request, state) in enumerate(zip(requests, seeded)):
            if state is not None:
                request.generator.set_state(state)
            try:
                tokens += self._sample_rows([request], logits[i : i + 1])
            except Exception as e:
                self._fail(request, e)
                tokens.append(None)
        return tokens

    @staticmethod
    def _sample_rows(requests: list[Request], logits: torch.Tensor) -> list[int]:
        p = [r.params for r in requests]
        return sample_next_token(
            logits,
            temperature=[x.temperature for x in p],
            top_p=[x.top_p for x in p],
            top_k=[x.top_k for x in p],
            generator=[r.generator for r in requests],
        ).tolist()

    def _append(self, request: Request, token: int, logprob, now: float) -> None:
        if self.metrics is not None:
            if request.first_token_time is None:
                self.metrics.observe_ttft(now - request.arrival)
            else:
                self.metrics.observe_itl(now - request.last_token_time)
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        request.output_ids.append(token)
        finish = None
        text = ""
        if token in request.stop_ids:
            finish = "stop"
        else:
            text = request.stop_filter.feed(request.detokenizer.push(token))
            if request.stop_filter.stopped:
                finish = "stop"
        if finish is None and len(request.output_ids) >= request.params.max_tokens:
            finish = "length"
        if finish is None and request.next_position + 1 >= self.max_len:
            finish = "length"
        out = StepOutput([token], text, [logprob] if logprob is not None else [])
        if len(request.output_ids) == 1 and request.params.prompt_logprobs:
            out.prompt_logprobs = request.prompt_logprobs
        if finish is None:
            request.emit(request, out)
        else:
            self._finish(request, finish, last=out)

    def _finish(self, request: Request, reason: str, *, last: StepOutput | None = None, flush=True):
        """Free the slot and send the final output (with any text still held back)."""
        if request.finished:
            return
        request.finished = True
        with self._lock:
            if request in self.running:
                self.running.remove(request)
            if request.slot is not None:
                self.free_slots.append(request.slot)
                self.free_slots.sort()
                request.slot = None
        out = last or StepOutput([], "", [])
        if flush and not request.stop_filter.stopped:
            out.text += request.stop_filter.feed(request.detokenizer.flush())
            out.text += request.stop_filter.flush()
        out.finish_reason = reason
        if self.metrics is not None:
            self.metrics.observe_finished(request, reason)
        self._update_gauges()
        request.emit(request, out)

    def _fail(self, request: Request, error: Exception | str) -> None:
        """End one request with an error; the others are not touched."""
        if isinstance(error, Exception):
            log.error("request %d failed", request.id, exc_info=error)
            error = f"internal error while generating: {type(error).__name__}: {error}"
        else:
            log.error("request %d failed: %s", request.id, error)
        self._finish(request, "error", last=StepOutput([], "", [], error=error), flush=False)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            victims = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for request in victims:
            self._finish(request, "error", last=StepOutput([], "", [], error=message), flush=False)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(
                running=len(self.running),
                waiting=len(self.waiting),
                slots_in_use=self.max_batch - len(self.free_slots),
            )

    # ------------------------------------------------------------------ offline use

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Run one request to the end on the calling thread (the engine thread must not run)."""
        request = self.make_request(prompt_ids, params, lambda r, out: None)
        self.submit([request])
        for _ in range(len(prompt_ids) + params.max_tokens + len(self.running) + 1):
            if request.finished:
                return request.output_ids
            self.step()
        raise RuntimeError("generation did not finish within its token budget")


def _token_logprobs(logprobs: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Per row of ``logprobs`` (N, V): the chosen token's log-probability and the top k."""
    out = []
    top_v, top_i = logprobs.topk(k, dim=-1) if k > 0 else (None, None)
    for row, token in enumerate(chosen):
        top = list(zip(top_i[row].tolist(), top_v[row].tolist())) if k > 0 else []
        out.append(TokenLogprob(token, float(logprobs[row, token]), top))
    return out
