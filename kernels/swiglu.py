"""SwiGLU activation: silu(gate) * up.

The Triton kernels are elementwise over the flattened tensors, computing in fp32: the forward
writes only the product (gate and up are kept for the backward, the product is not), and the
backward writes both input gradients in one pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._backend import use_triton

BLOCK, NUM_WARPS = 1024, 4
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dout * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n > 0:
            _swiglu_fwd_kernel[_grid(n)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            _swiglu_bwd_kernel[_grid(n)](
                dout, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS
            )
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and returned in ``gate.dtype``."""
    if (
        use_triton(gate, backend)
        and gate.dtype in _DTYPES
        and up.dtype == gate.dtype
        and up.shape == gate.shape
    ):
        return _SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch (forward and backward per dtype)."""
    builds = []
    for dtype in _DTYPES.values():
        t = f"*{dtype}"
        common = {"constexprs": {"BLOCK": BLOCK}, "num_warps": NUM_WARPS, "num_stages": 1}
        builds.append(
            {
                "name": f"swiglu_fwd_{dtype}",
                "fn": _swiglu_fwd_kernel,
                "signature": {
                    "gate_ptr": t,
                    "up_ptr": t,
                    "out_ptr": t,
                    "n": "i32",
                    "BLOCK": "constexpr",
                },
                "matrix": False,
                **common,
            }
        )
        builds.append(
            {
                "name": f"swiglu_bwd_{dtype}",
                "fn": _swiglu_bwd_kernel,
                "signature": {
                    "dout_ptr": t,
                    "gate_ptr": t,
                    "up_ptr": t,
                    "dgate_ptr": t,
                    "dup_ptr": t,
                    "n": "i32",
                    "BLOCK": "constexpr",
                },
                "matrix": False,
                **common,
            }
        )
    return builds
