"""Tokenizing documents: batches of texts to flat token ids, in this process or a pool.

Every document gets an end-of-text token appended, and special-token strings inside a document
are encoded as plain text, so only that appended token marks a document boundary.

Long documents are cut here (:func:`split_long_text`), not where they are read: the cut is a
property of the tokenizer (a point where its pre-tokenizer starts a new pre-token anyway, so
the pieces' ids joined are the ids of the whole), and both tokenizer training and encoding use
it to bound the tokenizer's memory.

The worker processes of the pool each hold one tokenizer in :data:`_WORKER`, set by the pool's
initializer: process state of a pool worker, never touched in the parent process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

BATCH_TEXT_CHARS = 1 << 20  # documents are tokenized in batches of about this many characters
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters

_WORKER: tuple | None = None  # (tokenizer, piece limit), in a worker process of the pool


# --- long documents in pieces --------------------------------------------------------------------


def _is_letter_or_number(char: str) -> bool:
    return unicodedata.category(char)[0] in "LN"


def _starts_pretoken(text: str, i: int) -> bool:
    """Whether the byte-level pre-tokenizer always starts a new pre-token at ``text[i]``.

    Its pattern (GPT-2's) matches letters, numbers, other symbols and whitespace in separate
    runs, a space attaching only to the run after it, and nothing in it looks backwards. So
    after a letter or number, a space, a punctuation mark or symbol, or a switch between letters
    and numbers begins a new pre-token whatever came before: text cut there pre-tokenizes, and
    therefore encodes, exactly as the whole.
    """
    prev, cur = unicodedata.category(text[i - 1])[0], unicodedata.category(text[i])[0]
    if prev not in "LN":
        return False
    return text[i] == " " or cur in "PS" or (cur in "LN" and cur != prev)


def _piece_end(text: str, lo: int, hi: int) -> int:
    """The last cut in ``(lo, hi]`` where a pre-token starts (spaces first), else ``hi``.

    ``hi`` itself (a cut inside a pre-token) is the fallback only for a run of ``hi - lo``
    characters without any boundary, which no natural text has.
    """
    i = hi + 1
    while (i := text.rfind(" ", lo + 1, i)) > lo:
        if _is_letter_or_number(text[i - 1]):
            return i
    for i in range(hi, lo, -1):
        if _starts_pretoken(text, i):
            return i
    return hi


def split_long_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut where a pre-token starts anyway.

    The tokenizer's memory grows with the text it is handed at once (about 200 bytes per
    character of a single 50 MB line), so a long document is trained on and encoded piece by
    piece; cut at pre-token boundaries (:func:`_starts_pretoken`), the pieces' ids joined are
    the ids of the whole. A text of at most ``limit`` characters is returned as it is, so the
    tokens of ordinary documents never depend on this.
    """
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        end = _piece_end(text, start + limit // 2, start + limit)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def piece_limit(tokenizer_json: str) -> int | None:
    """:data:`PIECE_CHARS` for a tokenizer that long documents may be split for, else None.

    That is a byte-level BPE that pre-tokenizes with GPT-2's pattern, without a normalizer or
    a prefix space, and whose added tokens are all special (they are encoded as plain text):
    what ``pretrain prepare`` trains. Another tokenizer gets its documents whole.
    """
    spec = json.loads(tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    ok = (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and pre.get("add_prefix_space") is False
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )
    return PIECE_CHARS if ok else None


# --- encoding ------------------------------------------------------------------------------------


def _make_encoder(tokenizer_json: str) -> Tokenizer:
    """A tokenizer that encodes special-token strings inside documents as plain text.

    Only the end-of-text token the writer appends may mark a document boundary, so a document
    that happens to contain ``<|endoftext|>`` is tokenized like any other text.
    """
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def _encode_documents(
    tokenizer, texts: list[str], eos_id: int, dtype, limit: int | None = None
) -> tuple[np.ndarray, list]:
    """All documents' ids with an EOS after each, as one flat array, and each document's length.

    With a ``limit``, documents longer than it are encoded in pieces (:func:`split_long_text`),
    and the tokenizer is handed at most about :data:`BATCH_TEXT_CHARS` characters at once.
    """
    pieces: list[str] = []
    owners: list[int] = []
    for doc, text in enumerate(texts):
        parts = [text] if limit is None else split_long_text(text, limit)
        pieces += parts
        owners += [doc] * len(parts)
    ids: list[np.ndarray] = []
    for group in text_batches(pieces, BATCH_TEXT_CHARS if limit is not None else 1 << 62):
        for e in tokenizer.encode_batch_fast(group, add_special_tokens=False):
            ids.append(np.asarray(e.ids, dtype=dtype))
    return _join_with_eos(len(texts), owners, ids, eos_id, dtype)


def _join_with_eos(
    num_docs: int, owners: list[int], ids: list[np.ndarray], eos_id: int, dtype
) -> tuple[np.ndarray, list]:
    """Concatenate the pieces' ids, an EOS after each document's last piece; and the lengths."""
    lengths = [1] * num_docs  # the EOS
    for doc, piece_ids in zip(owners, ids):
        lengths[doc] += len(piece_ids)
    flat = np.empty(sum(lengths), dtype=dtype)
    pos = 0
    for i, (doc, piece_ids) in enumerate(zip(owners, ids)):
        flat[pos : pos + len(piece_ids)] = piece_ids
        pos += len(piece_ids)
        if i + 1 == len(owners) or owners[i + 1] != doc:
            flat[pos] = eos_id
            pos += 1
    return flat, lengths


def text_batches(texts: Iterable[str], max_chars: int = BATCH_TEXT_CHARS) -> Iterator[list[str]]:
    """Consecutive texts grouped into lists of about ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# --- the pool ------------------------------------------------------------------------------------


def _init_worker(tokenizer_json: str) -> None:
    """The pool's initializer: this worker process's tokenizer, made once."""
    global _WORKER
    _WORKER = (_make_encoder(tokenizer_json), piece_limit(tokenizer_json))


def _encode_in_worker(texts: list[str], eos_id: int, dtype) -> tuple[np.ndarray, list]:
    tokenizer, limit = _WORKER
    return _encode_documents(tokenizer, texts, eos_id, dtype, limit)


def default_num_proc() -> int:
    """One tokenizer process per available core (at most 32)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(32, cores or 1))


def tokenize_batches(
    tokenizer_json: str, batches: Iterable[list[str]], eos_id: int, dtype, num_proc: int
) -> Iterator[tuple[list[str], np.ndarray, list]]:
    """Yield ``(texts, flat ids, lengths)`` per batch, in input order.

    With ``num_proc == 1`` the tokenizer's own thread pool uses every core; with more, that many
    single-threaded worker processes take batches, at most two each in flight (so a streamed
    corpus is never read far ahead of the writer). The processes are faster (scripts/bench_data.py):
    the thread pool waits for the longest document of every batch.
    """
    if num_proc == 1:
        tokenizer, limit = _make_encoder(tokenizer_json), piece_limit(tokenizer_json)
        for texts in batches:
            yield (texts, *_encode_documents(tokenizer, texts, eos_id, dtype, limit))
        return
    with _start_pool(tokenizer_json, num_proc) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append((texts, pool.apply_async(_encode_in_worker, (texts, eos_id, dtype))))
            if len(pending) >= 2 * num_proc:
                texts, result = pending.popleft()
                yield (texts, *result.get())
        while pending:
            texts, result = pending.popleft()
            yield (texts, *result.get())


def _start_pool(tokenizer_json: str, num_proc: int):
    """``num_proc`` worker processes, each with one single-threaded tokenizer."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    try:
        return multiprocessing.get_context().Pool(
            num_proc, initializer=_init_worker, initargs=(tokenizer_json,)
        )
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
