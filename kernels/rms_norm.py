"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32.

The Triton forward normalizes one row per program and keeps each row's 1/rms (fp32) for the
backward; the backward walks rows in a grid-strided loop so each program sums its rows' share of the
weight gradient in fp32 registers, and the few per-program partial sums are added at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels._backend import use_triton

# Rows up to this many features run the kernel (one row lives in registers; the backward of
# 16384-wide rows spills them even with 32 warps in the sm_90 build); wider rows run the reference.
MAX_FEATURES = 8192
MIN_BLOCK = 128
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    N,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row = pid.to(tl.int64)
    for _ in range(pid, n_rows, n_programs):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dw += dy * x_hat
        # The weight is read again for each row (from cache) rather than held in registers, and
        # dw is updated before dx is formed: both keep 8192-wide rows from spilling.
        g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0)
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        row += n_programs
    tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)


def kernel_config(n_features: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of ``n_features``: the whole row in one block.

    These warp counts keep forward and backward free of register spills in the sm_90 build.
    """
    block = max(MIN_BLOCK, triton.next_power_of_2(n_features))
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(
            1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
        )
    return max(1, min(n_rows, 4))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        w = weight.float().contiguous()
        n_rows, n = x2.shape
        y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = kernel_config(n)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2,
                w,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                n,
                eps,
                BLOCK_N=block,
                num_warps=num_warps,
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        n_rows, n = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        programs = _backward_programs(n_rows, x2.device)
        dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
        block, num_warps = kernel_config(n)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(programs,)](
                dy2,
                x2,
                w,
                rstd,
                dx,
                dw_partial,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n,
                BLOCK_N=block,
                num_warps=num_warps,
            )
        dw = dw_partial.sum(0).to(ctx.weight_dtype)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension; output in ``x.dtype``, statistics in fp32."""
    if (
        use_triton(x, backend)
        and x.dtype in _DTYPES
        and weight.dtype in _DTYPES
        and x.shape[-1] <= MAX_FEATURES
        and weight.shape == x.shape[-1:]
    ):
        return _RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch (each block size and input dtype)."""
    builds = []
    block = MIN_BLOCK
    while block <= triton.next_power_of_2(MAX_FEATURES):
        _, num_warps = kernel_config(block)
        for dtype in _DTYPES.values():
            t = f"*{dtype}"
            builds.append(
                {
                    "name": f"rms_norm_fwd_{dtype}_n{block}",
                    "fn": _rms_norm_fwd_kernel,
                    "signature": {
                        "x_ptr": t,
                        "w_ptr": "*fp32",
                        "y_ptr": t,
                        "rstd_ptr": "*fp32",
                        "stride_x": "i32",
                        "stride_y": "i32",
                        "N": "i32",
                        "eps": "fp32",
                        "BLOCK_N": "constexpr",
                    },
                    "constexprs": {"BLOCK_N": block},
                    "num_warps": num_warps,
                    "num_stages": 1,
                    "matrix": False,
                }
            )
            builds.append(
                {
                    "name": f"rms_norm_bwd_{dtype}_n{block}",
                    "fn": _rms_norm_bwd_kernel,
                    "signature": {
                        "dy_ptr": t,
                        "x_ptr": t,
                        "w_ptr": "*fp32",
                        "rstd_ptr": "*fp32",
                        "dx_ptr": t,
                        "dw_partial_ptr": "*fp32",
                        "stride_dy": "i32",
                        "stride_x": "i32",
                        "stride_dx": "i32",
                        "n_rows": "i32",
                        "N": "i32",
                        "BLOCK_N": "constexpr",
                    },
                    "constexprs": {"BLOCK_N": block},
                    "num_warps": num_warps,
                    "num_stages": 1,
                    "matrix": False,
                }
            )
        block *= 2
    return builds
