"""``pretrain generate``: print a continuation of a prompt from an export.

Decoding runs the model's full forward over the growing sequence at every step: no cache, so
the logits are exactly those of training and of the logits check against transformers. It stops
at an end token of the export's ``generation_config.json``, after ``--max-tokens`` tokens, or when
the sequence fills the model's context.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.sampling import sample_next_token


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids one at a time; a stop token is yielded, then generation ends."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    stop = set(stop_ids)
    for _ in range(max_tokens):
        if ids.shape[1] >= model.config.max_seq_len:
            return
        logits = model(ids)[:, -1].float()
        token = sample_next_token(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
        )
        yield int(token)
        if int(token) in stop:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)


def generate(model, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new token ids after ``prompt_ids``; keyword arguments as :func:`generate_tokens`."""
    return list(generate_tokens(model, prompt_ids, **kwargs))


def stop_token_ids(export_dir: str | Path) -> list[int]:
    """The end tokens of an export's ``generation_config.json`` (one id or a list)."""
    from pretrain.hf import GENERATION_CONFIG, read_json

    path = Path(export_dir) / GENERATION_CONFIG
    eos = read_json(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{path}: 'eos_token_id' must be a token id or a list of them, got {eos!r}")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", metavar="DIR", help="an export directory (pretrain export)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (128)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy decoding (default 0.8)"
    )
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1 is off (0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest, 0 is off (0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 is off), got {args.top_k}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return device


def run(args: argparse.Namespace) -> int:
    from pretrain.hf import TOKENIZER
    from pretrain.model import Transformer
    from pretrain.tokenizer import load_tokenizer

    _check_args(args)
    device = _device(args.device)
    model = Transformer.from_pretrained(args.export, device=device)
    tokenizer = load_tokenizer(Path(args.export) / TOKENIZER)  # checked with the weights
    prompt_ids = tokenizer.encode(args.prompt).ids or stop_token_ids(args.export)[:1]
    if len(prompt_ids) >= model.config.max_seq_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens; the model's context holds "
            f"{model.config.max_seq_len}, leaving no room to generate"
        )
    stop = stop_token_ids(args.export)
    new_ids: list[int] = []
    printed = ""
    for token in generate_tokens(
        model,
        prompt_ids,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=stop,
    ):
        if token in stop:
            break
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(new_ids)[len(printed) :] + "\n")
    return 0
