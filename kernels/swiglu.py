"""SwiGLU activation: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    use_triton(gate, backend)
    return swiglu_reference(gate, up)
