"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32."""

from __future__ import annotations

import torch

from kernels._backend import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    use_triton(x, backend)
    return rms_norm_reference(x, weight, eps)
