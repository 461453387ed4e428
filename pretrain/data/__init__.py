"""Tokenized data: ``pretrain prepare`` writes checksummed token shards, ``TokenLoader`` reads them.

The package, bottom up (each module imports only those above it in this list):

- :mod:`~pretrain.data.format`: the on-disk contract (shard files, ``manifest.json``,
  checksums and their verification), the only module both sides import;
- :mod:`~pretrain.data.sources`: the inputs and reading their documents;
- :mod:`~pretrain.data.tokenize`: documents to token ids, in a pool of processes;
- :mod:`~pretrain.data.prepare`: :func:`prepare_dataset`, which writes a dataset;
- :mod:`~pretrain.data.loader`: :class:`Batch`, the :class:`Loader` protocol and
  :class:`TokenLoader`, which reads one;
- :mod:`~pretrain.data.cli`: ``pretrain prepare``.

Everything needs only numpy and tokenizers (and torch to load batches); ``datasets`` (Parquet,
CSV, Hub inputs), ``xxhash`` (faster checksums) and ``tqdm`` (progress) are used when present.
This module re-exports the names callers use, so ``from pretrain.data import TokenLoader``
works without knowing the layout.
"""

from pretrain.data.format import (
    CHECKSUM,
    CHECKSUMS,
    FALLBACK_CHECKSUM,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARD_HEADER,
    SHARD_MAGIC,
    TOKENIZER_FILE,
    Manifest,
    ShardInfo,
    ShardWriter,
    VerifiedShards,
    checksum_algorithm,
    default_checksum,
    file_checksum,
    load_manifest,
    new_hasher,
    read_shard,
    scan_shard,
    shard_file_size,
    token_dtype_for,
    verify_shard,
    verify_tokenizer,
)
from pretrain.data.loader import Batch, Loader, TokenLoader, TokenStream, WindowPlan
from pretrain.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    TOKENIZER_TRAIN_BYTES,
    PrepareOptions,
    PrepareStats,
    is_val_document,
    prepare_dataset,
)
from pretrain.data.sources import (
    TEXT_FIELD,
    Source,
    default_corpus_files,
    default_corpus_label,
    iter_documents,
    resolve_inputs,
)
from pretrain.data.tokenize import (
    BATCH_TEXT_CHARS,
    PIECE_CHARS,
    default_num_proc,
    piece_limit,
    split_long_text,
    tokenize_batches,
)

__all__ = [
    "BATCH_TEXT_CHARS",
    "CHECKSUM",
    "CHECKSUMS",
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_VOCAB_SIZE",
    "FALLBACK_CHECKSUM",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PIECE_CHARS",
    "SHARD_HEADER",
    "SHARD_MAGIC",
    "TEXT_FIELD",
    "TOKENIZER_FILE",
    "TOKENIZER_TRAIN_BYTES",
    "Batch",
    "Loader",
    "Manifest",
    "PrepareOptions",
    "PrepareStats",
    "ShardInfo",
    "ShardWriter",
    "Source",
    "TokenLoader",
    "TokenStream",
    "VerifiedShards",
    "WindowPlan",
    "checksum_algorithm",
    "default_checksum",
    "default_corpus_files",
    "default_corpus_label",
    "default_num_proc",
    "file_checksum",
    "is_val_document",
    "iter_documents",
    "load_manifest",
    "new_hasher",
    "piece_limit",
    "prepare_dataset",
    "read_shard",
    "resolve_inputs",
    "scan_shard",
    "shard_file_size",
    "split_long_text",
    "token_dtype_for",
    "tokenize_batches",
    "verify_shard",
    "verify_tokenizer",
]
