"""``pretrain eval``: measure an export or a checkpoint on local task files, in process.

Two kinds of task, both scored by the model's one forward (no server, no network):

* **Text** (``--text FILE``): perplexity and bits per byte. The text is tokenized whole, after the
  end-of-text token that starts every document in training, so every token of the text is
  predicted and counted. Windows of the model's context slide over it ``--stride`` tokens at a
  time; each window scores only the tokens no earlier window scored, so every token is scored
  once, with at least ``context - stride`` tokens before it (fewer only near the start). The
  default stride is half the context; ``--stride`` equal to the context gives disjoint windows,
  lm-eval's ``loglikelihood_rolling``. Bits per byte is the total negative log-likelihood in bits
  over the text's UTF-8 bytes, so it compares models with different tokenizers.
* **Multiple choice** (``--choices FILE``): a JSONL of ``{"context", "choices", "answer"}`` rows
  (the HellaSwag/ARC shape; ``answer`` is the index of the right choice). Each choice is scored
  as the sum of its tokens' log-probabilities after the context, tokenized as lm-eval does (the
  context's trailing whitespace moves to the choice; the choice's tokens are those of
  ``context + choice`` after those of the context). ``acc`` takes the likeliest choice,
  ``acc_norm`` the likeliest per UTF-8 byte of the choice (lm-eval divides by characters, which is
  the same for ASCII). A row longer than the context loses context tokens from the left.

Sequences are scored in batches (``--batch-size``), longest first so that padding is short; the
padding goes at the end of a row, where the causal mask keeps it from every scored position.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import read_model_weights, set_full_weights
from pretrain.devices import resolve_device
from pretrain.errors import UserError
from pretrain.export import resolve_checkpoint
from pretrain.hf import TOKENIZER, is_export_dir
from pretrain.inference import DTYPE_CHOICES, load_for_inference, torch_dtype
from pretrain.model import Transformer
from pretrain.tokenizer import EOS_TOKEN, load_tokenizer

__all__ = [
    "ChoiceRow",
    "ChoicesResult",
    "EvalModel",
    "TextResult",
    "evaluate_choices",
    "evaluate_text",
    "load_eval_model",
    "read_choices",
    "run",
    "score_continuations",
]

DEFAULT_BATCH_SIZE = 8


# --------------------------------------------------------------------------- the model


@dataclass
class EvalModel:
    """A model to score with, its tokenizer and the token that starts a document."""

    model: Transformer
    tokenizer: object  # a tokenizers.Tokenizer
    start_id: int  # the end-of-text token, which precedes every document in training
    name: str

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len


def load_eval_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> EvalModel:
    """An export (checksums verified) or a checkpoint (a step, checkpoints/ or run directory,
    as ``pretrain export`` takes), loaded in eval mode on the resolved device."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path} (give an export or a checkpoint directory)")
    if is_export_dir(path):
        loaded = load_for_inference(path, device, dtype)
        return EvalModel(loaded.model, loaded.tokenizer, loaded.eos_ids[0], loaded.name)
    step_dir = resolve_checkpoint(path)
    dev = resolve_device(device)
    cfg, weights = read_model_weights(step_dir)
    with torch.device(dev):
        model = Transformer(cfg)
    model.to(torch_dtype(dtype, dev) or next(iter(weights.values())).dtype)
    set_full_weights(model, weights, f"checkpoint {step_dir}")
    tokenizer = load_tokenizer(step_dir / TOKENIZER)
    start_id = tokenizer.token_to_id(EOS_TOKEN)
    if start_id is None:
        raise UserError(f"{step_dir / TOKENIZER} has no {EOS_TOKEN} token to start a document")
    return EvalModel(model.eval(), tokenizer, start_id, step_dir.name)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Span:
    """One forward's worth of work: ``ids`` are fed, and the log-probabilities of the last
    ``n_scored`` of ``ids[1:]`` (each predicted from the tokens before it) are summed."""

    ids: list[int]
    n_scored: int


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_spans(
    model: Transformer,
    spans: Sequence[Span],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    desc: str = "scoring",
) -> list[float]:
    """The summed log-probability (natural log, float64) of each span's scored tokens."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].ids))
    totals = [0.0] * len(spans)
    batches = _batches(order, batch_size)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=None, file=sys.stderr):
        width = len(spans[batch[0]].ids) - 1  # the longest in the batch: inputs, not the last id
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = spans[i].ids[:-1]
            inputs[row, : len(ids)] = torch.tensor(ids)
        logits = model(inputs.to(device))
        for row, i in enumerate(batch):
            span = spans[i]
            end = len(span.ids) - 1
            # Only the scored positions are normalized: a choice is a few of a row's positions.
            logprobs = torch.log_softmax(logits[row, end - span.n_scored : end], dim=-1)
            targets = torch.tensor(span.ids[end - span.n_scored + 1 :], device=device)
            totals[i] = float(logprobs.gather(-1, targets[:, None]).double().sum())
    return totals


# --------------------------------------------------------------------------- text


@dataclass
class TextResult:
    file: str
    tokens: int  # tokens scored: every token of the text
    bytes: int  # UTF-8 bytes of the text
    nll: float  # total negative log-likelihood, nats
    perplexity: float
    bits_per_byte: float
    window: int
    stride: int


def sliding_windows(ids: list[int], window: int, stride: int) -> list[Span]:
    """Spans over ``ids`` (whose first token only gives context) that score every later token
    exactly once; each window is at most ``window`` inputs and starts ``stride`` after the last."""
    if not 1 <= stride <= window:
        raise UserError(f"--stride must be between 1 and the context ({window}), got {stride}")
    spans: list[Span] = []
    n = len(ids) - 1  # the tokens to predict
    begin, scored_to = 0, 0
    while scored_to < n:
        end = min(begin + window, n)  # predicts ids[begin + 1 : end + 1]
        spans.append(Span(ids[begin : end + 1], end - scored_to))
        scored_to = end
        begin += stride
    return spans


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    if not text:
        raise UserError(f"{path} is empty: there is nothing to score")
    return text


def evaluate_text(
    em: EvalModel,
    path: str | Path,
    *,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TextResult:
    """Perplexity and bits per byte of a UTF-8 text file (see the module docstring)."""
    text = read_text(path)
    window = em.max_len
    if stride is None:
        stride = max(1, window // 2)
    ids = [em.start_id, *em.tokenizer.encode(text, add_special_tokens=False).ids]
    spans = sliding_windows(ids, window, stride)
    nll = -sum(score_spans(em.model, spans, batch_size=batch_size, desc=Path(path).name))
    n_tokens, n_bytes = len(ids) - 1, len(text.encode("utf-8"))
    return TextResult(
        file=str(path),
        tokens=n_tokens,
        bytes=n_bytes,
        nll=nll,
        perplexity=math.exp(nll / n_tokens),
        bits_per_byte=nll / (math.log(2) * n_bytes),
        window=window,
        stride=stride,
    )


# --------------------------------------------------------------------------- multiple choice


@dataclass
class ChoiceRow:
    line: int
    context: str
    choices: list[str]
    answer: int


@dataclass
class ChoicesResult:
    file: str
    rows: int
    acc: float
    acc_norm: float
    truncated: int  # rows that lost context tokens to fit the model's context
    per_row: list[dict[str, Any]] = field(default_factory=list)


def _row_error(path: Path, line: int, problem: str) -> UserError:
    return UserError(f"{path}:{line}: {problem}")


def _check_row(path: Path, line: int, row: Any) -> ChoiceRow:
    """One row of a multiple-choice file; a bad one is a UserError naming its line and field."""
    if not isinstance(row, dict):
        raise _row_error(path, line, 'a row must be an object {"context", "choices", "answer"}')
    for name in ("context", "choices", "answer"):
        if name not in row:
            raise _row_error(path, line, f'"{name}" is missing')
    context, choices, answer = row["context"], row["choices"], row["answer"]
    if not isinstance(context, str):
        raise _row_error(path, line, f'"context" must be a string, got {type(context).__name__}')
    if not isinstance(choices, list) or len(choices) < 2:
        raise _row_error(path, line, '"choices" must be a list of at least 2 strings')
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise _row_error(path, line, f'"choices"[{i}] must be a non-empty string')
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise _row_error(
            path,
            line,
            f'"answer" must be the index of the right choice (0 to {len(choices) - 1}), '
            f"got {answer!r}",
        )
    return ChoiceRow(line, context, list(choices), answer)


def read_choices(path: str | Path) -> list[ChoiceRow]:
    """The rows of a multiple-choice JSONL file; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"multiple-choice file not found: {path}")
    rows = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise _row_error(path, line, "not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise _row_error(
                    path, line, f"not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            rows.append(_check_row(path, line, row))
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def encode_pair(
    tokenizer, start_id: int, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval splits them: trailing whitespace of the context
    move to the continuation, and the continuation's ids are those of the whole text after the
    context's. An empty context is the start-of-document token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        ids = tokenizer.encode(continuation, add_special_tokens=False).ids
        return [start_id], ids
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids) :]


def score_continuations(
    em: EvalModel,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    desc: str = "choices",
) -> tuple[list[float], list[bool]]:
    """The log-likelihood of each continuation after its context, and whether the context had to
    be cut from the left to fit the model's context."""
    spans, truncated = [], []
    for context, continuation in pairs:
        context_ids, cont_ids = encode_pair(em.tokenizer, em.start_id, context, continuation)
        if not cont_ids:
            raise UserError(f"the choice {continuation!r} has no tokens after its context")
        if len(cont_ids) > em.max_len:
            raise UserError(
                f"a choice of {len(cont_ids)} tokens cannot be scored in the model's context of "
                f"{em.max_len} tokens"
            )
        ids = (context_ids + cont_ids)[-(em.max_len + 1) :]
        truncated.append(len(ids) < len(context_ids) + len(cont_ids))
        spans.append(Span(ids, len(cont_ids)))
    return score_spans(em.model, spans, batch_size=batch_size, desc=desc), truncated


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # the first of equal ones


def evaluate_choices(
    em: EvalModel, path: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> ChoicesResult:
    """Accuracy and length-normalized accuracy on a multiple-choice JSONL file."""
    rows = read_choices(path)
    pairs = [(row.context, choice) for row in rows for choice in row.choices]
    scores, cut = score_continuations(em, pairs, batch_size=batch_size, desc=Path(path).name)
    per_row, k, n_cut = [], 0, 0
    for row in rows:
        lls = scores[k : k + len(row.choices)]
        n_cut += any(cut[k : k + len(row.choices)])
        k += len(row.choices)
        normed = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, row.choices)]
        per_row.append(
            {
                "line": row.line,
                "answer": row.answer,
                "loglikelihoods": lls,
                "pred": _argmax(lls),
                "pred_norm": _argmax(normed),
            }
        )
    return ChoicesResult(
        file=str(path),
        rows=len(rows),
        acc=sum(r["pred"] == r["answer"] for r in per_row) / len(rows),
        acc_norm=sum(r["pred_norm"] == r["answer"] for r in per_row) / len(rows),
        truncated=n_cut,
        per_row=per_row,
    )


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="an export directory, or a checkpoint (step, checkpoints/ or run directory)",
    )
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text: perplexity and bits per byte")
    parser.add_argument(
        "--choices",
        metavar="FILE",
        help='JSONL of {"context", "choices", "answer"} rows: acc and acc_norm',
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between sliding windows over --text (default: half the context; "
        "the context itself gives disjoint windows, as lm-eval)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"sequences per forward (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help=f"weights dtype: {', '.join(DTYPE_CHOICES)} (auto: fp32 on a CPU, stored on a GPU)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (with per-row results)"
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.text is None and args.choices is None:
        raise UserError("give a task: --text FILE, --choices FILE, or both")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be at least 1, got {args.stride}")


def _text_line(r: TextResult) -> str:
    return (
        f"text {r.file}: {r.tokens} tokens, {r.bytes} bytes: perplexity {r.perplexity:.4f}, "
        f"bits per byte {r.bits_per_byte:.4f} (window {r.window}, stride {r.stride})"
    )


def _choices_line(r: ChoicesResult) -> str:
    cut = f", {r.truncated} rows cut to fit the context" if r.truncated else ""
    return f"choices {r.file}: {r.rows} rows: acc {r.acc:.4f}, acc_norm {r.acc_norm:.4f}{cut}"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    tasks: list[tuple[str, Callable[[EvalModel], Any]]] = []
    if args.text is not None:
        read_text(args.text)  # a bad file fails before the model loads
        tasks.append(
            (
                "text",
                lambda em: evaluate_text(
                    em, args.text, stride=args.stride, batch_size=args.batch_size
                ),
            )
        )
    if args.choices is not None:
        read_choices(args.choices)
        tasks.append(
            ("choices", lambda em: evaluate_choices(em, args.choices, batch_size=args.batch_size))
        )
    em = load_eval_model(args.model, args.device, args.dtype)
    if args.stride is not None and args.stride > em.max_len:
        raise UserError(
            f"--stride must be at most the model's context ({em.max_len}), got {args.stride}"
        )
    report: dict[str, Any] = {"model": str(args.model)}
    for name, task in tasks:
        result = task(em)
        report[name] = asdict(result)
        if not args.json:
            print(_text_line(result) if name == "text" else _choices_line(result), flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
