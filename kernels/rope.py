"""Rotary position embeddings in the half-split layout (the one Hugging Face Llama uses).

The pair rotated together is (x[i], x[i + D/2]), so exported q/k weights need no permutation.
The Triton kernel rotates every head of q and k at one (batch, position) per program, reading that
position's cos/sin once; its backward is the same kernel rotating the other way (sin negated).

Inputs and outputs are addressed through strides, so q and k can be (B, H, T, D) tensors or
(B, T, H, D) ones (``layout="bthd"``, the layout the projections produce and attention's output
uses): in that layout the rotation reads the projection output and writes (B, T, H, D) directly,
with no transpose copy on either side, forward or backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kernels._backend import INTERPRET, use_triton

MAX_HEAD_DIM = 256  # wider heads run the reference
MIN_BLOCK_HALF = 16
GPU_BLOCK_HEADS, INTERPRET_BLOCK_HEADS = 8, 2
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    *,
    attention_factor: float = 1.0,
    **scaling: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim // 2), in fp32.

    The other keywords go to :func:`rope_inv_freq`. Its ``scaling`` stretches the frequencies to
    a longer context: ``"linear"`` divides every one by ``factor`` (position interpolation);
    ``"llama3"`` divides only the low frequencies (waves longer than ``original_max_len /
    low_freq_factor``), keeps the high ones (shorter than ``original_max_len /
    high_freq_factor``) and blends in between, as Llama 3.1 does;
    ``"yarn"`` blends between dimensions that turn ``beta_fast`` and ``beta_slow`` times over
    ``original_max_len``. Both tables are multiplied by ``attention_factor`` (YaRN's scale of the
    attention logits, which q and k each take half of through the rotation).
    """
    inv_freq = rope_inv_freq(head_dim, theta, positions.device, **scaling)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_inv_freq(
    head_dim: int,
    theta: float,
    device: torch.device | str | None = None,
    *,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_len: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """The (head_dim // 2,) fp32 rotation frequencies, scaled as :func:`rope_cos_sin` says."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    pos_freqs = theta**exponents
    inv_freq = 1.0 / pos_freqs
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "yarn":
        return _yarn_inv_freq(inv_freq, pos_freqs, head_dim, theta, factor, original_max_len,
                              beta_fast, beta_slow, truncate)  # fmt: skip
    if scaling != "llama3":
        raise ValueError(f"unknown RoPE scaling {scaling!r}")
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(
    inv_freq: torch.Tensor,
    pos_freqs: torch.Tensor,
    head_dim: int,
    theta: float,
    factor: float,
    original_max_len: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> torch.Tensor:
    """YaRN: interpolated (divided by ``factor``) below the dimension that turns ``beta_slow``
    times over the original context, kept above the one that turns ``beta_fast`` times, a linear
    ramp in between (the formulas of the paper, as transformers computes them). ``inv_freq`` is
    ``1 / pos_freqs``, both as :func:`rope_inv_freq` computed them."""

    def dim_of(rotations: float) -> float:
        return (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device=pos_freqs.device)
    keep = 1 - ((dims - low) / (high - low)).clamp(0, 1)  # 1: the original frequency
    return 1.0 / (factor * pos_freqs) * (1 - keep) + inv_freq * keep


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "bhtd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, T, D), k (B, Hkv, T, D) (or (B, T, H, D) with ``layout="bthd"``); cos/sin
    (T, D/2) or (B, 1, T, D/2) in either layout."""
    if _is_bthd(layout):
        q_out, k_out = apply_rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _is_bthd(layout: str) -> bool:
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    return layout == "bthd"


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer of the kernel (tests fill them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, stride_xh, stride_oh, H, HALF, c, s, d, d_mask, BLOCK_H: tl.constexpr
):
    """Rotate rows x[h, :HALF] / x[h, HALF:] of every head h at one position."""
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None] & d_mask[None, :]
        x_offsets = h[:, None] * stride_xh + d[None, :]
        out_offsets = h[:, None] * stride_oh + d[None, :]
        x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(out_ptr + out_offsets, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_offsets + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    T,
    HQ,
    HKV,
    HALF,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_qob,
    stride_qoh,
    stride_qot,
    stride_kob,
    stride_koh,
    stride_kot,
    stride_cb,
    stride_ct,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    c = tl.load(cos_ptr + b * stride_cb + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * stride_cb + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the inverse rotation: by -angle
        s = -s
    # Every tensor is addressed by its (batch, head, position) strides: (B, H, T, D) and
    # (B, T, H, D) tensors (or views) take the same code.
    _rotate_heads(
        q_ptr + b * stride_qb + t * stride_qt,
        q_out_ptr + b * stride_qob + t * stride_qot,
        stride_qh,
        stride_qoh,
        HQ,
        HALF,
        c,
        s,
        d,
        d_mask,
        BLOCK_H,
    )
    _rotate_heads(
        k_ptr + b * stride_kb + t * stride_kt,
        k_out_ptr + b * stride_kob + t * stride_kot,
        stride_kh,
        stride_koh,
        HKV,
        HALF,
        c,
        s,
        d,
        d_mask,
        BLOCK_H,
    )


def kernel_config(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_HALF, BLOCK_H, num_warps) for heads of ``head_dim``."""
    block_half = max(MIN_BLOCK_HALF, triton.next_power_of_2(head_dim // 2))
    interpreted = device.type == "cpu" and INTERPRET
    return block_half, INTERPRET_BLOCK_HEADS if interpreted else GPU_BLOCK_HEADS, 4


def _cos_sin_rows(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """cos or sin as fp32 (B, 1, T, D/2), broadcast along B where it was given once."""
    t4 = t.float().reshape((1, 1) + tuple(t.shape)) if t.dim() == 2 else t.float()
    t4 = t4.expand(B, 1, T, t4.shape[-1])
    return t4 if t4.stride(-1) == 1 else t4.contiguous()


def _output(like: torch.Tensor, bthd: bool) -> torch.Tensor:
    """A (B, H, T, D)-shaped output for ``like``, stored (B, T, H, D) when ``bthd``."""
    B, H, T, D = like.shape
    if bthd:
        return _empty((B, T, H, D), like.dtype, like.device).transpose(1, 2)
    return _empty((B, H, T, D), like.dtype, like.device)


def _rope_launch(q, k, cos4, sin4, backward: bool, bthd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (B, H, T, D)-shaped q and k (any strides with unit stride along D); outputs are
    (B, H, T, D)-shaped, stored as (B, T, H, D) when ``bthd``."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    q_out, k_out = _output(q, bthd), _output(k, bthd)
    block_half, block_h, num_warps = kernel_config(D, q.device)
    if B * T > 0:
        _rope_kernel[(B * T,)](
            q,
            k,
            q_out,
            k_out,
            cos4,
            sin4,
            T,
            HQ,
            HKV,
            D // 2,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            q_out.stride(0),
            q_out.stride(1),
            q_out.stride(2),
            k_out.stride(0),
            k_out.stride(1),
            k_out.stride(2),
            cos4.stride(0),
            cos4.stride(2),
            BLOCK_HALF=block_half,
            BLOCK_H=block_h,
            BACKWARD=backward,
            num_warps=num_warps,
        )
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):
    """q and k arrive (B, H, T, D)-shaped; with ``bthd`` they are views of (B, T, H, D) tensors,
    and the outputs and input gradients are made the same way (the caller transposes back)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, bthd):
        B, _, T, _ = q.shape
        cos4, sin4 = _cos_sin_rows(cos, B, T), _cos_sin_rows(sin, B, T)
        if cos4.stride() != sin4.stride():  # the kernel reads both with one set of strides
            cos4, sin4 = cos4.contiguous(), sin4.contiguous()
        ctx.save_for_backward(cos4, sin4)
        ctx.bthd = bthd
        return _rope_launch(q, k, cos4, sin4, backward=False, bthd=bthd)

    @staticmethod
    def backward(ctx, dq, dk):
        cos4, sin4 = ctx.saved_tensors
        dq_in, dk_in = _rope_launch(dq, dk, cos4, sin4, backward=True, bthd=ctx.bthd)
        return dq_in, dk_in, None, None, None


def _fits_kernel(q, k, cos, sin) -> bool:
    return (
        q.dim() == 4
        and k.dim() == 4
        and q.dtype in _DTYPES
        and k.dtype == q.dtype
        and q.shape[0] == k.shape[0]
        and q.shape[2:] == k.shape[2:]
        and q.shape[-1] % 2 == 0
        and q.shape[-1] <= MAX_HEAD_DIM
        and cos.shape == sin.shape
        and cos.shape[-2:] == (q.shape[2], q.shape[-1] // 2)
        and (cos.dim() == 2 or (cos.dim() == 4 and cos.shape[0] in (1, q.shape[0])))
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
    layout: str = "bhtd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by the angles whose cos/sin are given.

    With ``layout="bthd"``, q is (B, T, Hq, D) and k (B, T, Hkv, D), as the q/k projections make
    them, and so are the outputs (contiguous): no transpose is needed before or after. Any
    strides work as long as D is the unit-stride dimension. cos/sin are (T, D/2) or
    (B, 1, T, D/2) in both layouts (from :func:`rope_cos_sin`); they get no gradient.
    """
    bthd = _is_bthd(layout)
    q4, k4 = (q.transpose(1, 2), k.transpose(1, 2)) if bthd else (q, k)
    if use_triton(q, backend) and _fits_kernel(q4, k4, cos, sin):
        q_out, k_out = _RopeFunction.apply(q4, k4, cos, sin, bthd)
        return (q_out.transpose(1, 2), k_out.transpose(1, 2)) if bthd else (q_out, k_out)
    return apply_rope_reference(q, k, cos, sin, layout)


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch (each head-size block, dtype and direction)."""
    builds = []
    block_half = MIN_BLOCK_HALF
    while block_half <= MAX_HEAD_DIM // 2:
        for dtype in _DTYPES.values():
            for backward in (False, True):
                t = f"*{dtype}"
                builds.append(
                    {
                        "name": f"rope_{'bwd' if backward else 'fwd'}_{dtype}_half{block_half}",
                        "fn": _rope_kernel,
                        "signature": {
                            "q_ptr": t,
                            "k_ptr": t,
                            "q_out_ptr": t,
                            "k_out_ptr": t,
                            "cos_ptr": "*fp32",
                            "sin_ptr": "*fp32",
                            "T": "i32",
                            "HQ": "i32",
                            "HKV": "i32",
                            "HALF": "i32",
                            "stride_qb": "i32",
                            "stride_qh": "i32",
                            "stride_qt": "i32",
                            "stride_kb": "i32",
                            "stride_kh": "i32",
                            "stride_kt": "i32",
                            **{f"stride_{t}o{dim}": "i32" for t in "qk" for dim in "bht"},
                            "stride_cb": "i32",
                            "stride_ct": "i32",
                            "BLOCK_HALF": "constexpr",
                            "BLOCK_H": "constexpr",
                            "BACKWARD": "constexpr",
                        },
                        "constexprs": {
                            "BLOCK_HALF": block_half,
                            "BLOCK_H": GPU_BLOCK_HEADS,
                            "BACKWARD": backward,
                        },
                        "num_warps": 4,
                        "num_stages": 1,
                        "matrix": False,
                    }
                )
        block_half *= 2
    return builds
