"""OpenAI's API over the engine: requests into engine work, engine outputs into OpenAI's answers.

Preparing a request (parse, check, render the chat, tokenize) runs on a worker thread and gives
a :class:`Prepared` list of engine requests. The answers are shaped here: whole responses, the
two logprob formats (legacy completions: parallel lists with text offsets; chat: per-token
objects with bytes), and one server-sent-event writer for both kinds of stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from pretrain.serve.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_logprobs,
    check_max_tokens,
    check_sampling,
    context_error,
    new_id,
    now,
    parse,
    sse,
    stop_list,
    usage,
)
from pretrain.serve.state import Generation, ServerState

# --------------------------------------------------------------------------- requests


@dataclass
class Prepared:
    """A generation request checked and tokenized (on a worker thread), ready to submit."""

    req: object
    specs: list
    prompt_tokens: int
    echo_texts: list[str] = field(default_factory=list)


# Scoring clients (the legacy OpenAI API's, lm-eval's loglikelihood) send echo, logprobs and
# max_tokens 0 (or 1) and read the prompt's logprobs.
SCORING_HINT = (
    "; max_tokens 0 is only for scoring a prompt: send it with echo true and logprobs, and read "
    "the prompt's token_logprobs"
)


def _parse_generation(state: ServerState, model_cls, raw: bytes):
    """A completion or chat request, parsed and through the checks both kinds share."""
    req = parse(model_cls, raw)
    state.check_model(req.model)
    check_sampling(req)
    return req


def _check_prompts_fit(state: ServerState, req, prompts) -> None:
    """A prompt longer than the context is refused naming both lengths, before max_tokens is
    looked at: a scoring request (echo, max_tokens 0 or 1) learns what to cut, and a bad
    max_tokens is not reported for a prompt that could not be served anyway."""
    max_len = state.loaded.max_len
    for _, ids in prompts:
        if len(ids) > max_len:
            asked = req.max_tokens if req.max_tokens is not None and req.max_tokens > 0 else 0
            raise context_error(max_len, len(ids), asked, "prompt")


def _completion_budget(state: ServerState, asked: int | None, prompt_len: int, what: str) -> int:
    """The tokens to generate: as asked, else up to the end of the context; over it is a 400.

    Only an explicit 0 (scoring) may leave no room for a token: the rest of the context of a
    prompt that fills it is nothing to generate."""
    max_len = state.loaded.max_len
    max_tokens = asked if asked is not None else max_len - prompt_len
    if prompt_len + (0 if asked == 0 else max(max_tokens, 1)) > max_len:
        raise context_error(max_len, prompt_len, max_tokens, what)
    return max_tokens


def _check_completion_max_tokens(req: CompletionRequest) -> None:
    """At least 1, or 0 with echo: the prompt is read and scored, and nothing is generated (as
    OpenAI's legacy completions and vLLM do)."""
    if req.echo:
        if req.max_tokens is not None and req.max_tokens < 0:
            raise APIError(
                400,
                f"max_tokens must be at least 0 with echo, got {req.max_tokens} (0 scores the "
                "prompt without generating)",
                param="max_tokens",
            )
    else:
        check_max_tokens(req.max_tokens, hint=SCORING_HINT if req.max_tokens == 0 else "")


def prepare_completion(state: ServerState, raw: bytes) -> Prepared:
    req = _parse_generation(state, CompletionRequest, raw)
    check_logprobs(req.logprobs, "logprobs")
    scoring = req.echo and req.max_tokens == 0
    prompts = state.prompts(req.prompt, room=0 if scoring else 1)
    _check_prompts_fit(state, req, prompts)
    _check_completion_max_tokens(req)
    specs = []
    for _, ids in prompts:
        max_tokens = _completion_budget(state, req.max_tokens, len(ids), "prompt")
        for j in range(req.n):
            params = _sampling_params(req, max_tokens, req.logprobs, choice=j, echo=req.echo)
            specs.append((ids, params))
    echo_texts = [
        text if text is not None else state.loaded.tokenizer.decode(ids) for text, ids in prompts
    ]
    return Prepared(req, specs, sum(len(ids) for _, ids in prompts), echo_texts)


def prepare_chat(state: ServerState, raw: bytes) -> Prepared:
    req = _parse_generation(state, ChatRequest, raw)
    check_max_tokens(req.max_tokens)
    check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    asked = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    ids = state.encode(state.render_chat(req.messages), "messages")
    max_tokens = _completion_budget(state, asked, len(ids), "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    specs = [(ids, _sampling_params(req, max_tokens, logprobs, choice=j)) for j in range(req.n)]
    return Prepared(req, specs, len(ids))


def tokenize(state: ServerState, raw: bytes) -> dict:
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


def detokenize(state: ServerState, raw: bytes) -> dict:
    req = parse(DetokenizeRequest, raw)
    state.check_model(req.model)
    state.check_ids(req.tokens, "tokens")
    return {"prompt": state.loaded.tokenizer.decode(req.tokens)}


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


# --------------------------------------------------------------------------- answers


def _completion_logprobs(state, entries, offset: int, first_id: int | None = None) -> dict:
    """OpenAI's legacy completion logprobs: parallel lists, text offsets into the choice text.

    An echoed prompt's first entry is None (nothing comes before it to predict it); its token,
    ``first_id``, still takes its place in the text, so the next offset starts after it.
    """
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        offsets.append(offset)
        if e is None:
            tokens.append(None)
            token_logprobs.append(None)
            top.append(None)
            offset += len(state.token_text(first_id)) if first_id is not None else 0
            continue
        text = state.token_text(e.token_id)
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


def response_meta(prefix: str, state: ServerState) -> dict:
    """The fields every answer and stream chunk of one request share."""
    return {"id": new_id(prefix), "created": now(), "model": state.model_name}


def completion_response(
    state: ServerState, prep: Prepared, results: list[dict], meta: dict
) -> dict:
    """The whole answer to a non-streaming ``/v1/completions``."""
    req = prep.req
    choices = []
    for i, r in enumerate(results):
        prompt_text = prep.echo_texts[i // req.n]
        text = (prompt_text if req.echo else "") + r["text"]
        logprobs = None
        if req.logprobs is not None:
            entries = (r["prompt_logprobs"] or []) if req.echo else []
            first_id = prep.specs[i][0][0]
            logprobs = _completion_logprobs(state, entries + r["logprobs"], 0, first_id)
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


def chat_response(state: ServerState, prep: Prepared, results: list[dict], meta: dict) -> dict:
    """The whole answer to a non-streaming ``/v1/chat/completions``."""
    req = prep.req
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


# --------------------------------------------------------------------------- streams


def completion_stream(
    state: ServerState, gen: Generation, prep: Prepared, meta: dict
) -> AsyncIterator[bytes]:
    """``/v1/completions`` with ``stream``: text as it comes; with ``echo``, each choice's first
    chunk starts with its prompt and the prompt's logprobs (as vLLM streams it), which exist only
    once the prompt is read. With ``max_tokens`` 0 that first chunk is also the last."""
    req = prep.req
    offsets = [0] * len(gen.requests)  # where each choice's next text starts, for text_offset
    echo_pending = [req.echo] * len(gen.requests)

    def chunk(i: int, out) -> dict | None:
        text, entries = out.text, list(out.logprobs)
        if echo_pending[i]:
            echo_pending[i] = False
            text = prep.echo_texts[i // req.n] + text
            entries = list(out.prompt_logprobs or []) + entries
        if not text and out.finish_reason is None and not entries:
            return None  # nothing to send yet (half a character, or text held for a stop)
        logprobs = None
        if req.logprobs is not None:
            logprobs = _completion_logprobs(state, entries, offsets[i], prep.specs[i][0][0])
        offsets[i] += len(text)
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}

    base = {"object": "text_completion", **meta}
    return _sse(gen, base, [], chunk, prep.prompt_tokens, _include_usage(req))


def chat_stream(
    state: ServerState, gen: Generation, prep: Prepared, meta: dict
) -> AsyncIterator[bytes]:
    """``/v1/chat/completions`` with ``stream``: the assistant role first, then content deltas."""
    req = prep.req
    opening = [
        {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        for i in range(len(gen.requests))
    ]

    def chunk(i: int, out) -> dict | None:
        if not out.text and out.finish_reason is None and not out.logprobs:
            return None
        delta = {"content": out.text} if out.text or out.finish_reason is None else {}
        return {
            "index": i,
            "delta": delta,
            "logprobs": _chat_logprobs(state, out.logprobs) if req.logprobs else None,
            "finish_reason": out.finish_reason,
        }

    base = {"object": "chat.completion.chunk", **meta}
    return _sse(gen, base, opening, chunk, prep.prompt_tokens, _include_usage(req))


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def _sse(
    gen: Generation,
    base: dict,
    opening: Iterable[dict],
    make_choice: Callable[[int, object], dict | None],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The event stream of one request: ``opening`` choices, one chunk per engine output that
    ``make_choice`` turns into a choice (None: nothing to send), usage if asked, ``[DONE]``.

    An error after the stream has begun cannot change the HTTP status, so it is sent as an
    event in OpenAI's error shape before ``[DONE]``.
    """
    extra = {"usage": None} if include_usage else {}
    completion_tokens = 0
    try:
        for choice in opening:
            yield sse({**base, "choices": [choice], **extra})
        async for i, out in gen.events():
            completion_tokens += len(out.token_ids)
            choice = make_choice(i, out)
            if choice is not None:
                yield sse({**base, "choices": [choice], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except APIError as e:
        yield sse(e.body())
    finally:
        gen.close()  # also when the client went away before the first event
    yield sse("[DONE]")
