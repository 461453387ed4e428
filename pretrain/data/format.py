"""The on-disk contract of a prepared dataset: shard files, ``manifest.json`` and their checks.

This is the only module both sides import: :mod:`pretrain.data.prepare` writes what is
described here, :mod:`pretrain.data.loader` reads and verifies it.

Shard file (little-endian), ``{split}-{index:05d}.bin``::

    header  32 bytes   magic b"PTTOKENS", u32 format version, u32 token item size (2 or 4),
                       u64 token count N, u64 document count D
    tokens  N items    uint16 when the vocabulary fits, else uint32; zero-padded to 8 bytes
    starts  D+1 u64    token offset of each document in the shard, then N

``manifest.json`` records, per shard, its split, token/document/UTF-8 byte counts, its largest
token id and a checksum of the whole file (``"ALGORITHM:HEX"``), which the loader verifies before
it reads a token, together with the tokenizer's SHA-256 and every id being below ``vocab_size``.
The algorithm (``checksum_algorithm`` in the manifest) also decides the train/val split:
xxh3-64 when ``xxhash`` is installed, else BLAKE2b-64 from the standard library.

Hashing a large shard takes seconds, so what a process has verified is remembered in a
:class:`VerifiedShards`, keyed by the file's identity (path, size, times, inode): a changed
file is hashed again, an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_MAGIC = b"PTTOKENS"
SHARD_HEADER = struct.Struct("<8sIIQQ")  # magic, version, token item size, tokens, documents

CHECKSUM = "xxh3_64"  # preferred: several GB/s, needs the xxhash package
FALLBACK_CHECKSUM = "blake2b_64"  # standard library (hashlib), about 1 GB/s
CHECKSUMS = (CHECKSUM, FALLBACK_CHECKSUM)


def one_line(e: BaseException) -> str:
    """An exception as one short line (type and text), for a :class:`UserError` message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# --- checksums -----------------------------------------------------------------------------------


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


# --- shards --------------------------------------------------------------------------------------


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest token type that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokens_end(num_tokens: int, itemsize: int) -> int:
    """Byte offset where the (8-byte aligned) document starts begin."""
    end = SHARD_HEADER.size + num_tokens * itemsize
    return end + (-end) % 8


def shard_file_size(num_tokens: int, num_docs: int, itemsize: int) -> int:
    """The exact size of a shard file with these counts."""
    return _tokens_end(num_tokens, itemsize) + 8 * (num_docs + 1)


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
        """Append one document's tokens (its EOS included) and its UTF-8 size."""
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
        """Finish the open shard; the manifest entries of every shard written."""
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


# --- the manifest --------------------------------------------------------------------------------


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


def load_manifest(data_dir: str | Path, verified: VerifiedShards | None = None) -> Manifest:
    """Read and check ``DATA_DIR/manifest.json``; every problem is a :class:`UserError`.

    ``verified`` remembers the tokenizer's hash (default: this process's shared record).
    """
    data_dir = Path(data_dir)
    hint = f"create it with: pretrain prepare --out {data_dir}"
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found; {hint}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {data_dir} is not a prepared dataset; {hint}")
    try:
        manifest = _parse_manifest(data_dir, json.loads(path.read_text()), path)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid manifest ({one_line(e)}); re-run prepare") from None
    if not manifest.tokenizer_path.is_file():
        raise UserError(f"{manifest.tokenizer_path} not found (named by {path})")
    verify_tokenizer(manifest, verified)
    return manifest


def _parse_manifest(data_dir: Path, raw: dict[str, Any], path: Path) -> Manifest:
    """The manifest's fields, typed; a missing or mistyped field raises KeyError/TypeError/..."""
    version = raw["format_version"]
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {version}; this version of pretrain reads "
            f"{FORMAT_VERSION}: re-run pretrain prepare"
        )
    return Manifest(
        data_dir=data_dir,
        format_version=version,
        vocab_size=int(raw["vocab_size"]),
        eos_id=int(raw["eos_id"]),
        token_dtype=raw["token_dtype"],
        tokenizer_path=data_dir / raw["tokenizer"],
        tokenizer_sha256=raw["tokenizer_sha256"],
        special_tokens=dict(raw.get("special_tokens", {})),
        shards=[_parse_shard(data_dir, s) for s in raw["shards"]],
        raw=raw,
    )


def _parse_shard(data_dir: Path, s: dict[str, Any]) -> ShardInfo:
    return ShardInfo(
        file=s["file"],
        split=s["split"],
        num_tokens=int(s["num_tokens"]),
        num_docs=int(s["num_docs"]),
        num_bytes=int(s["num_bytes"]),
        checksum=s["checksum"],
        path=data_dir / s["file"],
        max_token_id=None if s.get("max_token_id") is None else int(s["max_token_id"]),
    )


# --- verification --------------------------------------------------------------------------------


def _file_identity(path: Path) -> tuple:
    """What tells a file from a changed one without reading it: path, size, times, inode."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


class VerifiedShards:
    """The hashes this process has computed, by file identity, so an unchanged file is read once.

    Holds each shard's ``(checksum, largest token id)`` and each tokenizer's SHA-256. Whoever
    makes loaders (the trainer's loader factory) owns one and hands it to every loader it makes,
    so a fresh loader for every evaluation does not re-read the data; its lifetime is the
    owner's. Callers that pass none share :data:`PROCESS_VERIFIED`.
    """

    def __init__(self) -> None:
        self._shards: dict[tuple, tuple[str, int]] = {}
        self._tokenizers: dict[tuple, str] = {}

    def scan(self, shard: ShardInfo, itemsize: int, identity: tuple) -> tuple[str, int]:
        """``(checksum, largest id)`` of the shard, read from the file unless already known."""
        cached = self._shards.get(identity)
        if cached is not None and cached[0] == shard.checksum:
            return cached
        algorithm = checksum_algorithm(shard.checksum)
        try:
            cached = scan_shard(shard.path, algorithm, shard.num_tokens, itemsize)
        except UserError as e:
            raise UserError(f"shard {shard.path}: {e}") from None
        if cached[0] != shard.checksum:
            raise UserError(
                f"shard {shard.path} has checksum {cached[0]}, expected {shard.checksum} from "
                f"{MANIFEST_FILE}: altered after writing; re-run pretrain prepare"
            )
        self._shards[identity] = cached
        return cached

    def tokenizer_sha256(self, path: Path) -> str:
        """SHA-256 of a ``tokenizer.json``, hashed once per file identity."""
        key = _file_identity(path)
        if key not in self._tokenizers:
            self._tokenizers[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._tokenizers[key]


PROCESS_VERIFIED = VerifiedShards()  # for loaders and manifests whose caller passes none


def verify_tokenizer(manifest: Manifest, verified: VerifiedShards | None = None) -> None:
    """Refuse a ``tokenizer.json`` that is not the one the shards were made with.

    The trainer copies the data's tokenizer into every checkpoint and export, so a swapped one
    would silently pair the model with the wrong vocabulary. Hashed once per file per
    :class:`VerifiedShards`.
    """
    path = manifest.tokenizer_path
    actual = (PROCESS_VERIFIED if verified is None else verified).tokenizer_sha256(path)
    if actual != manifest.tokenizer_sha256:
        raise UserError(
            f"{path} has sha256 {actual}, but {manifest.data_dir / MANIFEST_FILE} records "
            f"tokenizer_sha256 {manifest.tokenizer_sha256}: it is not the tokenizer the shards "
            "were made with; restore that tokenizer.json, or re-run pretrain prepare --overwrite"
        )


def verify_shard(
    shard: ShardInfo,
    itemsize: int,
    vocab_size: int | None = None,
    verified: VerifiedShards | None = None,
) -> None:
    """Refuse a shard whose size, header or checksum disagrees with the manifest, or that holds
    a token id of ``vocab_size`` or more.

    The checksum (a 64-bit hash of the file, its algorithm named by the checksum's prefix) and
    the largest id are computed once per file per :class:`VerifiedShards`. The id check does
    not trust the manifest's ``max_token_id``: an id past the embedding table would otherwise
    fail deep in training (on a GPU, as a device-side assert).
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
    _, largest = (PROCESS_VERIFIED if verified is None else verified).scan(shard, itemsize, key)
    _check_token_ids(shard, largest, vocab_size)
    tokens, starts = read_shard(path)
    if len(tokens) != shard.num_tokens or len(starts) != shard.num_docs + 1:
        raise UserError(f"shard {path}: header counts disagree with {MANIFEST_FILE}")


def _check_token_ids(shard: ShardInfo, largest: int, vocab_size: int | None) -> None:
    """Refuse a shard whose largest id is not the manifest's, or not below the vocabulary."""
    if shard.max_token_id is not None and shard.max_token_id != largest:
        raise UserError(
            f"shard {shard.path} holds ids up to {largest}, but {MANIFEST_FILE} records "
            f"max_token_id {shard.max_token_id}: the manifest was altered; re-run pretrain prepare"
        )
    if vocab_size is not None and largest >= vocab_size:
        raise UserError(
            f"shard {shard.path} holds token id {largest}, but {MANIFEST_FILE} gives vocab_size "
            f"{vocab_size} (ids must be below it): the manifest was edited or the shards come "
            "from another tokenizer; re-run pretrain prepare"
        )
