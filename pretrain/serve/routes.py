"""The HTTP routes: one module-level handler per endpoint, and the error answers.

Every API call shares one prologue, the :func:`prepared` dependency: refuse while loading or
draining, read the body within the size limit, then parse, check the model name and tokenize on
a worker thread (:mod:`pretrain.serve.openai`). The API key is checked before any of this, for
every path, by the middleware in :mod:`pretrain.serve.server`. Request bodies are read by the
handlers, not by FastAPI, so each route declares its body for the OpenAPI document itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pretrain.serve import openai
from pretrain.serve.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    body_too_large,
    from_validation_errors,
)
from pretrain.serve.metrics import CONTENT_TYPE
from pretrain.serve.state import Generation, ServerState

log = logging.getLogger("pretrain.serve")

router = APIRouter()


# --------------------------------------------------------------------------- the prologue


async def _state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_state)]


async def _ready(state: State) -> ServerState:
    state.require_ready()
    return state


Ready = Annotated[ServerState, Depends(_ready)]


def prepared(prepare: Callable[[ServerState, bytes], Any]) -> Any:
    """A dependency giving ``prepare(state, body)``, run on a worker thread once the server is
    ready and the body is read, so a large request never holds up the event loop."""

    async def dependency(request: Request, state: Ready) -> Any:
        raw = await read_body(request, state.max_body_bytes)
        return await asyncio.to_thread(prepare, state, raw)

    return Depends(dependency)


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


def openapi_schema(app: FastAPI) -> dict:
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


# --------------------------------------------------------------------------- endpoints


def _post(path: str, body: type, *errors: int, streams: bool = False):
    """``router.post`` with the request body and the answers declared for the OpenAPI document."""
    responses = {**(_JSON_OR_STREAM if streams else {}), **_errors(*errors)}
    return router.post(path, openapi_extra=_json_body(body), responses=responses)


@router.get("/health", responses=_errors(503))
async def health(state: State):
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State):
    body = state.metrics.render() if state.metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/v1/models", responses=_errors(401, 503))
async def models(state: Ready):
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


@_post("/tokenize", TokenizeRequest, 400, 401, 404, 413, 503)
async def tokenize(answer: Annotated[dict, prepared(openai.tokenize)]):
    return answer


@_post("/detokenize", DetokenizeRequest, 400, 401, 404, 413, 503)
async def detokenize(answer: Annotated[dict, prepared(openai.detokenize)]):
    return answer


CompletionWork = Annotated[openai.Prepared, prepared(openai.prepare_completion)]
ChatWork = Annotated[openai.Prepared, prepared(openai.prepare_chat)]


@_post("/v1/completions", CompletionRequest, 400, 401, 404, 413, 429, 503, streams=True)
async def completions(request: Request, state: State, prep: CompletionWork):
    stream, respond = openai.completion_stream, openai.completion_response
    return await _generate(request, state, prep, "cmpl", stream, respond)


@_post("/v1/chat/completions", ChatRequest, 400, 401, 404, 413, 429, 503, streams=True)
async def chat_completions(request: Request, state: State, prep: ChatWork):
    stream, respond = openai.chat_stream, openai.chat_response
    return await _generate(request, state, prep, "chatcmpl", stream, respond)


async def _generate(
    request: Request,
    state: ServerState,
    prep: openai.Prepared,
    prefix: str,
    stream: Callable[..., AsyncIterator[bytes]],
    respond: Callable[..., dict],
):
    """Submit the prepared requests; stream the outputs or answer once they are all done."""
    gen = Generation(state, prep.specs, prep.req.n)
    meta = openai.response_meta(prefix, state)
    if prep.req.stream:
        return _event_stream(stream(state, gen, prep, meta))
    return respond(state, prep, await gen.collect(request), meta)


def _event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --------------------------------------------------------------------------- error answers


async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    err = from_validation_errors(list(exc.errors()))
    return JSONResponse(err.body(), status_code=400)


async def _http_error(request: Request, exc: HTTPException):
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code)
    err = APIError(exc.status_code, str(exc.detail), type=kind or "invalid_request_error")
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error")
    err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


# Every error is answered in OpenAI's shape, FastAPI's and Starlette's own included.
EXCEPTION_HANDLERS = {
    APIError: _api_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
