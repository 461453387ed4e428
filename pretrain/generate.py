"""``pretrain generate``: print a continuation of a prompt from an export.

Decoding runs the model's full forward over the growing sequence at every step: no cache, so
the logits are exactly those of training and of the logits check against transformers. It stops
at an end token of the export's ``generation_config.json``, after ``--max-tokens`` tokens, or when
the sequence fills the model's context.

With ``--chat`` the prompt is the user's turn of a conversation (after a ``--system`` turn, if
given), rendered with the export's chat template and its generation prompt and tokenized piece by
piece exactly as fine-tuning tokenizes its rows (``pretrain.sft``), so a fine-tuned model is asked
the way it was trained.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence

import torch

from pretrain.chat import ChatTemplate
from pretrain.errors import UserError
from pretrain.inference import load_for_inference, stop_token_ids
from pretrain.sampling import sample_next_token
from pretrain.text import IncrementalDetokenizer

__all__ = ["chat_prompt_ids", "generate", "generate_tokens", "run", "stop_token_ids"]


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


def chat_prompt_ids(
    template: ChatTemplate, tokenizer, prompt: str, system: str | None = None
) -> list[int]:
    """The token ids of ``prompt`` as a user's turn (after ``system``'s) with the generation
    prompt: the pieces fine-tuning tokenizes one by one, so the ids are those it trained on."""
    from jinja2.exceptions import TemplateError

    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    try:
        pieces = [text for text, _ in template.segments(messages)]
        done = template.render(messages)
        with_header = template.render(messages, add_generation_prompt=True)
    except TemplateError as e:
        raise UserError(f"the chat template failed: {e}") from None
    if not with_header.startswith(done):
        raise UserError(
            "the chat template's generation prompt is not an addition to the conversation, "
            "so it cannot be rendered as fine-tuning renders it"
        )
    pieces.append(with_header[len(done) :])
    encodings = tokenizer.encode_batch([p for p in pieces if p], add_special_tokens=False)
    return [i for encoding in encodings for i in encoding.ids]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", metavar="DIR", help="an export directory (pretrain export)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the export's chat template",
    )
    parser.add_argument(
        "--system", metavar="TEXT", default=None, help="a system message before it (with --chat)"
    )
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
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 is off), got {args.top_k}")
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat (a system message is part of a chat)")


def prompt_ids(loaded, args: argparse.Namespace) -> list[int]:
    """The prompt's token ids: the text as is, or rendered as a chat with ``--chat``."""
    if not args.chat:
        return loaded.tokenizer.encode(args.prompt).ids or loaded.eos_ids[:1]
    if loaded.chat_template is None:
        raise UserError(
            f"{args.export} has no chat template (tokenizer_config.json 'chat_template'), so "
            "--chat cannot render the prompt; give the prompt as plain text without --chat"
        )
    return chat_prompt_ids(loaded.chat_template, loaded.tokenizer, args.prompt, args.system)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    loaded = load_for_inference(args.export, args.device, dtype=None)  # the export's own dtype
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = prompt_ids(loaded, args)
    if len(ids) >= loaded.max_len:
        raise UserError(
            f"the prompt is {len(ids)} tokens; the model's context holds "
            f"{loaded.max_len}, leaving no room to generate"
        )
    stop = loaded.eos_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in generate_tokens(
        model,
        ids,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=stop,
    ):
        if token in stop:
            break
        sys.stdout.write(detokenizer.push(token))  # "" until a character is whole
        sys.stdout.flush()
    sys.stdout.write(detokenizer.flush() + "\n")
    return 0
