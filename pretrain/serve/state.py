"""The server's state and the bridge between the event loop and the engine thread.

:class:`ServerState` holds what every request needs (the loaded export, the engine, the API key,
whether the server is loading or draining) and the checks that use it. :class:`Generation` turns
a set of engine requests into an async stream of their outputs, and cancels what is still
running when its reader leaves.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.chat import ROLES
from pretrain.errors import UserError
from pretrain.serve.api import APIError, now, too_long_error
from pretrain.serve.metrics import Metrics

if TYPE_CHECKING:
    from pretrain.inference import LoadedModel

log = logging.getLogger("pretrain.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def draining_error() -> APIError:
    return APIError(503, "the server is shutting down", type="service_unavailable", code="draining")


def _never_fits(engine, n: int, specs_n: int) -> APIError:
    return APIError(
        400,
        f"this request asks for {n} sequences (prompts x n), more than this server can "
        f"ever hold at once: {engine.max_batch} running plus {engine.max_queue} queued "
        f"= {engine.capacity}; send fewer prompts or a smaller n",
        param="n" if specs_n > 1 else "prompt",
        code="too_many_sequences",
    )


@dataclass
class ServerState:
    """What every request needs: the loaded export, the engine, the key, loading or draining."""

    export_dir: Path
    model_name: str
    api_key: str | None
    engine_options: dict
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 1
    loaded: LoadedModel | None = None
    engine: object | None = None
    load_error: str | None = None
    draining: bool = False
    active: int = 0  # generations whose HTTP answer is not finished
    metrics: Metrics | None = None
    created: int = field(default_factory=now)

    def authorize(self, header: str) -> None:
        """Check an Authorization header against the key (constant time in its content)."""
        if self.api_key is None:
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401,
                "Missing or incorrect API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def require_ready(self) -> None:
        """Refuse (503) while the export loads or after SIGTERM."""
        if self.draining:
            raise draining_error()
        if self.engine is None:
            raise APIError(
                503, "the model is still loading", type="service_unavailable", code="loading"
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    def load(self, on_failure) -> None:
        """Load the export and start the engine (on a thread; /health answers 503 meanwhile)."""
        from pretrain.serve.engine import Engine

        try:
            # Imported here, not with the module, so that the port is bound before torch loads.
            import torch

            from pretrain.inference import load_for_inference

            # Threads that wait on each other are slow when they share cores with the event
            # loop and the client; one core is left to HTTP.
            torch.set_num_threads(self.threads)
            t0 = time.perf_counter()
            loaded = load_for_inference(self.export_dir, self.device, self.dtype)
            self.metrics = Metrics(slots=self.engine_options["max_batch"])
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                eos_ids=loaded.eos_ids,
                metrics=self.metrics,
                **self.engine_options,
            )
            engine.start()
            self.loaded, self.engine = loaded, engine
            log.info(
                "serving %s as '%s' (%d slots, decode batch sizes %s) after %.1fs",
                self.export_dir,
                self.model_name,
                engine.max_batch,
                engine.batch_sizes,
                time.perf_counter() - t0,
            )
        except UserError as e:
            self.load_error = str(e)
            on_failure()
        except Exception as e:  # report anything else the same way, with its type
            log.exception("loading failed")
            self.load_error = f"cannot load {self.export_dir}: {type(e).__name__}: {e}"
            on_failure()

    # ------------------------------------------------------------------ tokens

    def encode(
        self, text: str, what: str = "prompt", room: int = 1, add_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of ``text``; refused unread if it cannot fit with ``room`` tokens to spare.

        ``encode_batch`` lets go of the GIL while it works (``encode`` does not), so the event
        loop runs on while a worker thread tokenizes.
        """
        self.check_length(text, what, room)
        tokenizer = self.loaded.tokenizer
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def check_length(self, text: str, what: str, room: int) -> None:
        """Refuse a text whose fewest possible tokens exceed the context (before tokenizing it)."""
        per_token = self.loaded.max_token_bytes
        if per_token is None:
            return
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
        min_tokens = -(-n_bytes // per_token)
        if min_tokens + room > self.loaded.max_len:
            raise too_long_error(self.loaded.max_len, n_bytes, per_token, min_tokens, what)

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.loaded.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param=param)

    def prompts(self, prompt, room: int = 1) -> list[tuple[str | None, list[int]]]:
        """(text or None, ids) per prompt of a completion request, in order; a text that cannot
        fit with ``room`` tokens to spare is refused unread."""
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                # "" starts a document
                ids = self.encode(item, room=room) or self.loaded.eos_ids[:1]
                out.append((item, ids))
            else:
                if not item:
                    raise APIError(400, "a prompt of token ids must not be empty", param="prompt")
                self.check_ids(item, "prompt")
                out.append((None, list(item)))
        return out

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        if self.loaded.chat_template is None:
            raise APIError(
                400,
                "this model has no chat template (tokenizer_config.json 'chat_template'); "
                "use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        from jinja2.exceptions import TemplateError

        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise APIError(
                    400,
                    f"messages[{i}].role is '{m.role}'; expected one of {sorted(ROLES)}",
                    param=f"messages.{i}.role",
                )
        try:
            return self.loaded.chat_template.render(
                [{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt
            )
        except TemplateError as e:
            raise APIError(400, f"the chat template failed: {e}", param="messages") from None

    def token_text(self, token_id: int) -> str:
        """A token's text; its vocabulary piece when it is only part of a UTF-8 character."""
        tok = self.loaded.tokenizer
        text = tok.decode([token_id], skip_special_tokens=False)
        return tok.id_to_token(token_id) if "\ufffd" in text else text


class Generation:
    """A set of engine requests (prompts x n) answered together; yields their outputs in order
    of arrival. Leaving early (client gone, error) cancels what is still running."""

    def __init__(self, state: ServerState, specs, specs_n: int = 1):
        from pretrain.serve.engine import EngineClosed, NeverFits, QueueFull

        self.state = state
        engine = state.engine
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def emit(request, out):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (request, out))
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        self.requests = [engine.make_request(ids, params, emit) for ids, params in specs]
        self.index = {r.id: i for i, r in enumerate(self.requests)}
        try:
            engine.submit(self.requests)
        except NeverFits:
            raise _never_fits(engine, len(self.requests), specs_n) from None
        except QueueFull:
            raise APIError(
                429,
                "the server is busy (every slot and queue place is taken); retry shortly",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None
        except EngineClosed:
            raise draining_error() from None
        state.active += 1
        self._closed = False

    def cancel(self) -> None:
        for r in self.requests:
            if not r.finished:
                self.state.engine.cancel(r)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.cancel()
            self.state.active -= 1

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        remaining = len(self.requests)
        try:
            while remaining:
                request, out = await self.queue.get()
                if out.finish_reason is not None:
                    remaining -= 1
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", type="server_error")
                yield self.index[request.id], out
        finally:
            self.close()

    async def collect(self, http_request) -> list[dict]:
        """Run to the end (non-streaming); a client that goes away cancels the requests."""

        async def watch_disconnect():
            while True:
                message = await http_request.receive()
                if message["type"] == "http.disconnect":
                    self.cancel()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        results = [
            {"text": "", "ids": [], "logprobs": [], "finish": None, "prompt_logprobs": None}
            for _ in self.requests
        ]
        try:
            async for i, out in self.events():
                r = results[i]
                r["text"] += out.text
                r["ids"] += out.token_ids
                r["logprobs"] += out.logprobs
                if out.prompt_logprobs is not None:
                    r["prompt_logprobs"] = out.prompt_logprobs
                if out.finish_reason is not None:
                    r["finish"] = out.finish_reason
        finally:
            watcher.cancel()
        return results
