"""Packed vs padded fine-tuning batches: conversations trained per second, side by side.

Both modes train the same model (configs/tiny.toml's shape by default) on the same conversations,
with the same global batch of rows and the same optimizer; only the batching differs:

- packed: several conversations per row of ``seq_len`` positions, ``doc_ids`` keeping attention
  inside each (what ``pretrain finetune`` does by default, ``finetune.packing = true``);
- padded: one conversation per row, padded to the longest of the batch (a multiple of 8).

Each mode runs ``--steps`` timed training steps after a warm-up step, alternating modes in
``--repeats`` rounds so that machine noise hits both alike; the table reports medians of the step
time, conversations per second and trained (completion) tokens per second, and the ratio.

    python scripts/bench_finetune_packing.py --tokenizer data/stdlib/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from finetune_demo import toy_rows  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.model import Transformer  # noqa: E402
from pretrain.sft import (  # noqa: E402
    IGNORE_INDEX,
    ChatTemplate,
    SFTLoader,
    fit_to_context,
    row_to_messages,
    tokenize_conversations,
)
from pretrain.tokenizer import EOS_TOKEN, load_tokenizer  # noqa: E402


def mixed_rows(n: int, seed: int) -> list[dict]:
    """Conversations of widely varying length: prompts and answers of 3 to ~150 words."""
    rng = np.random.default_rng(seed)
    words = "the a model data token train loss step batch row value field table query list".split()
    rows = []
    for _ in range(n):
        n_prompt = int(np.clip(rng.lognormal(3.0, 0.8), 3, 150))
        n_answer = int(np.clip(rng.lognormal(2.5, 0.9), 1, 120))
        rows.append(
            {
                "prompt": " ".join(rng.choice(words, n_prompt)),
                "completion": " ".join(rng.choice(words, n_answer)),
            }
        )
    return rows


def conversations_in(batch) -> int:
    """Conversations in a batch: per packed row, the documents that have a trained target."""
    if batch.doc_ids is None:
        return batch.inputs.shape[0]
    trained = batch.targets != IGNORE_INDEX
    return sum(len(torch.unique(ids[mask])) for ids, mask in zip(batch.doc_ids, trained))


def next_batch(loader: SFTLoader, device: str):
    batch = next(loader)
    batch.inputs, batch.targets = batch.inputs.to(device), batch.targets.to(device)
    if batch.doc_ids is not None:
        batch.doc_ids = batch.doc_ids.to(device)
    return batch


def time_steps(model, optimizer, loader, steps: int, micro: int, device: str):
    """(seconds, conversations, trained tokens) of each of ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        batch = next_batch(loader, device)
        n_trained = int((batch.targets != IGNORE_INDEX).sum())
        n_convs = conversations_in(batch)
        start = time.perf_counter()
        for i in range(0, batch.inputs.shape[0], micro):
            sl = slice(i, i + micro)
            doc_ids = None if batch.doc_ids is None else batch.doc_ids[sl]
            loss = model(batch.inputs[sl], batch.targets[sl], doc_ids=doc_ids, reduction="sum")
            (loss / n_trained).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - start, n_convs, n_trained))
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", default="data/stdlib/tokenizer.json")
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--data", choices=["toy", "mixed"], nargs="+", default=["toy", "mixed"])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="rows per optimizer step")
    p.add_argument("--micro", type=int, default=8, help="rows per forward pass")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.tokenizer)
    cfg = load_config(args.config).model
    cfg.vocab_size = max(cfg.vocab_size, tokenizer.get_vocab_size())
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    template = ChatTemplate()
    results = []
    for data in args.data:
        rows = toy_rows(args.rows, seed=0) if data == "toy" else mixed_rows(args.rows, seed=0)
        examples = tokenize_conversations([row_to_messages(r) for r in rows], tokenizer, template)
        docs, fit = fit_to_context(examples, args.seq_len)
        timings: dict[str, list[tuple[float, int, int]]] = {"packed": [], "padded": []}
        for _ in range(args.repeats):
            for mode in timings:
                model = Transformer(cfg).to(device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                loader = SFTLoader(
                    docs,
                    seq_len=args.seq_len,
                    global_batch_size=args.batch,
                    packing=mode == "packed",
                    pad_id=tokenizer.token_to_id(EOS_TOKEN),
                    seed=1,
                )
                time_steps(model, optimizer, loader, 1, args.micro, device)  # warm-up
                timings[mode] += time_steps(
                    model, optimizer, loader, args.steps, args.micro, device
                )
        row = {"data": data, "conversations": fit.kept, "mean_tokens": fit.total_tokens / fit.kept}
        for mode, ts in timings.items():
            row[f"{mode}_step_s"] = statistics.median(t for t, _, _ in ts)
            row[f"{mode}_conv_per_s"] = statistics.median(c / t for t, c, _ in ts)
            row[f"{mode}_trained_tok_per_s"] = statistics.median(k / t for t, _, k in ts)
        row["speedup"] = row["packed_conv_per_s"] / row["padded_conv_per_s"]
        results.append(row)

    print(
        f"device: {device}; rows per step {args.batch}, seq_len {args.seq_len}, "
        f"{args.steps} steps x {args.repeats} repeats per mode (medians)"
    )
    head = f"{'data':6} {'convs':>6} {'tok/conv':>8} {'mode':7} {'step s':>7} {'conv/s':>8} {'trained tok/s':>13}"
    print(head)
    for r in results:
        for mode in ("packed", "padded"):
            print(
                f"{r['data']:6} {r['conversations']:6d} {r['mean_tokens']:8.1f} {mode:7} "
                f"{r[f'{mode}_step_s']:7.3f} {r[f'{mode}_conv_per_s']:8.1f} "
                f"{r[f'{mode}_trained_tok_per_s']:13.1f}"
            )
        print(f"{r['data']:6} packed / padded conversations per second: {r['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
