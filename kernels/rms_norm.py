"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32; and residual add + RMSNorm.

The Triton forward normalizes one row per program and keeps each row's 1/rms (fp32) for the
backward; the backward walks rows in a grid-strided loop so each program sums its rows' share of the
weight gradient in fp32 registers, and the few per-program partial sums are added at the end.

Rows up to ``MAX_ONE_BLOCK`` features live in registers as one block. Wider rows do not fit (the
backward of 16384-wide rows spilled even with 32 warps), so they run a looped variant over blocks
of ``WIDE_BLOCK`` features: the forward reads the row twice (sum of squares, then scaling; the second
read mostly hits the cache), and the backward first computes each of its rows' ``sum(dy * w * x_hat)``
and then, one block of columns at a time, the dx of every one of its rows and that block's weight
gradient, so the weight gradient still sums in registers.

:func:`add_rms_norm` fuses the residual add of a pre-norm transformer into the norm: one pass reads
the sublayer output and the residual stream, writes the new residual stream and its normalized
value, where separate ops would write the sum and read it back. Its backward takes the gradients
of both outputs and returns the one gradient both inputs share, again in one pass.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels._backend import use_triton

# Rows up to this many features are one block in registers; wider rows loop over WIDE_BLOCK-feature
# blocks. These are read at call time, so tests can shrink them to reach the looped path.
MAX_ONE_BLOCK = 8192
WIDE_BLOCK, WIDE_NUM_WARPS = 2048, 8  # backward: 76-93 registers (4096-wide blocks: 167-178)
MIN_BLOCK = 128
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the sum rounded to the inputs' dtype first."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer of this module (tests fill them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _load_input(x_row, r_row, s_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One block of the row to normalize, in fp32.

    With a residual, that row is x + residual rounded to the stream's dtype: the rounded sum is
    stored (it is the new residual stream) and normalized, exactly as the separate add then norm.
    """
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_row.dtype.element_ty)
        tl.store(s_row + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    rstd_ptr,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    N,
    eps,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One row per program: y = v * rstd * w with v = x (or x + residual, stored to s)."""
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * stride_x, r_ptr + row * stride_r
    y_row, s_row = y_ptr + row * stride_y, s_ptr + row * stride_s
    if ONE_BLOCK:  # the whole row stays in registers between the statistics and the scaling
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        v = _load_input(x_row, r_row, s_row, cols, mask, HAS_RESIDUAL)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(v * v, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (v * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:  # wide rows: a pass for the sum of squares, then a pass that scales
        squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            v = _load_input(x_row, r_row, s_row, cols, cols < N, HAS_RESIDUAL)
            squares += v * v
        rstd = 1.0 / tl.sqrt_rn(tl.sum(squares, axis=0) / N + eps)
        # With a residual the second pass reads back the sum this thread stored in the first.
        v_row = s_row if HAS_RESIDUAL else x_row
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            v = tl.load(v_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (v * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    ds_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    c_ptr,
    stride_dy,
    stride_ds,
    stride_x,
    stride_dx,
    n_rows,
    N,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_DS: tl.constexpr,
):
    """dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)) (+ ds, the residual stream's own gradient),
    and this program's partial sum of dw = sum over its rows of dy * x_hat.

    Rows are pid, pid + programs, ...; ``c_ptr`` (one fp32 per row) holds the wide path's
    per-row mean(dy*w*x_hat) between its two phases.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    if ONE_BLOCK:
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
            # The weight is read again for each row (from cache) rather than held in registers,
            # and dw is updated before dx is formed: both keep 8192-wide rows from spilling.
            g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0)
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
            if HAS_DS:
                dx += tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            row += n_programs
        tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)
    else:
        # Phase 1: each of this program's rows' mean(dy * w * x_hat), over blocks of the row.
        row = pid.to(tl.int64)
        for _ in range(pid, n_rows, n_programs):
            rstd = tl.load(rstd_ptr + row)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0)
                acc += dy.to(tl.float32) * w * (x * rstd)
            tl.store(c_ptr + row, tl.sum(acc, axis=0) / N)
            row += n_programs
        # The values stored above are read below by other threads of this program.
        tl.debug_barrier()
        # Phase 2: one block of columns at a time, dx of every row and that block's dw.
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
            row = pid.to(tl.int64)
            for _ in range(pid, n_rows, n_programs):
                rstd = tl.load(rstd_ptr + row)
                c = tl.load(c_ptr + row)
                x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd
                dw += dy * x_hat
                dx = rstd * (dy * w - x_hat * c)
                if HAS_DS:
                    ds = tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0)
                    dx += ds.to(tl.float32)
                tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                row += n_programs
            tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)


def kernel_config(n_features: int) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, one_block) for rows of ``n_features``.

    Up to MAX_ONE_BLOCK features, the whole row in one block; wider rows loop over WIDE_BLOCK.
    These warp counts keep forward and backward free of register spills in the sm_90 build.
    """
    if n_features > MAX_ONE_BLOCK:
        return WIDE_BLOCK, WIDE_NUM_WARPS, False
    block = max(MIN_BLOCK, triton.next_power_of_2(n_features))
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16, True


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(
            1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
        )
    return max(1, min(n_rows, 4))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2, r2, w, eps):
    """Launch the forward on rows x2 (and r2, or None); returns (y, summed or None, rstd)."""
    n_rows, n = x2.shape
    y = _empty((n_rows, n), x2.dtype, x2.device)
    s = _empty((n_rows, n), x2.dtype, x2.device) if r2 is not None else None
    rstd = _empty(n_rows, torch.float32, x2.device)
    block, num_warps, one_block = kernel_config(n)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(n_rows,)](
            x2,
            r2 if r2 is not None else x2,
            w,
            y,
            s if s is not None else y,
            rstd,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            y.stride(0),
            s.stride(0) if s is not None else 0,
            n,
            eps,
            BLOCK_N=block,
            ONE_BLOCK=one_block,
            HAS_RESIDUAL=r2 is not None,
            num_warps=num_warps,
        )
    return y, s, rstd


def _backward(dy2, ds2, x2, w, rstd, weight_dtype):
    """dx (including ds2 when given) and dw for rows normalized from x2."""
    n_rows, n = x2.shape
    dx = _empty((n_rows, n), x2.dtype, x2.device)
    programs = _backward_programs(n_rows, x2.device)
    dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
    block, num_warps, one_block = kernel_config(n)
    c = _empty(n_rows if not one_block else 1, torch.float32, x2.device)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2,
            ds2 if ds2 is not None else dy2,
            x2,
            w,
            rstd,
            dx,
            dw_partial,
            c,
            dy2.stride(0),
            ds2.stride(0) if ds2 is not None else 0,
            x2.stride(0),
            dx.stride(0),
            n_rows,
            n,
            BLOCK_N=block,
            ONE_BLOCK=one_block,
            HAS_DS=ds2 is not None,
            num_warps=num_warps,
        )
    return dx, dw_partial.sum(0).to(weight_dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        w = weight.float().contiguous()
        y, _, rstd = _forward(x2, None, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = _backward(_rows(dy), None, x2, w, rstd, ctx.weight_dtype)
        return dx.view(ctx.x_shape), dw, None


class _AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        x2, r2 = _rows(x), _rows(residual)
        w = weight.float().contiguous()
        y, s, rstd = _forward(x2, r2, w, eps)
        ctx.save_for_backward(s, w, rstd)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        ctx.set_materialize_grads(False)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s2, w, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream was used: its gradient passes straight through
            dw = torch.zeros(w.shape, dtype=ctx.weight_dtype, device=w.device)
            return ds, ds, dw, None
        dx, dw = _backward(
            _rows(dy), _rows(ds) if ds is not None else None, s2, w, rstd, ctx.weight_dtype
        )
        dx = dx.view(ctx.x_shape)
        return dx, dx, dw, None


def _fits_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in _DTYPES and weight.dtype in _DTYPES and weight.shape == x.shape[-1:]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension (any width); output in ``x.dtype``, statistics in fp32.

    A DTensor ``x`` (a sequence-parallel shard of the residual stream) is normalized on its
    local rows; see :func:`_rms_norm_local_rows`.
    """
    if _is_dtensor(x) or _is_dtensor(weight):
        return _rms_norm_local_rows(x, weight, eps, backend)
    if use_triton(x, backend) and _fits_kernel(x, weight):
        return _RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _rms_norm_local_rows(x, weight, eps: float, backend: str | None):
    """RMSNorm of a DTensor split along any dim but the last: each rank normalizes its own rows
    with the fused op on plain tensors, and the output keeps ``x``'s placements.

    The (replicated) weight's gradient from local rows is a partial sum over the mesh dims that
    split the rows, declared so (``grad_placements``), and DTensor/FSDP2 reduce it.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if not isinstance(x, DTensor):
        raise TypeError("kernels.rms_norm: a DTensor weight needs a DTensor input on its mesh")
    last = x.ndim - 1
    for p in x.placements:
        if p.is_partial() or (isinstance(p, Shard) and p.dim in (-1, last)):
            raise ValueError(
                f"kernels.rms_norm normalizes the last dim, which must be whole on every rank; "
                f"got placements {tuple(x.placements)}"
            )
    if isinstance(weight, DTensor):
        if weight.device_mesh != x.device_mesh or not all(
            p.is_replicate() for p in weight.placements
        ):
            raise ValueError(
                f"kernels.rms_norm needs the weight replicated on the input's mesh; got "
                f"{tuple(weight.placements)} on {weight.device_mesh}"
            )
        split = [Replicate() if p.is_replicate() else Partial() for p in x.placements]
        weight = weight.to_local(grad_placements=split)
    elif not all(p.is_replicate() for p in x.placements) and weight.requires_grad:
        raise ValueError("kernels.rms_norm: rows split over ranks need a DTensor weight")
    y = rms_norm(x.to_local(), weight, eps, backend=backend)
    return DTensor.from_local(
        y, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
    )


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass: returns ``(rms_norm(x + residual), x + residual)``.

    For a pre-norm block, where a sublayer output ``f`` joins the residual stream ``h`` and the
    next sublayer reads the normalized stream::

        normed, h = kernels.add_rms_norm(f, h, norm.weight, norm.eps)   # h = h + f; norm(h)

    The sum is rounded to the inputs' dtype and then normalized, exactly as
    ``h = h + f; rms_norm(h)``. Both outputs take gradients; the backward forms the gradient that
    ``x`` and ``residual`` share in one pass. ``x`` and ``residual`` need the same shape and dtype
    for the kernel; otherwise (and off CUDA) the separate reference ops run.
    """
    if (
        use_triton(x, backend)
        and _fits_kernel(x, weight)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
    ):
        return _AddRMSNormFunction.apply(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def _signatures(t: str) -> tuple[dict[str, str], dict[str, str]]:
    fwd = {"x_ptr": t, "r_ptr": t, "w_ptr": "*fp32", "y_ptr": t, "s_ptr": t, "rstd_ptr": "*fp32"}
    fwd |= {name: "i32" for name in ("stride_x", "stride_r", "stride_y", "stride_s", "N")}
    fwd |= {"eps": "fp32", "BLOCK_N": "constexpr", "ONE_BLOCK": "constexpr"}
    fwd |= {"HAS_RESIDUAL": "constexpr"}
    bwd = {"dy_ptr": t, "ds_ptr": t, "x_ptr": t, "w_ptr": "*fp32", "rstd_ptr": "*fp32"}
    bwd |= {"dx_ptr": t, "dw_partial_ptr": "*fp32", "c_ptr": "*fp32"}
    bwd |= {name: "i32" for name in ("stride_dy", "stride_ds", "stride_x", "stride_dx")}
    bwd |= {"n_rows": "i32", "N": "i32", "BLOCK_N": "constexpr", "ONE_BLOCK": "constexpr"}
    bwd |= {"HAS_DS": "constexpr"}
    return fwd, bwd


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch: each one-block size and the wide loop, per dtype,
    plain and with the residual (forward) or the residual stream's gradient (backward)."""
    configs = []
    block = MIN_BLOCK
    while block <= MAX_ONE_BLOCK:
        configs.append(kernel_config(block))
        block *= 2
    configs.append(kernel_config(MAX_ONE_BLOCK + 1))
    builds = []
    for block, num_warps, one_block in configs:
        size = f"n{block}" if one_block else f"wide{block}"
        for dtype in _DTYPES.values():
            fwd, bwd = _signatures(f"*{dtype}")
            for fused in (False, True):
                suffix = "_residual" if fused else ""
                common = {"num_warps": num_warps, "num_stages": 1, "matrix": False}
                builds.append(
                    {
                        "name": f"rms_norm_fwd_{dtype}_{size}{suffix}",
                        "fn": _rms_norm_fwd_kernel,
                        "signature": fwd,
                        "constexprs": {
                            "BLOCK_N": block,
                            "ONE_BLOCK": one_block,
                            "HAS_RESIDUAL": fused,
                        },
                        **common,
                    }
                )
                builds.append(
                    {
                        "name": f"rms_norm_bwd_{dtype}_{size}{suffix}",
                        "fn": _rms_norm_bwd_kernel,
                        "signature": bwd,
                        "constexprs": {"BLOCK_N": block, "ONE_BLOCK": one_block, "HAS_DS": fused},
                        **common,
                    }
                )
    return builds
