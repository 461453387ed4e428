"""Supervised fine-tuning data: JSONL rows -> chat-rendered tokens with a loss mask -> packed rows.

A row of the input file is either ``{"prompt": ..., "completion": ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. A prompt/completion
pair is the conversation ``[user: prompt, assistant: completion]``, so a fine-tuned model is
prompted exactly as the server's ``/v1/chat/completions`` prompts it: the chat template rendered
with ``add_generation_prompt``.

Loss falls only on what the assistant says: the content of each assistant turn and its closing
``<|end|>`` (so the model learns to stop). Everything else -- system and user turns, the
``<|assistant|>`` header -- is context with target -100. A Hugging Face model fine-tunes with its
own template (Llama 3: the turn closes with ``<|eot_id|>``, ``<|begin_of_text|>`` comes from the
template's ``bos_token``), so its training ids are those of transformers' ``apply_chat_template``.

Each conversation is rendered by the chat template one turn at a time, and each piece is tokenized
on its own, so the prompt's tokens are exactly the tokens the server feeds the model at inference
(a tokenizer never merges a prompt's last characters with the completion's first ones).

Conversations are packed several to a row of ``seq_len`` positions with ``doc_ids`` marking which
conversation each position belongs to: the model attends only within a conversation and restarts
its positions at each one, so a packed row trains exactly as its conversations would alone, with
no compute spent on padding (``scripts/bench_finetune_packing.py`` measures the difference).
A conversation longer than the context is cut at its end and counted; one that keeps no assistant
token after the cut is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.chat import ROLES, ChatTemplate
from pretrain.data.loader import Batch, Loader
from pretrain.errors import UserError
from pretrain.tokenizer import CHAT_TEMPLATE, END_OF_TURN, EOS_TOKEN, ROLE_TOKENS

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# Reading the JSONL file


@dataclass
class ReadReport:
    """What reading a JSONL file kept and skipped (bad rows only when skipping was asked for)."""

    rows: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    first_skipped: list[str] = field(default_factory=list)  # "FILE:LINE: reason", a few

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class BadRow(ValueError):
    """One row that is not a usable example; the reason is a short phrase (used for counting)."""


def row_to_messages(row: Any) -> list[dict[str, str]]:
    """Turn one parsed JSON row into a conversation, or raise :class:`BadRow` saying why not."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _check_messages(row["messages"])
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str):
            raise BadRow('"prompt" must be a string')
        if not isinstance(completion, str):
            raise BadRow('"completion" must be a string')
        if not completion.strip():
            raise BadRow("empty completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    keys = ", ".join(sorted(row)) or "none"
    raise BadRow(f'row has neither "prompt"/"completion" nor "messages" (keys: {keys})')


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRow('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f'message {i} must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise BadRow(f"unknown role {m['role']!r} in message {i} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise BadRow(f'message {i}: "content" must be a string')
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow(f"empty completion (assistant message {i} has no content)")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant message: nothing to learn from this row")
    return out


def read_jsonl(
    path: str | Path, *, skip_bad_rows: bool = False
) -> tuple[list[list[dict[str, str]]], ReadReport]:
    """All conversations in a JSONL file, in file order, and a report of what was skipped.

    A bad row raises a :class:`UserError` naming the file and line, unless ``skip_bad_rows``,
    which skips it and counts it by reason. Blank lines are allowed and ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fine-tuning data file not found: {path}")
    conversations: list[list[dict[str, str]]] = []
    report = ReadReport()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                report.blank_lines += 1
                continue
            try:
                conversations.append(row_to_messages(_parse_json(raw)))
            except BadRow as e:
                where = f"{path}:{lineno}: {e}"
                if not skip_bad_rows:
                    raise UserError(f"{where} (fix the row, or pass --skip-bad-rows)") from None
                report.skipped[_reason_key(str(e))] += 1
                if len(report.first_skipped) < 5:
                    report.first_skipped.append(where)
    report.rows = len(conversations)
    if not conversations:
        raise UserError(f"{path} has no usable rows" + _skipped_suffix(report))
    return conversations, report


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRow("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRow(f"not valid JSON ({e.msg} at column {e.colno})") from None


def _reason_key(reason: str) -> str:
    """Group skip reasons that differ only in details (column, message index, key list)."""
    for prefix in ("not valid JSON", "unknown role", "empty completion", "row has neither"):
        if reason.startswith(prefix):
            return prefix
    return reason


def _skipped_suffix(report: ReadReport) -> str:
    if not report.skipped_total:
        return ""
    reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.most_common())
    return f" ({report.skipped_total} bad rows skipped: {reasons})"


# ---------------------------------------------------------------------------------------------
# Tokenizing


@dataclass
class Example:
    """One tokenized conversation: ``tokens`` and, per token, whether the model learns to say it."""

    tokens: np.ndarray  # int64 (n,)
    trains: np.ndarray  # bool (n,)

    def inputs_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Next-token pairs: input ``tokens[:-1]``, target ``tokens[1:]`` or -100 where not trained."""
        targets = np.where(self.trains[1:], self.tokens[1:], IGNORE_INDEX)
        return self.tokens[:-1], targets


def check_tokenizer(tokenizer, template: ChatTemplate | None = None) -> None:
    """The template's special tokens must be single tokens of the tokenizer, else it is the wrong one.

    The project's template needs its role tokens; a model's own template (a Hugging Face
    directory's) needs the special tokens it is given (checked when they were read).
    """
    if template is not None and template.source != CHAT_TEMPLATE:
        return
    missing = [
        t
        for t in (*ROLE_TOKENS.values(), END_OF_TURN, EOS_TOKEN)
        if tokenizer.token_to_id(t) is None
    ]
    if missing:
        raise UserError(
            f"the tokenizer has no special token(s) {', '.join(missing)}: it was not trained "
            "by 'pretrain prepare', so the project's chat template cannot be tokenized; give "
            "the model's own template as 'chat_template' in its tokenizer_config.json"
        )


def tokenize_conversations(
    conversations: list[list[dict[str, str]]], tokenizer, template: ChatTemplate
) -> list[Example]:
    """Render every conversation and tokenize its pieces (in batches, for speed)."""
    check_tokenizer(tokenizer, template)
    all_segments = [template.segments(c) for c in conversations]
    flat_text = [text for segs in all_segments for text, _ in segs]
    encodings = tokenizer.encode_batch(flat_text, add_special_tokens=False)
    examples = []
    k = 0
    for segs in all_segments:
        ids: list[int] = []
        trains: list[bool] = []
        for _, train in segs:
            seg_ids = encodings[k].ids
            k += 1
            ids.extend(seg_ids)
            trains.extend([train] * len(seg_ids))
        examples.append(Example(np.asarray(ids, dtype=np.int64), np.asarray(trains, dtype=bool)))
    return examples


# ---------------------------------------------------------------------------------------------
# Fitting examples into the context


@dataclass
class Document:
    """One example as next-token pairs, at most ``seq_len`` long."""

    inputs: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class FitReport:
    kept: int = 0
    truncated: int = 0  # cut at the end to fit the context, still with loss tokens
    dropped: int = 0  # no loss token left after the cut
    trained_tokens: int = 0
    total_tokens: int = 0

    def describe(self, seq_len: int) -> str:
        text = f"{self.kept} examples, {self.total_tokens} tokens ({self.trained_tokens} trained)"
        if self.truncated:
            text += f"; {self.truncated} longer than the context ({seq_len}) were cut at the end"
        if self.dropped:
            text += (
                f"; {self.dropped} dropped: their prompt fills the context and no completion "
                "token is left"
            )
        return text


def fit_to_context(examples: list[Example], seq_len: int) -> tuple[list[Document], FitReport]:
    """Next-token documents of at most ``seq_len`` positions; cuts and drops are counted."""
    docs: list[Document] = []
    report = FitReport()
    for ex in examples:
        inputs, targets = ex.inputs_targets()
        if len(inputs) > seq_len:
            inputs, targets = inputs[:seq_len], targets[:seq_len]
            if not (targets != IGNORE_INDEX).any():
                report.dropped += 1
                continue
            report.truncated += 1
        if len(inputs) == 0 or not (targets != IGNORE_INDEX).any():
            report.dropped += 1
            continue
        docs.append(Document(inputs, targets))
        report.kept += 1
        report.total_tokens += len(inputs)
        report.trained_tokens += int((targets != IGNORE_INDEX).sum())
    return docs, report


# ---------------------------------------------------------------------------------------------
# Rows and batches


def pack(doc_lengths: list[int], order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Group document indices, in ``order``, into rows of at most ``seq_len`` positions.

    Next-fit: a document goes into the current row if it fits, else it opens a new row. The
    order is the training order, so packing keeps the epoch's shuffle.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order.tolist():
        n = doc_lengths[i]
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def collate(
    rows: list[list[int]], docs: list[Document], width: int, pad_id: int, with_doc_ids: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows of documents -> ``inputs``, ``targets``, ``doc_ids`` tensors of shape (len(rows), width).

    Padding positions get input ``pad_id``, target -100 and a document id of their own.
    """
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            doc = docs[i]
            n = len(doc)
            inputs[r, pos : pos + n] = doc.inputs
            targets[r, pos : pos + n] = doc.targets
            doc_ids[r, pos : pos + n] = d
            pos += n
        doc_ids[r, pos:] = len(row)
    return (
        torch.from_numpy(inputs),
        torch.from_numpy(targets),
        torch.from_numpy(doc_ids) if with_doc_ids else None,
    )


class SFTLoader(Loader):
    """An endless, deterministic stream of fine-tuning batches for one rank.

    Every epoch shuffles the documents with ``(seed, epoch)`` (when ``shuffle``) and groups them
    into rows: several per row when ``packing``, one per row otherwise (padded to the longest in
    the global batch). The stream of rows runs on across epochs; each global batch is the next
    ``global_batch_size`` rows, and this rank takes its contiguous share. The state is the global
    position (epoch, row), so a run resumes on the same batches with any world size.
    """

    def __init__(
        self,
        docs: list[Document],
        *,
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = True,
        pad_id: int = 0,
    ):
        if not docs:
            raise UserError("no fine-tuning examples to train on")
        if global_batch_size % world_size:
            raise UserError(
                f"train.global_batch_size={global_batch_size} is not divisible by the "
                f"world size {world_size}"
            )
        too_long = max(len(d) for d in docs)
        if too_long > seq_len:
            raise ValueError(f"a document of {too_long} positions exceeds seq_len={seq_len}")
        self.docs = docs
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.packing, self.pad_id = seed, shuffle, packing, pad_id
        self.epoch = 0
        self.position = 0  # next row of the current epoch
        self._lengths = [len(d) for d in docs]
        self._rows_cache: tuple[int, list[list[int]]] | None = None

    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        if self._rows_cache is not None and self._rows_cache[0] == epoch:
            return self._rows_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
        else:
            order = np.arange(len(self.docs))
        if self.packing:
            rows = pack(self._lengths, order, self.seq_len)
        else:
            rows = [[i] for i in order.tolist()]
        self._rows_cache = (epoch, rows)
        return rows

    def rows_per_epoch(self) -> int:
        return len(self.rows_of_epoch(0))

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> Batch:
        batch_rows: list[list[int]] = []
        while len(batch_rows) < self.global_batch_size:
            rows = self.rows_of_epoch(self.epoch)
            take = rows[self.position : self.position + self.global_batch_size - len(batch_rows)]
            batch_rows.extend(take)
            self.position += len(take)
            if self.position >= len(rows):
                self.epoch, self.position = self.epoch + 1, 0
        if self.packing:
            width = self.seq_len
        else:  # pad to the longest of the global batch, so every rank has the same shape
            longest = max(self._lengths[row[0]] for row in batch_rows)
            width = min(self.seq_len, 8 * math.ceil(longest / 8))
        share = self.global_batch_size // self.world_size
        mine = batch_rows[self.rank * share : (self.rank + 1) * share]
        inputs, targets, doc_ids = collate(mine, self.docs, width, self.pad_id, self.packing)
        return Batch(inputs=inputs, targets=targets, doc_ids=doc_ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "sft",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "documents": len(self.docs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sft" or state.get("documents") != len(self.docs):
            raise UserError(
                "the checkpoint's data position does not belong to this fine-tuning data "
                f"({state.get('documents')} documents then, {len(self.docs)} now): resume "
                "with the same --data file and finetune settings"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


# ---------------------------------------------------------------------------------------------
# Splitting


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and validation splits: a seeded random ``val_fraction`` of rows."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"finetune.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def describe_read(path: str | Path, report: ReadReport) -> str:
    return f"{path}: {report.rows} rows" + _skipped_suffix(report)
