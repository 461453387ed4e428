"""``pretrain serve DIR``: an OpenAI-compatible HTTP server for an export.

The server binds at once and answers ``/health`` with 503 while the export loads (checksums,
config against tensors, then weights; safetensors and JSON only, no pickle, no trainer code).
The model runs on the engine thread (:mod:`pretrain.serve.engine`); the event loop only reads
bodies and streams results. Parsing, checking and tokenizing a request run on worker threads,
so one large request cannot hold up ``/health`` or the streams already running. A body over
``--max-body-bytes`` is refused (413) before more than the limit is read, and a prompt that
cannot fit the context is refused by its length in bytes before it is tokenized. SIGTERM
drains: new requests get 503, running ones finish, then the process exits. With ``--api-key``
every path but ``/health`` and ``/metrics`` (``/openapi.json`` included) needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pretrain.errors import UserError
from pretrain.serve.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    body_too_large,
    check_logprobs,
    check_max_tokens,
    check_sampling,
    context_error,
    from_validation_errors,
    new_id,
    now,
    parse,
    sse,
    stop_list,
    too_long_error,
    usage,
)

log = logging.getLogger("pretrain.serve")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")  # the API: answers counted by status
OPEN_PATHS = ("/health", "/metrics")  # the only paths answered without the API key
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """Everything the server needs from an export, read and checked once."""

    model: object
    tokenizer: object
    eos_ids: list[int]
    chat_template: object | None  # a compiled sandboxed jinja template
    max_len: int
    # The most bytes one token can stand for: a text of B bytes has at least B / this many
    # tokens. None when the tokenizer normalizes text first (then no such bound holds).
    max_token_bytes: int | None = None


def compile_chat_template(source: str):
    """Jinja in a sandbox that cannot reach Python internals or change its inputs."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_model(export_dir: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load and verify an export; every problem is a UserError that lists them all."""
    import json

    import torch

    from pretrain.export import TOKENIZER, TOKENIZER_CONFIG
    from pretrain.generate import stop_token_ids
    from pretrain.model import Transformer
    from pretrain.tokenizer import load_tokenizer

    export_dir = Path(export_dir)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"unknown --dtype {dtype!r}; choose from {', '.join(dtypes)}")
    # CPUs run fp32 fastest; on a GPU the export's own dtype is kept unless told otherwise.
    torch_dtype = dtypes[dtype] or (torch.float32 if dev.type == "cpu" else None)
    model = Transformer.from_pretrained(export_dir, device=dev, dtype=torch_dtype)
    tokenizer = load_tokenizer(export_dir / TOKENIZER)
    template = None
    config_path = export_dir / TOKENIZER_CONFIG
    try:
        source = json.loads(config_path.read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} cannot be read: {e}") from None
    if isinstance(source, str) and source.strip():
        from jinja2.exceptions import TemplateError

        try:
            template = compile_chat_template(source)
        except TemplateError as e:
            raise UserError(f"{config_path}: the chat template does not compile: {e}") from None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        eos_ids=stop_token_ids(export_dir),
        chat_template=template,
        max_len=model.config.max_seq_len,
        max_token_bytes=longest_token_bytes(tokenizer),
    )


def longest_token_bytes(tokenizer) -> int | None:
    """The UTF-8 length of the longest vocabulary entry or added token, or None if unbounded.

    Byte-level BPE pieces are written with one printable character per byte, and those
    characters take one or two bytes in UTF-8, so this over-counts: the bound it gives (a text
    of B bytes has at least B / this many tokens) is safe, never refusing a text that fits.
    """
    if tokenizer.normalizer is not None:
        return None  # normalization can shorten a text before it is split
    pieces = list(tokenizer.get_vocab(with_added_tokens=True))
    return max((len(p.encode("utf-8")) for p in pieces), default=1) or 1


# --------------------------------------------------------------------------- server state


@dataclass
class ServerState:
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
    metrics: object = None
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
        if self.draining:
            raise APIError(
                503, "the server is shutting down", type="service_unavailable", code="draining"
            )
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
        from pretrain.serve.metrics import Metrics

        try:
            import torch

            # Threads that wait on each other are slow when they share cores with the event
            # loop and the client; one core is left to HTTP.
            torch.set_num_threads(self.threads)
            t0 = time.perf_counter()
            loaded = load_model(self.export_dir, self.device, self.dtype)
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

    def prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """(text or None, ids) per prompt of a completion request, in order."""
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
                ids = self.encode(item) or self.loaded.eos_ids[:1]  # "" starts a document
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

        roles = {"system", "user", "assistant"}
        for i, m in enumerate(messages):
            if m.role not in roles:
                raise APIError(
                    400,
                    f"messages[{i}].role is '{m.role}'; expected one of {sorted(roles)}",
                    param=f"messages.{i}.role",
                )
        try:
            return self.loaded.chat_template.render(
                messages=[{"role": m.role, "content": m.text()} for m in messages],
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:
            raise APIError(400, f"the chat template failed: {e}", param="messages") from None

    def token_text(self, token_id: int) -> str:
        """A token's text; its vocabulary piece when it is only part of a UTF-8 character."""
        tok = self.loaded.tokenizer
        text = tok.decode([token_id], skip_special_tokens=False)
        return tok.id_to_token(token_id) if "\ufffd" in text else text


# --------------------------------------------------------------------------- generation


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
            n = len(self.requests)
            raise APIError(
                400,
                f"this request asks for {n} sequences (prompts x n), more than this server can "
                f"ever hold at once: {engine.max_batch} running plus {engine.max_queue} queued "
                f"= {engine.capacity}; send fewer prompts or a smaller n",
                param="n" if specs_n > 1 else "prompt",
                code="too_many_sequences",
            ) from None
        except QueueFull:
            raise APIError(
                429,
                "the server is busy (every slot and queue place is taken); retry shortly",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None
        except EngineClosed:
            raise APIError(
                503, "the server is shutting down", type="service_unavailable", code="draining"
            ) from None
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


def _sampling_params(req, max_tokens: int, logprobs, *, choice: int, echo=False):
    from pretrain.serve.engine import SamplingParams

    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        # Each of n choices draws from its own stream, so they differ but each one repeats.
        seed=None if req.seed is None else req.seed + choice,
        stop=stop_list(req.stop),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=echo and logprobs is not None,
    )


def _completion_logprobs(state, entries, offset: int) -> dict:
    """OpenAI's legacy completion logprobs: parallel lists, text offsets into the choice text."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = state.token_text(e.token_id) if e is not None else None
        offsets.append(offset)
        if e is None:  # the first prompt token has nothing before it
            tokens.append(None)
            token_logprobs.append(None)
            top.append(None)
            continue
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({state.token_text(t): lp for t, lp in e.top})
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_logprobs(state, entries) -> dict:
    def item(token_id, logprob):
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes: by its declared
    Content-Length before anything is read, else while reading, never holding more than that."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Prepared:
    """A generation request checked and tokenized (on a worker thread), ready to submit."""

    req: object
    specs: list
    prompt_tokens: int
    echo_texts: list[str] = field(default_factory=list)


def _prepare_completion(state: ServerState, raw: bytes) -> _Prepared:
    req = parse(CompletionRequest, raw)
    state.check_model(req.model)
    check_sampling(req)
    check_max_tokens(req.max_tokens)
    check_logprobs(req.logprobs, "logprobs")
    prompts = state.prompts(req.prompt)
    max_len = state.loaded.max_len
    specs = []
    for _, ids in prompts:
        max_tokens = req.max_tokens if req.max_tokens is not None else max_len - len(ids)
        if len(ids) + max(max_tokens, 1) > max_len:
            raise context_error(max_len, len(ids), max_tokens, "prompt")
        for j in range(req.n):
            params = _sampling_params(req, max_tokens, req.logprobs, choice=j, echo=req.echo)
            specs.append((ids, params))
    echo_texts = [
        text if text is not None else state.loaded.tokenizer.decode(ids) for text, ids in prompts
    ]
    return _Prepared(req, specs, sum(len(ids) for _, ids in prompts), echo_texts)


def _prepare_chat(state: ServerState, raw: bytes) -> _Prepared:
    req = parse(ChatRequest, raw)
    state.check_model(req.model)
    check_sampling(req)
    check_max_tokens(req.max_tokens)
    check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    asked = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    ids = state.encode(state.render_chat(req.messages), "messages")
    max_len = state.loaded.max_len
    max_tokens = asked if asked is not None else max_len - len(ids)
    if len(ids) + max(max_tokens, 1) > max_len:
        raise context_error(max_len, len(ids), max_tokens, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    specs = [(ids, _sampling_params(req, max_tokens, logprobs, choice=j)) for j in range(req.n)]
    return _Prepared(req, specs, len(ids))


def _tokenize(state: ServerState, raw: bytes) -> dict:
    req = parse(TokenizeRequest, raw)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
    if req.messages is not None:
        text, what = state.render_chat(req.messages, req.add_generation_prompt), "messages"
    else:
        text, what = req.prompt, "prompt"
    ids = state.encode(text, what, room=0, add_special_tokens=req.add_special_tokens)
    return {"count": len(ids), "max_model_len": state.loaded.max_len, "tokens": ids}


def _detokenize(state: ServerState, raw: bytes) -> dict:
    req = parse(DetokenizeRequest, raw)
    state.check_model(req.model)
    state.check_ids(req.tokens, "tokens")
    return {"prompt": state.loaded.tokenizer.decode(req.tokens)}


# --------------------------------------------------------------------------- OpenAPI

REQUEST_MODELS = (CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest)

_ERROR_DESCRIPTIONS = {
    400: "a malformed or invalid request (the error's param names the field)",
    401: "a missing or wrong API key",
    404: "an unknown model",
    413: "a request body over the server's limit",
    429: "every slot and queue place is taken; retry after Retry-After seconds",
    503: "the model is still loading, or the server is draining",
}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}


def _json_body(model) -> dict:
    """openapi_extra declaring the request body: the handlers read and check it themselves (a
    size limit, strict parsing and OpenAI-shaped errors), so FastAPI must not."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_JSON_OR_STREAM = {
    200: {
        "description": "the answer; server-sent events (data: {json} ... data: [DONE]) "
        "when the request has stream: true",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    }
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request models the routes declare by reference."""
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in REQUEST_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


# --------------------------------------------------------------------------- app


def build_app(state: ServerState, on_load_failure=lambda: None):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, args=(on_load_failure,), daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="pretrain", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = from_validation_errors(list(exc.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), type=kind or "invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_middleware(_RequireKey, state=state)
    app.add_middleware(_StatusCounter, state=state)  # outermost: counts the 401s too

    async def body(request: Request) -> bytes:
        state.require_ready()
        return await read_body(request, state.max_body_bytes)

    @app.get("/health", responses=_errors(503))
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        from pretrain.serve.metrics import CONTENT_TYPE

        body = state.metrics.render() if state.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=_errors(401, 503))
    async def models():
        state.require_ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "pretrain",
                    "root": state.model_name,
                    "parent": None,
                    "max_model_len": state.loaded.max_len,
                }
            ],
        }

    @app.post(
        "/tokenize",
        openapi_extra=_json_body(TokenizeRequest),
        responses=_errors(400, 401, 404, 413, 503),
    )
    async def tokenize(request: Request):
        return await asyncio.to_thread(_tokenize, state, await body(request))

    @app.post(
        "/detokenize",
        openapi_extra=_json_body(DetokenizeRequest),
        responses=_errors(400, 401, 404, 413, 503),
    )
    async def detokenize(request: Request):
        return await asyncio.to_thread(_detokenize, state, await body(request))

    @app.post(
        "/v1/completions",
        openapi_extra=_json_body(CompletionRequest),
        responses={**_JSON_OR_STREAM, **_errors(400, 401, 404, 413, 429, 503)},
    )
    async def completions(request: Request):
        prep = await asyncio.to_thread(_prepare_completion, state, await body(request))
        req = prep.req
        gen = Generation(state, prep.specs, req.n)
        meta = {"id": new_id("cmpl"), "created": now(), "model": state.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _event_stream(
                _stream_completion(
                    state, gen, req, meta, prep.echo_texts, prep.prompt_tokens, include_usage
                )
            )
        results = await gen.collect(request)
        choices = []
        for i, r in enumerate(results):
            prompt_text = prep.echo_texts[i // req.n]
            text = (prompt_text if req.echo else "") + r["text"]
            logprobs = None
            if req.logprobs is not None:
                entries = (r["prompt_logprobs"] or []) if req.echo else []
                logprobs = _completion_logprobs(state, entries + r["logprobs"], 0)
            choices.append(
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": r["finish"]}
            )
        completion_tokens = sum(len(r["ids"]) for r in results)
        return {
            "object": "text_completion",
            **meta,
            "choices": choices,
            "usage": usage(prep.prompt_tokens, completion_tokens),
        }

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_json_body(ChatRequest),
        responses={**_JSON_OR_STREAM, **_errors(400, 401, 404, 413, 429, 503)},
    )
    async def chat_completions(request: Request):
        prep = await asyncio.to_thread(_prepare_chat, state, await body(request))
        req = prep.req
        gen = Generation(state, prep.specs, req.n)
        meta = {"id": new_id("chatcmpl"), "created": now(), "model": state.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _event_stream(
                _stream_chat(state, gen, req, meta, prep.prompt_tokens, include_usage)
            )
        results = await gen.collect(request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "logprobs": _chat_logprobs(state, r["logprobs"]) if req.logprobs else None,
                "finish_reason": r["finish"],
            }
            for i, r in enumerate(results)
        ]
        return {
            "object": "chat.completion",
            **meta,
            "choices": choices,
            "usage": usage(prep.prompt_tokens, sum(len(r["ids"]) for r in results)),
        }

    def _event_stream(body):
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _stream_completion(state, gen, req, meta, echo_texts, prompt_tokens, include_usage):
    base = {"object": "text_completion", **meta}
    extra = {"usage": None} if include_usage else {}
    completion_tokens = 0
    offsets = [0] * len(gen.requests)
    try:
        if req.echo:
            for i in range(len(gen.requests)):
                text = echo_texts[i // req.n]
                offsets[i] = len(text)
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                yield sse({**base, "choices": [choice], **extra})
        async for i, out in gen.events():
            completion_tokens += len(out.token_ids)
            entries = list(out.logprobs)
            if req.echo and out.prompt_logprobs is not None:
                entries = list(out.prompt_logprobs) + entries
            if not out.text and out.finish_reason is None and not entries:
                continue  # nothing to send yet (half a character, or text held for a stop)
            logprobs = None
            if req.logprobs is not None:
                logprobs = _completion_logprobs(state, entries, offsets[i])
            offsets[i] += len(out.text)
            choice = {
                "index": i,
                "text": out.text,
                "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            }
            yield sse({**base, "choices": [choice], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except APIError as e:
        yield sse(e.body())
    finally:
        gen.close()  # also when the client went away before the first event
    yield sse("[DONE]")


async def _stream_chat(state, gen, req, meta, prompt_tokens, include_usage):
    base = {"object": "chat.completion.chunk", **meta}
    extra = {"usage": None} if include_usage else {}
    completion_tokens = 0
    try:
        for i in range(len(gen.requests)):
            delta = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
            yield sse({**base, "choices": [choice], **extra})
        async for i, out in gen.events():
            completion_tokens += len(out.token_ids)
            if not out.text and out.finish_reason is None and not out.logprobs:
                continue
            delta = {"content": out.text} if out.text or out.finish_reason is None else {}
            choice = {
                "index": i,
                "delta": delta,
                "logprobs": _chat_logprobs(state, out.logprobs) if req.logprobs else None,
                "finish_reason": out.finish_reason,
            }
            yield sse({**base, "choices": [choice], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except APIError as e:
        yield sse(e.body())
    finally:
        gen.close()  # also when the client went away before the first event
    yield sse("[DONE]")


class _RequireKey:
    """ASGI middleware: with an API key set, every path but /health and /metrics needs it.

    In front of the routes, so that the schema, unknown paths and every API route are covered
    alike, and a request without the key is answered before its body is read.
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                self.state.authorize(header)
            except APIError as e:
                response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _StatusCounter:
    """ASGI middleware counting API answers by status (pure ASGI: disconnects pass through)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and self.state.metrics is not None:
                self.state.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# --------------------------------------------------------------------------- process


def _drain_then(state: ServerState, exit_now) -> None:
    """Stop taking requests, wait for the running ones to be answered, then exit."""
    state.draining = True
    if state.engine is not None:
        state.engine.close()
    log.info("SIGTERM: draining %d running request(s) before exiting", state.active)

    def wait():
        while state.active > 0 or (state.engine is not None and not state.engine.idle):
            time.sleep(0.02)
        exit_now()

    threading.Thread(target=wait, daemon=True).start()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", metavar="DIR", help="an export directory (pretrain export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="requests decoded together: KV cache slots (32)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=128, help="requests waiting beyond those; then 429 (128)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PRETRAIN_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PRETRAIN_API_KEY; none: open)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model id in the API (the directory's name)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; a larger one gets 413 ({DEFAULT_MAX_BODY_BYTES} = 4 MiB)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument(
        "--dtype", default="auto", help="auto (fp32 on CPU, the export's on GPU), fp32, bf16, fp16"
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=64, help="prompt tokens read per chunk (64)"
    )
    parser.add_argument(
        "--step-tokens", type=int, default=256, help="tokens processed per engine step (256)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for the model (0: all cores but one, left to the HTTP event loop)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")


def _check_args(args: argparse.Namespace) -> None:
    if args.threads < 0:
        raise UserError("--threads must be >= 0 (0: all cores but one)")
    for name in ("max_batch", "prefill_chunk", "step_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise UserError("--max-queue must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the option out")
    path = Path(args.export)
    if not path.is_dir():
        raise UserError(f"export not found: {path} (write one with pretrain export)")
    _check_address(args.host, args.port)


def _check_address(host: str, port: int) -> None:
    """Fail before loading anything when the address cannot be bound (in use, or not ours)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} does not resolve: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
            ) from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    _check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    export_dir = Path(args.export).resolve()
    state = ServerState(
        export_dir=export_dir,
        model_name=args.served_model_name or export_dir.name,
        api_key=args.api_key,
        engine_options={
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
            "prefill_chunk": args.prefill_chunk,
            "step_tokens": args.step_tokens,
        },
        max_body_bytes=args.max_body_bytes,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads or max(1, (os.cpu_count() or 2) - 1),
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and not state.draining:
                _drain_then(state, lambda: setattr(self, "should_exit", True))
            else:
                super().handle_exit(sig, frame)

    server_box: list = []
    app = build_app(state, on_load_failure=lambda: setattr(server_box[0], "should_exit", True))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    server = Server(config)
    server_box.append(server)
    server.run()
    if state.load_error is not None:
        raise UserError(state.load_error)
    _exit_at_once(0)


def _exit_at_once(code: int) -> None:
    """End the process without the interpreter's teardown.

    Collecting the module graph of torch and the web stack at exit took seconds (the process
    lingered about 5 s after a drain), and there is nothing left for it to do: the engine has
    stopped, the sockets are closed and the logs are flushed here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
