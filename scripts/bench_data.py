"""Benchmark the data pipeline against plain baselines, side by side in one run.

1. Preparation throughput (MB of text per second) on the default corpus (the Python standard
   library): ``prepare_dataset`` with a given tokenizer (reading through ``datasets``, splitting,
   tokenizing, writing and checksumming shards) against the same tokenizer's own
   ``encode_batch`` over the same texts already in memory, in one process.
2. Loader throughput (tokens per second delivered as batches): ``TokenLoader`` against a
   nanoGPT-style ``get_batch`` (a fresh ``np.memmap`` per batch, random windows, ``torch.stack``)
   over the same shard.

Prints a table of medians over repeats and ratios (ours / baseline), and writes JSON.

    python scripts/bench_data.py [--repeats 3] [--out bench-results/bench_data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import (  # noqa: E402
    TokenLoader,
    default_corpus_files,
    load_manifest,
    prepare_dataset,
)
from pretrain.tokenizer import load_tokenizer  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_prepare(work: Path, vocab_size: int, repeats: int) -> list[dict]:
    """Our prepare (given tokenizer) against encode_batch over the same in-memory texts."""
    quiet = {"log": lambda *a: None, "show_progress": False}
    start = time.perf_counter()
    trained = prepare_dataset(work / "trained", vocab_size=vocab_size, **quiet)
    train_seconds = time.perf_counter() - start
    tokenizer_file = trained.tokenizer_path
    # The texts as prepare reads them: whole files, universal newlines, bad bytes replaced.
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in default_corpus_files()]
    texts = [t for t in texts if t]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = load_tokenizer(tokenizer_file)

    def baseline():
        return [e.ids for e in tokenizer.encode_batch(texts)]

    def ours(num_proc: int):
        def run():
            prepare_dataset(
                work / "ours",
                tokenizer=tokenizer_file,
                num_proc=num_proc,
                overwrite=True,
                **quiet,
            )

        return run

    base_tokens = sum(len(ids) for ids in baseline())
    results = []
    rows = [("tokenizer encode_batch (in memory)", baseline)]
    rows += [(f"pretrain prepare --num-proc {n}", ours(n)) for n in (1, 2)]
    timings = {name: [] for name, _ in rows}
    for _ in range(repeats):  # interleaved, so load on the machine hits every row alike
        for name, fn in rows:
            timings[name] += [median_time(fn, 1)[1][0]]
    ours_tokens = load_manifest(work / "ours")
    assert ours_tokens.num_tokens("train") + ours_tokens.num_tokens("val") == base_tokens + len(
        texts
    ), "prepare and encode_batch disagree on the token count"
    base_median = statistics.median(timings[rows[0][0]])
    for name, _ in rows:
        med = statistics.median(timings[name])
        results.append(
            {
                "bench": "prepare",
                "name": name,
                "median_s": med,
                "times_s": timings[name],
                "MB_per_s": megabytes / med,
                "ratio_vs_baseline": base_median / med,
            }
        )
    results.append(
        {
            "bench": "prepare",
            "name": f"pretrain prepare incl. tokenizer training (vocab {vocab_size})",
            "median_s": train_seconds,
            "times_s": [train_seconds],
            "MB_per_s": megabytes / train_seconds,
            "ratio_vs_baseline": base_median / train_seconds,
        }
    )
    return results


def nanogpt_get_batch(path: Path, num_tokens: int, offset: int, batch: int, block: int):
    """nanoGPT's get_batch: a fresh memmap each call (it leaks otherwise), random windows."""
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(num_tokens,))
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
    return x, y


def bench_loader(data_dir: Path, batch: int, seq_len: int, steps: int, repeats: int) -> list[dict]:
    m = load_manifest(data_dir)
    (shard,) = m.split_shards("train")
    tokens_per_run = steps * batch * seq_len

    def baseline():
        for _ in range(steps):
            nanogpt_get_batch(shard.path, shard.num_tokens, 32, batch, seq_len)

    def ours(**kwargs):
        def run():
            loader = TokenLoader(data_dir, seq_len=seq_len, batch_size=batch, seed=0, **kwargs)
            for _ in range(steps):
                next(loader)
            loader.close()

        return run

    rows = [
        ("nanoGPT get_batch (np.memmap)", baseline),
        ("TokenLoader", ours()),
        ("TokenLoader return_doc_ids", ours(return_doc_ids=True)),
        ("TokenLoader num_workers=2", ours(num_workers=2)),
    ]
    timings = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            timings[name] += [median_time(fn, 1)[1][0]]
    base_median = statistics.median(timings[rows[0][0]])
    return [
        {
            "bench": "loader",
            "name": name,
            "median_s": statistics.median(timings[name]),
            "times_s": timings[name],
            "tokens_per_s": tokens_per_run / statistics.median(timings[name]),
            "ratio_vs_baseline": base_median / statistics.median(timings[name]),
        }
        for name, _ in rows
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--out", default="bench-results/bench_data.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        results = bench_prepare(work, args.vocab_size, args.repeats)
        results += bench_loader(
            work / "ours", args.batch_size, args.seq_len, args.loader_steps, args.repeats + 2
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'benchmark':<68} {'median':>9} {'throughput':>16} {'vs baseline':>12}")
    for r in results:
        speed = (
            f"{r['MB_per_s']:.2f} MB/s"
            if r["bench"] == "prepare"
            else f"{r['tokens_per_s'] / 1e6:.2f} M tok/s"
        )
        print(
            f"{r['bench'] + ': ' + r['name']:<68} {r['median_s']:>8.2f}s {speed:>16} "
            f"{r['ratio_vs_baseline']:>11.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "args": vars(args),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
