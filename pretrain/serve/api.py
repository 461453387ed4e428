"""The OpenAI-compatible wire format: request schemas, their checks, errors and response pieces.

Requests are parsed strictly (a string where a number belongs is an error, not a conversion) and
unknown fields are ignored, as OpenAI's API does. Values no field can use are refused while
parsing, in any field: NaN and infinite numbers (Python's JSON parser accepts ``NaN`` and
``Infinity``) and strings that are not valid Unicode (a lone surrogate such as ``"\\ud800"``).
Every problem becomes an :class:`APIError`, rendered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20
MAX_N = 16
# What torch.Generator.manual_seed takes; with n choices, seed + n - 1 must fit too.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer, inside a stream too."""

    error: ErrorDetail


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


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
    # Left to right with token ids before strings: pydantic's default ("smart") union would
    # first try list[str] on a long list of ids and build one error per id (seconds for 2M).
    prompt: str | list[int] | list[str] | list[list[int]] = Field(union_mode="left_to_right")
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
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_values(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


def check_values(data: Any) -> None:
    """Refuse, in any field, a number that is not finite or a string that is not valid Unicode.

    Both pass JSON parsing, and each would fail far from the request: NaN passes every range
    check (``NaN < 0`` is false) and a lone surrogate cannot be tokenized or encoded as UTF-8.
    The walk is iterative (no recursion limit) and skips lists of plain ints (token-id prompts)
    at C speed.
    """
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                name = field_name(path)
                raise APIError(
                    400, f"'{name}' must be a finite number, got {value}", param=param_path(path)
                )
        elif isinstance(value, str):
            _check_unicode(value, path)
        elif isinstance(value, dict):
            for key in value:
                _check_unicode(key, path)
            stack.extend(((*path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list) and not _SCALARS.issuperset(map(type, value)):
            for i in range(len(value) - 1, -1, -1):
                if isinstance(value[i], (float, str, dict, list)):
                    stack.append(((*path, i), value[i]))


_SCALARS = frozenset({int, bool, type(None)})  # nothing to check in a list of only these


def _check_unicode(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        raise APIError(
            400,
            f"'{field_name(path)}' is not valid Unicode: it holds the lone surrogate {bad} "
            f"at character {e.start}",
            param=param_path(path),
        ) from None


def param_path(path) -> str | None:
    """The ``param`` of an error about a nested value, as ``messages.0.role``."""
    return ".".join(str(p) for p in path) or None


def field_name(path) -> str:
    """A nested value's name for messages, as ``messages[0].role``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def from_validation_errors(errors: list[dict]) -> APIError:
    """One 400 for pydantic's (or FastAPI's) validation errors, naming the first bad field."""
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "missing":
        # Name the missing field itself (messages[0].role), not the list that holds it; a
        # union's member tags (``list[TextPart]``) are not part of the path.
        path = [p for p in loc if isinstance(p, int) or str(p).isidentifier()]
        return APIError(400, f"'{field_name(path)}' is a required field", param=param_path(path))
    # A union reports one error per member; its first location element names the field.
    param = str(loc[0]) if loc else None
    message = f"'{'.'.join(str(p) for p in loc)}': {first.get('msg', 'invalid value')}"
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
    if req.seed is not None and not MIN_SEED <= req.seed <= MAX_SEED - (req.n - 1):
        raise APIError(
            400,
            f"seed must be between -2**63 and 2**64-1 (choice i of n samples with seed + i), "
            f"got {req.seed} with n={req.n}",
            param="seed",
        )
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "stream_options may only be given when stream is true", param="stream_options"
        )


def check_max_tokens(value: int | None, param: str = "max_tokens", hint: str = "") -> None:
    if value is not None and value < 1:
        raise APIError(400, f"{param} must be at least 1, got {value}{hint}", param=param)


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(
            400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param=param
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(pretrain serve --max-body-bytes)",
        code="request_too_large",
        headers={"Connection": "close"},
    )


def too_long_error(
    max_len: int, n_bytes: int, per_token: int, min_tokens: int, what: str
) -> APIError:
    """A text refused before tokenizing: even its fewest possible tokens exceed the context."""
    return APIError(
        400,
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"at least {min_tokens} tokens (the {what} has {n_bytes} bytes, and no token stands for "
        f"more than {per_token} of them). Please reduce the length of the {what}.",
        param="messages" if what == "messages" else "prompt",
        code="context_length_exceeded",
    )


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
