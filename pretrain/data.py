"""Tokenized data: ``pretrain prepare`` writes checksummed token shards, ``TokenLoader`` reads them.

Prepare (raw text -> ``data/NAME/``):
    1. Read documents: local text files (one file = one document) and JSON/JSONL files (one row
       = one document, the ``--text-field`` field; a row without it is refused, naming its line)
       with plain Python, Parquet/CSV files (one row = one document) or a Hub dataset with
       Hugging Face ``datasets``. Local files are streamed, so a corpus larger than memory is
       fine; with no input the corpus is the running interpreter's own standard library (``*.py``
       files), which needs nothing beyond ``tokenizers``.
    2. Split documents into train/val by a hash of their text: deterministic, and a document (or
       any copy of it) is never in both splits.
    3. Train a byte-level BPE tokenizer on the train split (or load ``--tokenizer``).
    4. Tokenize in batches (in parallel), append an end-of-text token to every document, and
       write shards. A document longer than ``PIECE_CHARS`` is trained on and tokenized in
       pieces cut where a pre-token starts anyway, so memory stays bounded and the ids do not
       change. Everything goes to a temporary directory renamed into place at the end, so
       a crash never leaves something that looks complete.

Shard file (little-endian), ``{split}-{index:05d}.bin``::

    header  32 bytes   magic b"PTTOKENS", u32 format version, u32 token item size (2 or 4),
                       u64 token count N, u64 document count D
    tokens  N items    uint16 when the vocabulary fits, else uint32; zero-padded to 8 bytes
    starts  D+1 u64    token offset of each document in the shard, then N

``manifest.json`` records, per shard, its split, token/document/UTF-8 byte counts, its largest
token id and a checksum of the whole file (``"ALGORITHM:HEX"``), which the loader verifies before
it reads a token, together with the tokenizer's SHA-256 and every id being below ``vocab_size``. The algorithm (``checksum_algorithm`` in the manifest) also decides the train/val split:
xxh3-64 when ``xxhash`` is installed, else BLAKE2b-64 from the standard library.

Loading: a split is one concatenated token sequence cut into windows of ``seq_len + 1`` tokens
starting every ``seq_len`` tokens (consecutive windows share their boundary token, as in nanoGPT,
so every token but the first is a target exactly once per epoch). Each epoch visits the windows
in a permutation seeded by (seed, dataset fingerprint, epoch). Global sample ``i`` is a pure
function of those, and global batch ``k`` is samples ``[k*G, (k+1)*G)``, of which rank ``r`` of
``W`` takes the contiguous ``G/W`` rows at ``r*G/W``; the loader's state is just the global sample
position, so a resume continues the same stream with any world size or number of workers.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import glob
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import re
import shutil
import struct
import sys
import sysconfig
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.errors import UserError
from pretrain.tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    min_vocab_size,
    train_tokenizer,
)

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_MAGIC = b"PTTOKENS"
SHARD_HEADER = struct.Struct("<8sIIQQ")  # magic, version, token item size, tokens, documents

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 100_000_000
TOKENIZER_TRAIN_BYTES = 1 << 30  # a tokenizer learns its merges from at most this much text
BATCH_TEXT_CHARS = 1 << 20  # documents are tokenized in batches of about this many characters
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters
CHECKSUM = "xxh3_64"  # preferred: several GB/s, needs the xxhash package
FALLBACK_CHECKSUM = "blake2b_64"  # standard library (hashlib), about 1 GB/s
CHECKSUMS = (CHECKSUM, FALLBACK_CHECKSUM)

TEXT_FIELD = "text"
_JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
_BUILDER_BY_SUFFIX = {**dict.fromkeys(_JSON_SUFFIXES, "json"), ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------
# Inputs: what the user named, resolved to groups of local files or a Hub dataset.


@dataclass
class Source:
    """One ``datasets`` load: local files of one format, or a Hub dataset id."""

    label: str  # what the user wrote, for messages
    builder: str  # text | json | parquet | csv | hub
    files: list[str] = field(default_factory=list)
    hub_id: str = ""
    hub_config: str | None = None


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard library sources: ``*.py`` under sysconfig's stdlib dir.

    Third-party packages and the stdlib's own test suites are left out; the order is the sorted
    relative path, so the corpus (several MB of real Python) is the same on every run of the same
    Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_label() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return f"python-stdlib-{version}:{sysconfig.get_paths()['stdlib']}"


def resolve_inputs(specs: list[str] | None) -> list[Source]:
    """Turn ``--input`` values (paths, directories, globs, Hub ids) into sources, in order."""
    if not specs:
        files = default_corpus_files()
        if not files:
            raise UserError(f"no *.py files under {sysconfig.get_paths()['stdlib']}; give --input")
        return [Source(default_corpus_label(), "text", [str(p) for p in files])]
    sources: list[Source] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"--input {spec}: the glob matches no files")
            sources += _group_by_format(spec, matches)
        elif path.is_dir():
            files = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise UserError(f"--input {spec}: the directory holds no files")
            sources += _group_by_format(spec, files)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"--input {spec}: the file is empty")
            sources += _group_by_format(spec, [str(path)])
        elif _HUB_ID.match(spec) and not path.suffix:
            hub_id, _, config = spec.partition(":")
            sources.append(Source(spec, "hub", hub_id=hub_id, hub_config=config or None))
        else:
            raise UserError(
                f"--input {spec}: not found (not a file, directory, glob or Hugging Face dataset id)"
            )
    return _merge_consecutive(sources)


def _merge_consecutive(sources: list[Source]) -> list[Source]:
    """Neighbouring local sources of one format load together (one ``load_dataset`` call)."""
    merged: list[Source] = []
    for s in sources:
        last = merged[-1] if merged else None
        if last is not None and s.builder == last.builder != "hub":
            labels = last.label.split(", ")
            last.label = ", ".join(labels[:3] + (["..."] if len(labels) >= 3 else [s.label]))
            last.label = last.label.replace("..., ...", "...")
            last.files += s.files
        else:
            merged.append(Source(s.label, s.builder, list(s.files), s.hub_id, s.hub_config))
    return merged


def _builder_for(path: str) -> str:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return _BUILDER_BY_SUFFIX.get(suffixes[-1] if suffixes else "", "text")


def _group_by_format(label: str, files: list[str]) -> list[Source]:
    """Consecutive files of one format become one source (one ``load_dataset`` call)."""
    groups: list[Source] = []
    for f in files:
        builder = _builder_for(f)
        if not groups or groups[-1].builder != builder:
            groups.append(Source(label, builder))
        groups[-1].files.append(f)
    return groups


# ---------------------------------------------------------------------------------------------
# Reading documents: text files with plain Python, everything else through `datasets`.


def _open_raw(path: str):
    opener = _COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb")


def _is_utf8(path: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_raw(path) as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _repair_utf8(path: str, out_dir: Path) -> str:
    """Copy ``path`` with undecodable bytes replaced by U+FFFD (JSON readers refuse them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(path).name
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    target = out_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{name}"
    if target.exists():  # the second pass (after tokenizer training) reuses the copy
        return str(target)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with _open_raw(path) as src, open(target, "w", encoding="utf-8") as dst:
        while chunk := src.read(1 << 24):
            dst.write(decoder.decode(chunk))
        dst.write(decoder.decode(b"", final=True))
    return str(target)


def _read_text_files(source: Source) -> Iterator[tuple[str, dict[str, str]]]:
    """One row per file: its whole text, compressed files decompressed.

    Bad bytes become U+FFFD (counted later), never a crash, and newlines are universal
    (``\r\n`` and ``\r`` read as ``\n``), as Python's text mode reads them.
    """
    for path in source.files:
        opener = _COMPRESSED.get(Path(path).suffix, open)
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            yield path, {TEXT_FIELD: f.read()}


def _read_json_files(source: Source) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of JSON-lines files (or a ``.json`` holding one array).

    Read with plain Python rather than ``datasets``, for two reasons: a row is named by its file
    and line in every message, and a row that lacks the text field stays distinguishable from
    one whose text is ``null`` (a table would fill the gap with null). Bad bytes become U+FFFD,
    as in text files.
    """
    for path in source.files:
        opener = _COMPRESSED.get(Path(path).suffix, open)
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:  # BOM or not
            head = f.read(4096).lstrip()
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            if head.startswith("["):  # one JSON array of rows
                try:
                    rows = json.load(f)
                except ValueError as e:
                    raise UserError(f"{path} is not valid JSON ({_one_line(e)})") from None
                for index, row in enumerate(rows):
                    yield f"{path} row {index + 1}", row
                continue
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(
                        f"{path} line {number} is not valid JSON ({_one_line(e)}); fix or remove it"
                    ) from None
                yield f"{path} line {number}", row


def _load(source: Source, streaming: bool, scratch: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of one source; ``where`` names the row in messages."""
    if source.builder == "text":
        return _read_text_files(source)
    if source.builder == "json":
        return _read_json_files(source)
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"reading --input {source.label} ({source.builder}) needs the datasets package: "
            "pip install datasets (text and JSON files need only tokenizers)"
        ) from None
    try:
        if source.builder == "hub":
            dataset = datasets.load_dataset(
                source.hub_id, source.hub_config, split="train", streaming=streaming
            )
        else:
            files = source.files
            if source.builder == "csv":
                files = [f if _is_utf8(f) else _repair_utf8(f, scratch / "repaired") for f in files]
            dataset = datasets.load_dataset(
                source.builder, data_files=files, split="train", streaming=True
            )
    except UserError:
        raise
    except Exception as e:
        what = "the Hugging Face dataset" if source.builder == "hub" else "--input"
        raise UserError(f"could not load {what} {source.label}: {_one_line(e)}") from None
    return ((f"--input {source.label} row {i + 1}", row) for i, row in enumerate(dataset))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _row_text(row: Any, field_name: str, where: str) -> str:
    """The text of one row; a row without the field, or with a non-text value, is refused.

    A missing field is a schema error, not an empty document: counting it as empty would hide
    a corpus whose rows mostly lack the field. An explicit ``null`` is an empty document.
    """
    if not isinstance(row, dict):
        raise UserError(
            f"{where} is a JSON {type(row).__name__}, not an object with a '{field_name}' field"
        )
    if field_name not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise UserError(
            f"{where} has no field '{field_name}' (fields: {fields}); every row needs it: fix "
            "the row, or choose the field with --text-field"
        )
    text = row[field_name]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(
            f"{where}: field '{field_name}' holds {type(text).__name__}, not text; choose a "
            "text column with --text-field"
        )
    return text


def iter_documents(
    sources: list[Source], text_field: str, streaming: bool, scratch: Path
) -> Iterator[str]:
    """Every document's text, source after source, in a deterministic order."""
    for source in sources:
        field_name = TEXT_FIELD if source.builder == "text" else text_field
        rows = iter(_load(source, streaming, scratch))
        while True:
            try:
                where, row = next(rows)
            except StopIteration:
                break
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"could not read --input {source.label}: {_one_line(e)}") from None
            yield _row_text(row, field_name, where)


def is_val_document(text_bytes: bytes, val_fraction: float, algorithm: str = CHECKSUM) -> bool:
    """Whether a document belongs to the val split: a 64-bit hash of its bytes below the fraction."""
    hasher = new_hasher(algorithm)
    hasher.update(text_bytes)
    return int.from_bytes(hasher.digest(), "big") < val_fraction * 2.0**64


# ---------------------------------------------------------------------------------------------
# Tokenizing: batches of documents, in this process (the tokenizer's own threads) or a pool.

_WORKER: tuple | None = None  # (tokenizer, piece limit) of a tokenizer worker process


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


def _make_encoder(tokenizer_json: str):
    """A tokenizer that encodes special-token strings inside documents as plain text.

    Only the end-of-text token the writer appends may mark a document boundary, so a document
    that happens to contain ``<|endoftext|>`` is tokenized like any other text.
    """
    from tokenizers import Tokenizer

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
    for group in _batches(pieces, BATCH_TEXT_CHARS if limit is not None else 1 << 62):
        for e in tokenizer.encode_batch_fast(group, add_special_tokens=False):
            ids.append(np.asarray(e.ids, dtype=dtype))
    lengths = [1] * len(texts)  # the EOS
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


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER
    _WORKER = (_make_encoder(tokenizer_json), piece_limit(tokenizer_json))


def _encode_in_worker(texts: list[str], eos_id: int, dtype) -> tuple[np.ndarray, list]:
    tokenizer, limit = _WORKER
    return _encode_documents(tokenizer, texts, eos_id, dtype, limit)


def _batches(texts: Iterable[str], max_chars: int = BATCH_TEXT_CHARS) -> Iterator[list[str]]:
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
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    try:
        pool = multiprocessing.get_context().Pool(
            num_proc, initializer=_init_worker, initargs=(tokenizer_json,)
        )
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        pending: deque = deque()
        for texts in batches:
            pending.append((texts, pool.apply_async(_encode_in_worker, (texts, eos_id, dtype))))
            if len(pending) >= 2 * num_proc:
                texts, result = pending.popleft()
                yield (texts, *result.get())
        while pending:
            texts, result = pending.popleft()
            yield (texts, *result.get())


# ---------------------------------------------------------------------------------------------
# Shards.


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokens_end(num_tokens: int, itemsize: int) -> int:
    """Byte offset where the (8-byte aligned) document starts begin."""
    end = SHARD_HEADER.size + num_tokens * itemsize
    return end + (-end) % 8


def shard_file_size(num_tokens: int, num_docs: int, itemsize: int) -> int:
    return _tokens_end(num_tokens, itemsize) + 8 * (num_docs + 1)


def default_checksum() -> str:
    """xxh3-64 when the xxhash package is installed, else BLAKE2b-64 (standard library)."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return FALLBACK_CHECKSUM
    return CHECKSUM


def new_hasher(algorithm: str):
    """A fresh 64-bit hash object (``update``/``digest``/``hexdigest``) of ``algorithm``."""
    if algorithm == FALLBACK_CHECKSUM:
        return hashlib.blake2b(digest_size=8)
    if algorithm != CHECKSUM:
        raise UserError(
            f"unknown checksum algorithm '{algorithm}' (this version of pretrain knows "
            f"{', '.join(CHECKSUMS)}): re-run pretrain prepare"
        )
    try:
        import xxhash
    except ImportError:
        raise UserError(
            f"{CHECKSUM} checksums need the xxhash package: pip install xxhash (or re-run "
            f"pretrain prepare without it, which checksums with {FALLBACK_CHECKSUM})"
        ) from None
    return xxhash.xxh3_64()


def file_checksum(path: str | Path, algorithm: str = CHECKSUM) -> str:
    """A 64-bit hash of the whole file, as ``"ALGORITHM:HEX"`` (e.g. ``"xxh3_64:<hex>"``)."""
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def checksum_algorithm(checksum: str) -> str:
    """The algorithm named by a ``"ALGORITHM:HEX"`` checksum."""
    return checksum.partition(":")[0]


class ShardWriter:
    """Appends whole documents to ``{split}-NNNNN.bin``; a shard closes once it holds
    ``shard_tokens`` tokens (documents never straddle shards), checksummed with ``checksum``."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        checksum: str = CHECKSUM,
    ):
        new_hasher(checksum)  # an unknown or unavailable algorithm fails before any writing
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.shard_tokens, self.checksum = shard_tokens, checksum
        self.entries: list[dict] = []
        self._file = None

    def add(self, tokens: np.ndarray, num_bytes: int) -> None:
        if self._file is None:
            self._open_next()
        self._starts.append(self._num_tokens)
        if len(tokens):
            self._max_id = max(self._max_id, int(tokens.max()))
        self._file.write(tokens.tobytes())
        self._num_tokens += len(tokens)
        self._num_bytes += num_bytes
        if self._num_tokens >= self.shard_tokens:
            self._finish()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.entries

    def _open_next(self) -> None:
        self._name = f"{self.split}-{len(self.entries):05d}.bin"
        self._file = open(self.directory / self._name, "wb", buffering=1 << 22)
        self._file.write(bytes(SHARD_HEADER.size))
        self._starts: list[int] = []
        self._num_tokens = self._num_bytes = 0
        self._max_id = -1

    def _finish(self) -> None:
        f, num_docs = self._file, len(self._starts)
        f.write(bytes(-f.tell() % 8))
        f.write(np.asarray([*self._starts, self._num_tokens], dtype="<u8").tobytes())
        f.seek(0)
        f.write(
            SHARD_HEADER.pack(
                SHARD_MAGIC, FORMAT_VERSION, self.dtype.itemsize, self._num_tokens, num_docs
            )
        )
        f.close()
        self._file = None
        path = self.directory / self._name
        self.entries.append(
            {
                "file": self._name,
                "split": self.split,
                "num_tokens": self._num_tokens,
                "num_docs": num_docs,
                "num_bytes": self._num_bytes,
                "max_token_id": self._max_id,
                "checksum": file_checksum(path, self.checksum),
            }
        )


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a shard: ``(tokens, document starts)``, the starts ending with the token count."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(SHARD_HEADER.size)
    if len(header) < SHARD_HEADER.size:
        raise UserError(f"shard {path} is {len(header)} bytes, shorter than its header")
    magic, version, itemsize, num_tokens, num_docs = SHARD_HEADER.unpack(header)
    if magic != SHARD_MAGIC or version != FORMAT_VERSION or itemsize not in (2, 4):
        raise UserError(
            f"shard {path} has an unknown header (magic {magic!r}, version {version}, item size "
            f"{itemsize}); expected {SHARD_MAGIC!r} version {FORMAT_VERSION}"
        )
    expected = shard_file_size(num_tokens, num_docs, itemsize)
    if path.stat().st_size != expected:
        raise UserError(f"shard {path} is {path.stat().st_size} bytes, its header says {expected}")
    dtype = np.dtype(f"<u{itemsize}")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=SHARD_HEADER.size, shape=(num_tokens,))
    starts = np.memmap(
        path, dtype="<u8", mode="r", offset=_tokens_end(num_tokens, itemsize), shape=(num_docs + 1,)
    )
    return tokens, starts


# ---------------------------------------------------------------------------------------------
# The manifest.


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    num_tokens: int
    num_docs: int
    num_bytes: int
    checksum: str
    path: Path
    max_token_id: int | None = None  # recorded at prepare time (manifests before it: None)


@dataclass
class Manifest:
    """``manifest.json`` of a prepared dataset, with the questions the trainer asks of it."""

    data_dir: Path
    format_version: int
    vocab_size: int
    eos_id: int
    token_dtype: str
    tokenizer_path: Path
    tokenizer_sha256: str
    special_tokens: dict[str, int]
    shards: list[ShardInfo]
    raw: dict[str, Any]

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.split_shards(split))

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text: loss * tokens / (bytes * ln 2) is bits per byte."""
        return sum(s.num_bytes for s in self.split_shards(split))

    def num_docs(self, split: str) -> int:
        return sum(s.num_docs for s in self.split_shards(split))

    def fingerprint(self, split: str) -> str:
        """Identity of the split's token stream: the tokenizer and every shard's checksum."""
        parts = [str(self.format_version), self.tokenizer_sha256, split]
        parts += [f"{s.file}:{s.num_tokens}:{s.checksum}" for s in self.split_shards(split)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and check ``DATA_DIR/manifest.json``; every problem is a :class:`UserError`."""
    data_dir = Path(data_dir)
    hint = f"create it with: pretrain prepare --out {data_dir}"
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found; {hint}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {data_dir} is not a prepared dataset; {hint}")
    try:
        raw = json.loads(path.read_text())
        version = raw["format_version"]
        if version != FORMAT_VERSION:
            raise UserError(
                f"{path} has format version {version}; this version of pretrain reads "
                f"{FORMAT_VERSION}: re-run pretrain prepare"
            )
        shards = [
            ShardInfo(
                file=s["file"],
                split=s["split"],
                num_tokens=int(s["num_tokens"]),
                num_docs=int(s["num_docs"]),
                num_bytes=int(s["num_bytes"]),
                checksum=s["checksum"],
                path=data_dir / s["file"],
                max_token_id=None if s.get("max_token_id") is None else int(s["max_token_id"]),
            )
            for s in raw["shards"]
        ]
        manifest = Manifest(
            data_dir=data_dir,
            format_version=version,
            vocab_size=int(raw["vocab_size"]),
            eos_id=int(raw["eos_id"]),
            token_dtype=raw["token_dtype"],
            tokenizer_path=data_dir / raw["tokenizer"],
            tokenizer_sha256=raw["tokenizer_sha256"],
            special_tokens=dict(raw.get("special_tokens", {})),
            shards=shards,
            raw=raw,
        )
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not a valid manifest ({_one_line(e)}); re-run prepare"
        ) from None
    if not manifest.tokenizer_path.is_file():
        raise UserError(f"{manifest.tokenizer_path} not found (named by {path})")
    verify_tokenizer(manifest)
    return manifest


_TOKENIZER_HASHES: dict[tuple, str] = {}  # file identity -> sha256 of a tokenizer.json


def _file_identity(path: Path) -> tuple:
    """What tells a file from a changed one without reading it: path, size, times, inode."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def verify_tokenizer(manifest: Manifest) -> None:
    """Refuse a ``tokenizer.json`` that is not the one the shards were made with.

    The trainer copies the data's tokenizer into every checkpoint and export, so a swapped one
    would silently pair the model with the wrong vocabulary. Hashed once per file per process.
    """
    path = manifest.tokenizer_path
    key = _file_identity(path)
    if key not in _TOKENIZER_HASHES:
        _TOKENIZER_HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    actual = _TOKENIZER_HASHES[key]
    if actual != manifest.tokenizer_sha256:
        raise UserError(
            f"{path} has sha256 {actual}, but {manifest.data_dir / MANIFEST_FILE} records "
            f"tokenizer_sha256 {manifest.tokenizer_sha256}: it is not the tokenizer the shards "
            "were made with; restore that tokenizer.json, or re-run pretrain prepare --overwrite"
        )


# ---------------------------------------------------------------------------------------------
# prepare


@dataclass
class PrepareStats:
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    empty_documents: int = 0
    replaced_chars: int = 0
    replaced_documents: int = 0
    text_bytes: int = 0
    seconds: float = 0.0


def _recipe(
    sources: list[Source],
    text_field: str,
    vocab_size: int | None,
    tokenizer_sha256: str | None,
    val_fraction: float,
    shard_tokens: int,
    checksum: str = CHECKSUM,
) -> str:
    """A hash of everything that determines the dataset, to tell 'up to date' from 'different'."""
    inputs = []
    for s in sources:
        files = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in s.files]
        inputs.append([s.builder, s.hub_id, s.hub_config, files])
    recipe = [FORMAT_VERSION, inputs, text_field, vocab_size, tokenizer_sha256]
    recipe += [val_fraction, shard_tokens]
    if checksum != CHECKSUM:  # the split depends on it; recipes from before the choice stay valid
        recipe.append(checksum)
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


def _train_split_texts(
    sources: list[Source],
    text_field: str,
    streaming: bool,
    scratch: Path,
    val_fraction: float,
    checksum: str,
) -> Iterator[str]:
    """The train split's non-empty documents, up to TOKENIZER_TRAIN_BYTES of them.

    A long document comes in pieces (:func:`split_long_text`): the trainer counts pre-tokens,
    which the pieces hold exactly as the whole does, at a fraction of the memory.
    """
    seen = 0
    for text in iter_documents(sources, text_field, streaming, scratch):
        data = text.encode()
        if not data or is_val_document(data, val_fraction, checksum):
            continue
        yield from split_long_text(text)
        seen += len(data)
        if seen >= TOKENIZER_TRAIN_BYTES:
            return


def _get_tokenizer(
    tokenizer_file: str | None,
    vocab_size: int,
    train_texts: Iterable[str],
    show_progress: bool,
):
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
        if tokenizer.token_to_id(EOS_TOKEN) is None:
            raise UserError(
                f"tokenizer {tokenizer_file} has no {EOS_TOKEN} token, which separates documents"
            )
        return tokenizer
    return train_tokenizer(train_texts, vocab_size, show_progress=show_progress)


def prepare_dataset(
    out: str | Path,
    inputs: list[str] | None = None,
    *,
    text_field: str = TEXT_FIELD,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int | None = None,
    overwrite: bool = False,
    streaming: bool = False,
    show_progress: bool | None = None,
    checksum: str | None = None,
    log=print,
) -> Manifest:
    """Tokenize ``inputs`` (default: the Python standard library) into ``out``; return its manifest.

    ``vocab_size`` trains a new tokenizer (default 8192); ``tokenizer`` reuses a
    ``tokenizer.json`` instead. ``num_proc`` tokenizer processes (default one per core; 1 runs
    the tokenizer's own threads in this process). ``streaming`` streams Hub datasets (local files
    always are). Re-running with the same inputs and settings finds the dataset up to date and returns it.
    ``checksum`` is the 64-bit hash of the shard checksums and the train/val split (default:
    :func:`default_checksum`).
    """
    if tokenizer is not None and vocab_size is not None:
        raise UserError("give either --vocab-size (train a tokenizer) or --tokenizer, not both")
    if tokenizer is None:
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        if vocab_size < min_vocab_size():
            raise UserError(
                f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                f"{min_vocab_size()} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    num_proc = default_num_proc() if num_proc is None else num_proc
    if num_proc < 1:
        raise UserError(f"--num-proc must be at least 1, got {num_proc}")
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    checksum = default_checksum() if checksum is None else checksum
    new_hasher(checksum)  # an unknown or unavailable algorithm fails before any work
    out = Path(out)
    sources = resolve_inputs(inputs)
    tokenizer_sha = None
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        load_tokenizer(tokenizer)  # a file that does not parse fails here, before any work
        if tokenizer.is_dir():
            tokenizer = tokenizer / TOKENIZER_FILE
        tokenizer_sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    recipe = _recipe(
        sources, text_field, vocab_size, tokenizer_sha, val_fraction, shard_tokens, checksum
    )
    if _check_output_dir(out, recipe, overwrite):
        log(f"{out} is up to date (same inputs and settings); nothing to do")
        return load_manifest(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _prepare_into(
            tmp, sources, text_field, vocab_size, tokenizer, val_fraction, shard_tokens,
            num_proc, streaming, show_progress, recipe, checksum, log,
        )  # fmt: skip
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = load_manifest(out)
    _log_summary(manifest, stats, log)
    return manifest


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
    tmp: Path,
    sources: list[Source],
    text_field: str,
    vocab_size: int | None,
    tokenizer_file: Path | None,
    val_fraction: float,
    shard_tokens: int,
    num_proc: int,
    streaming: bool,
    show_progress: bool,
    recipe: str,
    checksum: str,
    log,
) -> PrepareStats:
    start = time.perf_counter()
    scratch = tmp / "scratch"
    if tokenizer_file is None:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split")
    train_texts = _train_split_texts(
        sources, text_field, streaming, scratch, val_fraction, checksum
    )
    tok = _get_tokenizer(
        None if tokenizer_file is None else str(tokenizer_file), vocab_size, train_texts,
        show_progress,
    )  # fmt: skip
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    else:
        tok.save(str(tmp / TOKENIZER_FILE))
    tokenizer_json = (tmp / TOKENIZER_FILE).read_text()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if tokenizer_file is None and vocab < vocab_size:
        log(
            f"note: the corpus supports only {vocab} tokens (asked for {vocab_size}); vocab_size={vocab}"
        )
    eos_id = tok.token_to_id(EOS_TOKEN)
    dtype = token_dtype_for(vocab)

    stats = PrepareStats()
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens, checksum) for s in ("train", "val")}
    local_bytes = sum(os.path.getsize(f) for s in sources for f in s.files)
    all_text = all(s.builder == "text" for s in sources)
    bar = _progress(local_bytes if all_text else None, "tokenizing", show_progress)
    texts = (
        t
        for t in iter_documents(sources, text_field, streaming, scratch)
        if t or _count_empty(stats)
    )
    for batch, flat, lengths in tokenize_batches(
        tokenizer_json, _batches(texts), eos_id, dtype, num_proc
    ):
        pos = 0
        for text, n in zip(batch, lengths):
            data = text.encode()
            split = "val" if is_val_document(data, val_fraction, checksum) else "train"
            writers[split].add(flat[pos : pos + n], len(data))
            pos += n
            stats.documents[split] += 1
            stats.text_bytes += len(data)
            if (replaced := text.count("\ufffd")) > 0:
                stats.replaced_chars += replaced
                stats.replaced_documents += 1
            bar.update(len(data))
    bar.close()
    shards = writers["train"].close() + writers["val"].close()
    if stats.documents["train"] == 0:
        if stats.documents["val"] == 0:
            raise UserError(
                "the inputs hold no text"
                + (f" ({stats.empty_documents} empty documents)" if stats.empty_documents else "")
            )
        raise UserError(
            f"all {stats.documents['val']} documents fell into the val split; "
            "lower --val-fraction or give more documents"
        )
    stats.seconds = time.perf_counter() - start
    manifest = {
        "format": "pretrain-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest(),
        "vocab_size": vocab,
        "token_dtype": dtype.name,
        "eos_id": eos_id,
        "special_tokens": {
            t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None
        },
        "document_separator": "eos appended after every document",
        "checksum": f"{checksum} over the whole shard file",
        "checksum_algorithm": checksum,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "source": {
            "inputs": [s.label for s in sources],
            "files": sum(len(s.files) for s in sources),
            "text_field": text_field,
        },
        "stats": {
            "documents": stats.documents,
            "empty_documents_skipped": stats.empty_documents,
            "replacement_chars": stats.replaced_chars,
            "documents_with_replacements": stats.replaced_documents,
            "text_bytes": stats.text_bytes,
            "seconds": round(stats.seconds, 3),
        },
        "recipe": recipe,
        "shards": shards,
    }
    _write_json_atomic(tmp / MANIFEST_FILE, manifest)
    return stats


def _count_empty(stats: PrepareStats) -> bool:
    stats.empty_documents += 1
    return False


def _write_json_atomic(path: Path, obj: Any) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=2) + "\n")
    part.replace(path)


def _log_summary(m: Manifest, stats: PrepareStats, log) -> None:
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


# ---------------------------------------------------------------------------------------------
# The loader.


@dataclass
class Batch:
    """This rank's rows of one global batch: ``inputs``/``targets`` int64 ``(G // W, T)``.

    ``doc_ids[b, t]`` numbers the documents within row ``b`` from 0: input tokens with equal ids
    belong to the same document (an end-of-text token belongs to the document it ends).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None


_VERIFIED: dict[tuple, tuple[str, int]] = {}  # file identity -> (checksum, largest token id)


def scan_shard(path: Path, algorithm: str, num_tokens: int, itemsize: int) -> tuple[str, int]:
    """The shard file's checksum and its largest token id (-1 if none), in one read of the file.

    The maximum comes from the bytes the checksum reads anyway (NumPy over each chunk's token
    region), so checking ids against the vocabulary costs next to nothing.
    """
    hasher = new_hasher(algorithm)
    dtype = np.dtype(f"<u{itemsize}")
    begin, end = SHARD_HEADER.size, SHARD_HEADER.size + num_tokens * itemsize
    largest, pos = -1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MiB: a multiple of the item size, as is `begin`
            hasher.update(chunk)
            a, b = max(begin - pos, 0), min(end - pos, len(chunk))
            if a < b:
                ids = np.frombuffer(chunk, dtype, count=(b - a) // itemsize, offset=a)
                largest = max(largest, int(ids.max()))
            pos += len(chunk)
    return f"{algorithm}:{hasher.hexdigest()}", largest


def verify_shard(shard: ShardInfo, itemsize: int, vocab_size: int | None = None) -> None:
    """Refuse a shard whose size, header or checksum disagrees with the manifest, or that holds
    a token id of ``vocab_size`` or more.

    The checksum (a 64-bit hash of the file, its algorithm named by the checksum's prefix) and
    the largest id are computed once per file per process: a fresh loader for every evaluation
    does not re-read the data unless the file changed. The id check does not trust the
    manifest's ``max_token_id``: an id past the embedding table would otherwise fail deep in
    training (on a GPU, as a device-side assert).
    """
    path = shard.path
    if not path.is_file():
        raise UserError(f"shard {path} listed in {MANIFEST_FILE} is missing")
    key = _file_identity(path)
    expected = shard_file_size(shard.num_tokens, shard.num_docs, itemsize)
    if key[1] != expected:
        raise UserError(
            f"shard {path} is {key[1]} bytes, expected {expected} from {MANIFEST_FILE}: "
            "truncated or altered after writing; re-run pretrain prepare"
        )
    cached = _VERIFIED.get(key)
    if cached is None or cached[0] != shard.checksum:
        algorithm = checksum_algorithm(shard.checksum)
        try:
            cached = scan_shard(path, algorithm, shard.num_tokens, itemsize)
        except UserError as e:
            raise UserError(f"shard {path}: {e}") from None
        if cached[0] != shard.checksum:
            raise UserError(
                f"shard {path} has checksum {cached[0]}, expected {shard.checksum} from "
                f"{MANIFEST_FILE}: altered after writing; re-run pretrain prepare"
            )
        _VERIFIED[key] = cached
    largest = cached[1]
    if shard.max_token_id is not None and shard.max_token_id != largest:
        raise UserError(
            f"shard {path} holds ids up to {largest}, but {MANIFEST_FILE} records max_token_id "
            f"{shard.max_token_id}: the manifest was altered; re-run pretrain prepare"
        )
    if vocab_size is not None and largest >= vocab_size:
        raise UserError(
            f"shard {path} holds token id {largest}, but {MANIFEST_FILE} gives vocab_size "
            f"{vocab_size} (ids must be below it): the manifest was edited or the shards come "
            "from another tokenizer; re-run pretrain prepare"
        )
    tokens, starts = read_shard(path)
    if len(tokens) != shard.num_tokens or len(starts) != shard.num_docs + 1:
        raise UserError(f"shard {path}: header counts disagree with {MANIFEST_FILE}")


class TokenStream:
    """A split's shards as one concatenated token sequence, memory-mapped lazily per process."""

    def __init__(self, shards: list[ShardInfo]):
        self.paths = [s.path for s in shards]
        self.token_offsets = np.cumsum([0] + [s.num_tokens for s in shards], dtype=np.int64)
        self.doc_offsets = np.cumsum([0] + [s.num_docs for s in shards], dtype=np.int64)
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.token_offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # worker processes map the files themselves

    @property
    def maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None:
            self._maps = [read_shard(p) for p in self.paths]
        return self._maps

    def _pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, begin, end)`` ranges within shards that cover ``[start, start + length)``."""
        shard = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        end = start + length
        while start < end:
            base = int(self.token_offsets[shard])
            stop = min(end, int(self.token_offsets[shard + 1]))
            yield shard, start - base, stop - base
            start, shard = stop, shard + 1

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` into ``out`` (converting the dtype)."""
        pos = 0
        for shard, begin, end in self._pieces(start, length):
            out[pos : pos + end - begin] = self.maps[shard][0][begin:end]
            pos += end - begin

    def doc_index(self, start: int, length: int, out: np.ndarray) -> None:
        """Global document index of every token in ``[start, start + length)`` into ``out``."""
        pos = 0
        for shard, begin, end in self._pieces(start, length):
            starts = self.maps[shard][1]
            positions = np.arange(begin, end, dtype=np.uint64)
            local = np.searchsorted(starts, positions, side="right").astype(np.int64) - 1
            out[pos : pos + end - begin] = local + self.doc_offsets[shard]
            pos += end - begin


class WindowPlan:
    """The deterministic sample order: which window global sample ``i`` is.

    Windows are ``[j*T, j*T + T + 1)`` for ``j < (N - 1) // T``; epoch ``e`` visits them in the
    order of a permutation seeded by ``(seed, fingerprint, e)``.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, fingerprint: str):
        self.stream, self.seq_len, self.seed, self.fingerprint = stream, seq_len, seed, fingerprint
        self.num_windows = (len(stream) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perms": {}}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            entropy = [self.seed & (2**63 - 1), int(self.fingerprint, 16), epoch]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
            self._perms[epoch] = rng.permutation(self.num_windows)
        return self._perms[epoch]

    def windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of global samples ``first .. first + count - 1``."""
        samples = np.arange(first, first + count, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self.num_windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[offsets[sel]]
        return out

    def rows(self, first: int, count: int, with_doc_ids: bool) -> tuple:
        """Inputs, targets (and doc ids) of global samples ``first .. first + count - 1``.

        NumPy arrays, not tensors: from a worker process they travel pickled through a pipe,
        which for batches this size is several times faster than torch's shared-memory tensors.
        """
        T = self.seq_len
        inputs = np.empty((count, T), dtype=np.int64)
        targets = np.empty((count, T), dtype=np.int64)
        doc_ids = np.empty((count, T), dtype=np.int64) if with_doc_ids else None
        window = np.empty(T + 1, dtype=np.int64)
        for row, w in enumerate(self.windows(first, count)):
            start = int(w) * T
            self.stream.read(start, T + 1, window)
            inputs[row] = window[:-1]
            targets[row] = window[1:]
            if doc_ids is not None:
                self.stream.doc_index(start, T, doc_ids[row])
                doc_ids[row] -= doc_ids[row, 0]
        return inputs, targets, doc_ids


class _RankBatches:
    """One rank's batches from global sample ``start`` on: item ``k`` is its share of global batch
    ``k``. DataLoader workers take items round-robin and hand them out in order."""

    def __init__(self, plan: WindowPlan, start: int, global_batch: int, rank: int, world: int,
                 with_doc_ids: bool):  # fmt: skip
        self.plan, self.start, self.global_batch = plan, start, global_batch
        self.rank, self.world, self.with_doc_ids = rank, world, with_doc_ids

    def __getitem__(self, k: int) -> tuple:
        local = self.global_batch // self.world
        first = self.start + k * self.global_batch + self.rank * local
        return self.plan.rows(first, local, self.with_doc_ids)


def _as_is(batch: tuple) -> tuple:
    return batch


class TokenLoader:
    """Endless batches of ``seq_len`` tokens from a prepared dataset, for one rank.

    The stream is a pure function of (seed, dataset fingerprint, global sample index), so it does
    not depend on the world size or the number of workers, and ``state_dict()`` (the global sample
    position) is all a resume needs.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        return_doc_ids: bool = False,
    ):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size % world_size:
            raise UserError(
                f"global batch size {batch_size} is not divisible by the world size {world_size}: "
                "every rank takes an equal share of each batch"
            )
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.manifest = load_manifest(data_dir)
        shards = self.manifest.split_shards(split)
        if not shards:
            splits = sorted({s.split for s in self.manifest.shards})
            raise UserError(
                f"{self.manifest.data_dir} has no '{split}' split (it has: {', '.join(splits)})"
            )
        itemsize = np.dtype(self.manifest.token_dtype).itemsize
        for shard in shards:
            verify_shard(shard, itemsize, self.manifest.vocab_size)
        stream = TokenStream(shards)
        if len(stream) < seq_len + 1:
            raise UserError(
                f"seq_len {seq_len} is longer than the data: the '{split}' split of "
                f"{self.manifest.data_dir} has {len(stream)} tokens, a window needs {seq_len + 1}"
            )
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.return_doc_ids = return_doc_ids
        self.fingerprint = self.manifest.fingerprint(split)
        self.plan = WindowPlan(stream, seq_len, seed, self.fingerprint)
        self.position = 0  # global sample index of the next batch
        self._workers: Iterator | None = None

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def num_windows(self) -> int:
        """Windows (samples) in one epoch."""
        return self.plan.num_windows

    @property
    def epoch(self) -> int:
        return self.position // self.plan.num_windows

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:
        import torch  # here rather than at the top: `pretrain prepare` never needs it

        inputs, targets, doc_ids = self._next_rows()
        self.position += self.batch_size
        return Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            None if doc_ids is None else torch.from_numpy(doc_ids),
        )

    def _next_rows(self) -> tuple:
        batches = _RankBatches(
            self.plan, self.position, self.batch_size, self.rank, self.world_size,
            self.return_doc_ids,
        )  # fmt: skip
        if self.num_workers == 0:
            return batches[0]
        if self._workers is None:  # started here, at the position to continue from
            from torch.utils.data import DataLoader

            self._workers = iter(
                DataLoader(
                    batches,
                    batch_size=None,
                    sampler=itertools.count(),
                    num_workers=self.num_workers,
                    prefetch_factor=4,
                    collate_fn=_as_is,
                )
            )
        return next(self._workers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; its seed wins, so the resumed stream is the saved one."""
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"loader state is for another dataset (fingerprint {state.get('fingerprint')}, "
                f"{self.manifest.data_dir} '{self.split}' is {self.fingerprint}): resume with the "
                "data the run started with"
            )
        if state.get("seq_len") != self.seq_len:
            raise UserError(
                f"loader state has seq_len {state.get('seq_len')}, this loader {self.seq_len}"
            )
        self.plan = WindowPlan(self.plan.stream, self.seq_len, int(state["seed"]), self.fingerprint)
        self.position = int(state["position"])
        self.close()

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._workers = None


# ---------------------------------------------------------------------------------------------
# The command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenize raw text into checksummed token shards for training.\n\n"
        "With no --input the corpus is this Python's standard library sources (*.py), which\n"
        "works offline. Inputs: text files (one file = one document), JSON/JSONL/Parquet/CSV\n"
        "files (one row = one document), directories, globs, or Hugging Face dataset ids\n"
        "(owner/name or owner/name:config)."
    )
    parser.add_argument("--out", required=True, help="output directory, e.g. data/stdlib")
    parser.add_argument(
        "--input",
        dest="inputs",
        action="extend",
        nargs="+",
        metavar="PATH|GLOB|HF_ID",
        help="text to tokenize (repeatable; default: the Python standard library)",
    )
    parser.add_argument(
        "--text-field", default=TEXT_FIELD, help="column holding the text (default: text)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--vocab-size",
        type=int,
        help=f"train a byte-level BPE tokenizer of this size (default {DEFAULT_VOCAB_SIZE})",
    )
    group.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"fraction of documents held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="tokenizer processes (default: one per core; 1: in this process, the tokenizer's "
        "own threads)",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="stream a Hugging Face dataset instead of downloading it (local files always stream)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    prepare_dataset(
        args.out,
        args.inputs,
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        num_proc=args.num_proc,
        overwrite=args.overwrite,
        streaming=args.streaming,
    )
    return 0
