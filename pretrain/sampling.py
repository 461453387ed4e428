"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Shared by ``pretrain generate`` and the server, so that a prompt with the same settings and seed
gives the same tokens in both. Every setting may be one value for the whole batch or one value
per row, because the server batches requests that asked for different things; likewise
``generator`` may be one :class:`torch.Generator` or one per row, so that a seeded request draws
the same numbers whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PerRow = float | int | None | Sequence[float | int | None] | torch.Tensor

# A temperature below this is greedy. Dividing float32 logits by a smaller one overflows to inf
# (1e-300 is 0 in float32), and softmax of inf - inf is NaN; the distribution at such a
# temperature is the argmax in all but exact ties anyway (vLLM uses the same bound).
GREEDY_BELOW = 1e-5


def _per_row(value: PerRow, batch: int, name: str, off: float) -> list[float]:
    """One number per row; ``None`` means the setting is off and becomes ``off``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = list(value) if isinstance(value, Sequence) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch} rows")
    return [off if v is None else float(v) for v in values]


def check_settings(temperature: float, top_p: float, top_k: float) -> None:
    """Refuse one row's settings that cannot be sampled with (ValueError naming the setting).

    ``not x >= 0`` rather than ``x < 0``, so that NaN is refused too.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (top_k >= 0 and top_k == int(top_k)):
        raise ValueError(f"top_k must be a whole number >= 0 (0: off), got {top_k}")


def _check_settings(temperature: list[float], top_p: list[float], top_k: list[float]) -> None:
    for t, p, k in zip(temperature, top_p, top_k):
        check_settings(t, p, k)


def filter_logits(
    logits: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus.

    ``top_k`` (B,) counts tokens (0: off; ties with the k-th value are kept). ``top_p`` (B,) is the
    smallest set of most likely tokens whose probability reaches ``top_p`` (1: off); the most
    likely token always stays.
    """
    V = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V)).long()
    kth_value = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))

    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside_nucleus = mass_before >= top_p.to(probs.dtype)[:, None]
    outside_nucleus[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


def _draw(
    probs: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    rows: list[int],
) -> torch.Tensor:
    """One token per row of ``probs``; row i belongs to batch row ``rows[i]`` (and its generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    drawn = [torch.multinomial(probs[i], 1, generator=generator[r]) for i, r in enumerate(rows)]
    return torch.cat(drawn)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_p: PerRow = 1.0,
    top_k: PerRow = 0,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """The next token id (B,) for each row of ``logits`` (B, V).

    ``temperature`` 0 (or ``None``, or below :data:`GREEDY_BELOW`) is greedy: the argmax, with no
    random draw. Otherwise the logits are divided by the temperature, filtered to the top
    ``top_k`` tokens (0 or ``None``: all), then to the top-``top_p`` nucleus (1 or ``None``: all),
    and one token is drawn from what is left. Bad settings raise :class:`ValueError`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    if isinstance(generator, Sequence) and len(generator) != B:
        raise ValueError(f"{len(generator)} generators for a batch of {B} rows")
    temperature_ = _per_row(temperature, B, "temperature", off=0.0)
    top_p_ = _per_row(top_p, B, "top_p", off=1.0)
    top_k_ = _per_row(top_k, B, "top_k", off=0.0)
    _check_settings(temperature_, top_p_, top_k_)

    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperature_) if t >= GREEDY_BELOW]
    if not rows:
        return tokens
    device = logits.device
    index = torch.tensor(rows, device=device)
    scaled = logits[index] / torch.tensor([temperature_[r] for r in rows], device=device)[:, None]
    if any(top_k_[r] > 0 or top_p_[r] < 1 for r in rows):
        scaled = filter_logits(
            scaled,
            top_k=torch.tensor([top_k_[r] for r in rows], device=device),
            top_p=torch.tensor([top_p_[r] for r in rows], device=device),
        )
    tokens[index] = _draw(scaled.softmax(dim=-1), generator, rows)
    return tokens
