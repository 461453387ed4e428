"""The OpenAI-compatible wire format: request schemas, their checks, errors and response pieces.

Requests are parsed strictly (a string where a number belongs is an error, not a conversion) and
unknown fields are ignored, as OpenAI's API does. Every problem becomes an :class:`APIError`,
rendered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20
MAX_N = 16


class APIError(Exception):
    """An error answer: HTTP status, message, and OpenAI's type/param/code fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a request body; malformed JSON or a bad field is a 400 naming it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


def from_validation_errors(errors: list[dict]) -> APIError:
    """One 400 for pydantic's (or FastAPI's) validation errors, naming the first bad field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A union reports one error per member; its first location element names the field.
    param = loc[0] if loc else None
    kind = first.get("type", "")
    if kind == "missing":
        message = f"'{param}' is a required field"
    else:
        message = f"'{'.'.join(loc)}': {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=param)


def check_sampling(req: _SamplingFields) -> None:
    """Range checks shared by completions and chat (types were checked by the schema)."""
    if req.temperature is not None and req.temperature < 0:
        raise APIError(400, f"temperature must be >= 0, got {req.temperature}", param="temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k must be >= 0 (0 or -1: off), got {req.top_k}", param="top_k")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "stream_options may only be given when stream is true", param="stream_options"
        )


def check_max_tokens(value: int | None, param: str = "max_tokens") -> None:
    if value is not None and value < 1:
        raise APIError(400, f"{param} must be at least 1, got {value}", param=param)


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(
            400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param=param
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def context_error(max_len: int, prompt_tokens: int, max_tokens: int, what: str) -> APIError:
    total = prompt_tokens + max_tokens
    return APIError(
        400,
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{total} tokens ({prompt_tokens} in the {what}, {max_tokens} for the completion). "
        "Please reduce the length of the prompt or of max_tokens.",
        param="messages" if what == "messages" else "prompt",
        code="context_length_exceeded",
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
