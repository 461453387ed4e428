"""Linear layer followed by cross-entropy, the language-model head's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import use_triton


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,): cross-entropy of hidden @ weight.T, in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``; ``reduction`` is mean or sum."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    use_triton(hidden, backend)
    return linear_cross_entropy_reference(
        hidden, weight, targets, ignore_index=ignore_index, reduction=reduction
    )
