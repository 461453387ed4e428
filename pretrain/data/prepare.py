"""``prepare_dataset``: raw text in, a prepared dataset (shards, tokenizer, manifest) out.

1. Read documents (:mod:`pretrain.data.sources`).
2. Split them into train/val by a hash of their text (:func:`is_val_document`): deterministic,
   and a document (or any copy of it) is never in both splits.
3. Train a byte-level BPE tokenizer on the train split, or copy the one given.
4. Tokenize in batches, in parallel (:mod:`pretrain.data.tokenize`), and write shards
   (:class:`~pretrain.data.format.ShardWriter`), then the manifest.

Everything goes to a temporary directory next to ``out``, renamed into place at the end, so a
crash never leaves something that looks complete. The manifest records a hash of the inputs and
settings (the recipe): re-running with the same ones finds the dataset up to date.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.format import (
    CHECKSUM,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Manifest,
    ShardWriter,
    default_checksum,
    load_manifest,
    new_hasher,
    token_dtype_for,
)
from pretrain.data.sources import TEXT_FIELD, Source, iter_documents, resolve_inputs
from pretrain.data.tokenize import (
    default_num_proc,
    split_long_text,
    text_batches,
    tokenize_batches,
)
from pretrain.errors import UserError
from pretrain.tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    min_vocab_size,
    train_tokenizer,
)

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 100_000_000
TOKENIZER_TRAIN_BYTES = 1 << 30  # a tokenizer learns its merges from at most this much text

Log = Callable[[str], Any]


@dataclass(frozen=True)
class PrepareOptions:
    """How a dataset is prepared; a ``None`` takes its default when :func:`prepare_dataset` runs.

    ``vocab_size`` trains a new tokenizer (default 8192); ``tokenizer`` reuses a
    ``tokenizer.json`` (or a directory holding one) instead. ``num_proc`` tokenizer processes
    (default one per core; 1 runs the tokenizer's own threads in this process). ``streaming``
    streams Hub datasets (local files always are). ``show_progress`` defaults to whether stderr
    is a terminal. ``checksum`` is the 64-bit hash of the shard checksums and the train/val
    split (default: :func:`~pretrain.data.format.default_checksum`).
    """

    text_field: str = TEXT_FIELD
    vocab_size: int | None = None
    tokenizer: str | Path | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    num_proc: int | None = None
    overwrite: bool = False
    streaming: bool = False
    show_progress: bool | None = None
    checksum: str | None = None


@dataclass
class PrepareStats:
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    empty_documents: int = 0
    replaced_chars: int = 0
    replaced_documents: int = 0
    text_bytes: int = 0
    seconds: float = 0.0


def is_val_document(text_bytes: bytes, val_fraction: float, algorithm: str = CHECKSUM) -> bool:
    """Whether a document belongs to the val split: a 64-bit hash of its bytes below the fraction."""
    hasher = new_hasher(algorithm)
    hasher.update(text_bytes)
    return int.from_bytes(hasher.digest(), "big") < val_fraction * 2.0**64


def prepare_dataset(
    out: str | Path,
    inputs: list[str] | None = None,
    options: PrepareOptions | None = None,
    *,
    log: Log = print,
    **fields: Any,
) -> Manifest:
    """Tokenize ``inputs`` (default: the Python standard library) into ``out``; return its manifest.

    The settings are ``options``, or its fields as keywords (``vocab_size=512``), which override
    those of ``options``. Re-running with the same inputs and settings finds the dataset up to
    date and returns it.
    """
    options = _with_defaults(dataclasses.replace(options or PrepareOptions(), **fields))
    out = Path(out)
    sources = resolve_inputs(inputs)
    options, tokenizer_sha = _resolve_tokenizer(options)
    recipe = _recipe(sources, options, tokenizer_sha)
    if _check_output_dir(out, recipe, options.overwrite):
        log(f"{out} is up to date (same inputs and settings); nothing to do")
        return load_manifest(out)
    stats = _prepare_and_install(out, sources, options, recipe, log)
    manifest = load_manifest(out)
    _log_summary(manifest, stats, log)
    return manifest


def _with_defaults(o: PrepareOptions) -> PrepareOptions:
    """``o`` with every ``None`` resolved; a setting out of range is refused before any work."""
    if o.tokenizer is not None and o.vocab_size is not None:
        raise UserError("give either --vocab-size (train a tokenizer) or --tokenizer, not both")
    vocab_size = o.vocab_size
    if o.tokenizer is None:
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        if vocab_size < min_vocab_size():
            raise UserError(
                f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                f"{min_vocab_size()} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
    if not 0.0 <= o.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {o.val_fraction}")
    if o.shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {o.shard_tokens}")
    num_proc = default_num_proc() if o.num_proc is None else o.num_proc
    if num_proc < 1:
        raise UserError(f"--num-proc must be at least 1, got {num_proc}")
    show_progress = sys.stderr.isatty() if o.show_progress is None else o.show_progress
    checksum = default_checksum() if o.checksum is None else o.checksum
    new_hasher(checksum)  # an unknown or unavailable algorithm fails before any work
    return dataclasses.replace(
        o, vocab_size=vocab_size, num_proc=num_proc, show_progress=show_progress, checksum=checksum
    )


def _resolve_tokenizer(o: PrepareOptions) -> tuple[PrepareOptions, str | None]:
    """The given tokenizer as a ``tokenizer.json`` path, and its SHA-256 (None: train one)."""
    if o.tokenizer is None:
        return o, None
    tokenizer = Path(o.tokenizer)
    load_tokenizer(tokenizer)  # a file that does not parse fails here, before any work
    if tokenizer.is_dir():
        tokenizer = tokenizer / TOKENIZER_FILE
    sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    return dataclasses.replace(o, tokenizer=tokenizer), sha


def _recipe(sources: list[Source], o: PrepareOptions, tokenizer_sha256: str | None) -> str:
    """A hash of everything that determines the dataset, to tell 'up to date' from 'different'."""
    inputs = []
    for s in sources:
        files = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in s.files]
        inputs.append([s.builder, s.hub_id, s.hub_config, files])
    recipe = [FORMAT_VERSION, inputs, o.text_field, o.vocab_size, tokenizer_sha256]
    recipe += [o.val_fraction, o.shard_tokens]
    if o.checksum != CHECKSUM:  # the split depends on it; recipes from before the choice stay valid
        recipe.append(o.checksum)
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()


def _check_output_dir(out: Path, recipe: str, overwrite: bool) -> bool:
    """Whether ``out`` already holds exactly this dataset; refuse a different one."""
    if not out.exists() or overwrite:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        return False
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text()).get("recipe")
        except ValueError:
            existing = None
        if existing == recipe:
            return True
        raise UserError(
            f"{out} already holds a different dataset (its {MANIFEST_FILE} comes from other inputs "
            "or settings); pass --overwrite to replace it, or choose another --out"
        )
    if any(out.iterdir()):
        raise UserError(
            f"{out} exists and is not a prepared dataset (no {MANIFEST_FILE}); pass --overwrite "
            "to replace it, or choose another --out"
        )
    return False


def _prepare_and_install(
    out: Path, sources: list[Source], o: PrepareOptions, recipe: str, log: Log
) -> PrepareStats:
    """Build the dataset in a temporary directory beside ``out``, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _prepare_into(tmp, sources, o, recipe, log)
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _prepare_into(
    tmp: Path, sources: list[Source], o: PrepareOptions, recipe: str, log: Log
) -> PrepareStats:
    """Tokenizer, shards and manifest of the dataset, written into the empty directory ``tmp``."""
    start = time.perf_counter()
    tok = _train_tokenizer(tmp, sources, o, log)
    stats, shards = _write_shards(tmp, sources, o, tok)
    stats.seconds = time.perf_counter() - start
    _write_manifest(tmp, sources, o, tok, shards, stats, recipe)
    return stats


# --- the tokenizer -------------------------------------------------------------------------------


def _train_tokenizer(tmp: Path, sources: list[Source], o: PrepareOptions, log: Log):
    """Train a tokenizer on the train split (or load the given one) and save it into ``tmp``."""
    if o.tokenizer is not None:
        tok = load_tokenizer(str(o.tokenizer))
        if tok.token_to_id(EOS_TOKEN) is None:
            raise UserError(
                f"tokenizer {o.tokenizer} has no {EOS_TOKEN} token, which separates documents"
            )
        shutil.copyfile(o.tokenizer, tmp / TOKENIZER_FILE)
        return tok
    log(f"training a byte-level BPE tokenizer (vocab {o.vocab_size}) on the train split")
    texts = _train_split_texts(sources, o, tmp / "scratch")
    tok = train_tokenizer(texts, o.vocab_size, show_progress=o.show_progress)
    tok.save(str(tmp / TOKENIZER_FILE))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab < o.vocab_size:
        log(
            f"note: the corpus supports only {vocab} tokens (asked for {o.vocab_size}); "
            f"vocab_size={vocab}"
        )
    return tok


def _train_split_texts(sources: list[Source], o: PrepareOptions, scratch: Path) -> Iterator[str]:
    """The train split's non-empty documents, up to TOKENIZER_TRAIN_BYTES of them.

    A long document comes in pieces (:func:`split_long_text`): the trainer counts pre-tokens,
    which the pieces hold exactly as the whole does, at a fraction of the memory.
    """
    seen = 0
    for text in iter_documents(sources, o.text_field, o.streaming, scratch):
        data = text.encode()
        if not data or is_val_document(data, o.val_fraction, o.checksum):
            continue
        yield from split_long_text(text)
        seen += len(data)
        if seen >= TOKENIZER_TRAIN_BYTES:
            return


# --- the shards ----------------------------------------------------------------------------------


def _write_shards(
    tmp: Path, sources: list[Source], o: PrepareOptions, tok
) -> tuple[PrepareStats, list[dict]]:
    """Tokenize every document into the train and val shards; their manifest entries."""
    dtype = token_dtype_for(tok.get_vocab_size(with_added_tokens=True))
    tokenizer_json = (tmp / TOKENIZER_FILE).read_text()
    stats = PrepareStats()
    writers = {s: ShardWriter(tmp, s, dtype, o.shard_tokens, o.checksum) for s in ("train", "val")}
    local_bytes = sum(os.path.getsize(f) for s in sources for f in s.files)
    all_text = all(s.builder == "text" for s in sources)
    bar = _progress(local_bytes if all_text else None, "tokenizing", o.show_progress)
    texts = (
        t
        for t in iter_documents(sources, o.text_field, o.streaming, tmp / "scratch")
        if t or _count_empty(stats)
    )
    eos_id = tok.token_to_id(EOS_TOKEN)
    for batch, flat, lengths in tokenize_batches(
        tokenizer_json, text_batches(texts), eos_id, dtype, o.num_proc
    ):
        pos = 0
        for text, n in zip(batch, lengths):
            bar.update(_add_document(writers, stats, text, flat[pos : pos + n], o))
            pos += n
    bar.close()
    shards = writers["train"].close() + writers["val"].close()
    _check_splits(stats)
    return stats, shards


def _add_document(
    writers: dict[str, ShardWriter],
    stats: PrepareStats,
    text: str,
    tokens: np.ndarray,
    o: PrepareOptions,
) -> int:
    """Write one document's tokens to its split's shards and count it; its UTF-8 size."""
    data = text.encode()
    split = "val" if is_val_document(data, o.val_fraction, o.checksum) else "train"
    writers[split].add(tokens, len(data))
    stats.documents[split] += 1
    stats.text_bytes += len(data)
    if (replaced := text.count("\ufffd")) > 0:
        stats.replaced_chars += replaced
        stats.replaced_documents += 1
    return len(data)


def _count_empty(stats: PrepareStats) -> bool:
    stats.empty_documents += 1
    return False


def _check_splits(stats: PrepareStats) -> None:
    """Refuse inputs that left the train split empty."""
    if stats.documents["train"] > 0:
        return
    if stats.documents["val"] == 0:
        raise UserError(
            "the inputs hold no text"
            + (f" ({stats.empty_documents} empty documents)" if stats.empty_documents else "")
        )
    raise UserError(
        f"all {stats.documents['val']} documents fell into the val split; "
        "lower --val-fraction or give more documents"
    )


class _NoProgress:
    """Stands in for a progress bar where tqdm is not installed."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


# --- the manifest --------------------------------------------------------------------------------


def _write_manifest(
    tmp: Path,
    sources: list[Source],
    o: PrepareOptions,
    tok,
    shards: list[dict],
    stats: PrepareStats,
    recipe: str,
) -> None:
    """``manifest.json``, written last: its presence marks the dataset complete."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    manifest = {
        "format": "pretrain-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest(),
        "vocab_size": vocab,
        "token_dtype": token_dtype_for(vocab).name,
        "eos_id": tok.token_to_id(EOS_TOKEN),
        "special_tokens": {
            t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None
        },
        "document_separator": "eos appended after every document",
        "checksum": f"{o.checksum} over the whole shard file",
        "checksum_algorithm": o.checksum,
        "val_fraction": o.val_fraction,
        "shard_tokens": o.shard_tokens,
        "source": {
            "inputs": [s.label for s in sources],
            "files": sum(len(s.files) for s in sources),
            "text_field": o.text_field,
        },
        "stats": _stats_entry(stats),
        "recipe": recipe,
        "shards": shards,
    }
    _write_json_atomic(tmp / MANIFEST_FILE, manifest)


def _stats_entry(stats: PrepareStats) -> dict[str, Any]:
    return {
        "documents": stats.documents,
        "empty_documents_skipped": stats.empty_documents,
        "replacement_chars": stats.replaced_chars,
        "documents_with_replacements": stats.replaced_documents,
        "text_bytes": stats.text_bytes,
        "seconds": round(stats.seconds, 3),
    }


def _write_json_atomic(path: Path, obj: Any) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=2) + "\n")
    part.replace(path)


def _log_summary(m: Manifest, stats: PrepareStats, log: Log) -> None:
    mb = stats.text_bytes / 1e6
    log(
        f"wrote {m.data_dir}: train {m.num_tokens('train'):,} tokens / {m.num_docs('train'):,} docs, "
        f"val {m.num_tokens('val'):,} tokens / {m.num_docs('val'):,} docs, "
        f"{len(m.shards)} shards, vocab {m.vocab_size} ({m.token_dtype}), eos id {m.eos_id}; "
        f"{mb:.1f} MB of text in {stats.seconds:.1f} s ({mb / max(stats.seconds, 1e-9):.2f} MB/s)"
    )
    if stats.replaced_chars:
        log(
            f"warning: {stats.replaced_chars:,} undecodable bytes were replaced by U+FFFD "
            f"in {stats.replaced_documents:,} documents"
        )
    if stats.empty_documents:
        log(f"skipped {stats.empty_documents:,} empty documents")
    if m.num_docs("val") == 0 and m.raw["val_fraction"] > 0:
        log("warning: the val split is empty; give more documents or a larger --val-fraction")
