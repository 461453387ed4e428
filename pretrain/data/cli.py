"""``pretrain prepare``: the command line of :func:`pretrain.data.prepare.prepare_dataset`."""

from __future__ import annotations

import argparse

from pretrain.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    PrepareOptions,
    prepare_dataset,
)
from pretrain.data.sources import TEXT_FIELD


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
    options = PrepareOptions(
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        num_proc=args.num_proc,
        overwrite=args.overwrite,
        streaming=args.streaming,
    )
    prepare_dataset(args.out, args.inputs, options)
    return 0
