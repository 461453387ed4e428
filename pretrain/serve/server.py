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
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pretrain.errors import UserError
from pretrain.serve import routes
from pretrain.serve.api import APIError
from pretrain.serve.state import DEFAULT_MAX_BODY_BYTES, ServerState

log = logging.getLogger("pretrain.serve")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")  # the API: answers counted by status
OPEN_PATHS = ("/health", "/metrics")  # the only paths answered without the API key


def load_model(export_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """The export as the server loads it (:func:`pretrain.inference.load_for_inference`)."""
    from pretrain.inference import load_for_inference  # torch loads after the port is bound

    return load_for_inference(export_dir, device, dtype)


# --------------------------------------------------------------------------- app


def build_app(state: ServerState, on_load_failure=lambda: None) -> FastAPI:
    """The ASGI app: routes, OpenAI-shaped errors, the key check and the status counter.

    The export loads on a thread when the app starts, so the port answers ``/health`` at once.
    """

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, args=(on_load_failure,), daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(
        title="pretrain",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        exception_handlers=routes.EXCEPTION_HANDLERS,
    )
    app.state.server = state
    app.openapi = lambda: routes.openapi_schema(app)
    app.include_router(routes.router)
    app.add_middleware(_RequireKey, state=state)
    app.add_middleware(_StatusCounter, state=state)  # outermost: counts the 401s too
    return app


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
