"""Scaled dot-product attention: causal, grouped-query, optionally masked per document.

Layout and semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
q is (B, Hq, T, D), k and v are (B, Hkv, S, D) with Hq a multiple of Hkv. With T < S the queries
are the last T of the S key positions (decoding against a cache).

The Triton path is FlashAttention-2: the forward pass streams key/value blocks through an online
softmax and saves one log-sum-exp per query row; the backward pass recomputes the probabilities
block by block (a pre-pass computes rowsum(dO * O)), one kernel accumulating dK/dV per key block
over every query head of its group (no repeated K/V in memory, no atomics), another dQ per query
block. Key blocks a query block cannot see are never visited: those past the causal diagonal and,
with ``doc_ids``, those outside the span of the block's documents.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

from kernels._backend import INTERPRET, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None


def attention_mask(
    T: int, S: int, *, causal: bool, doc_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend; None when nothing is masked.

    Queries are the last T of the S key positions (so decoding against a cache lines up).
    """
    mask = None
    if causal:
        q_pos = torch.arange(S - T, S, device=device)
        mask = (q_pos[:, None] >= torch.arange(S, device=device)[None, :])[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, None, S - T :, None] == doc_ids[:, None, None, :]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch attention: the reference the Triton kernel is tested against."""
    T, S = q.shape[-2], k.shape[-2]
    mask = attention_mask(T, S, causal=causal, doc_ids=doc_ids, device=q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale)
    if causal and doc_ids is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    impl: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Exact attention; the Triton flash-attention kernel on CUDA, the reference elsewhere.

    ``doc_ids`` (B, S) gives each key position a document id; a query attends only to keys of its
    own document. ``scale`` defaults to 1/sqrt(D).

    ``impl`` picks the Triton kernels: ``"fa2"`` (this module, the default) or ``"hopper"``
    (:mod:`kernels.attention_hopper`: tensor descriptors, autotuned forward, five-product backward
    with atomic dQ); ``None`` reads ``KERNELS_ATTENTION_IMPL``. ``deterministic=True`` makes the
    hopper path use the FlashAttention-2 backward, whose results are bitwise reproducible (the fa2
    path always is). Where the hopper path cannot run (a Triton without tensor descriptors,
    unaligned strides) the fa2 kernels run, with a warning the first time.

    Shapes the kernels do not cover (head dims other than those of :func:`supported_head_dims`,
    fp32 on CUDA, T > S) run the reference with a warning the first time, except on a GPU where
    the reference would need a dense (B, 1, T, S) mask (document ids, or causal with T != S):
    that is an error naming the shape, never a silent O(T * S) fallback.
    """
    _check_shapes(q, k, v, doc_ids)
    impl = _resolve_impl(impl)
    if not use_triton(q, backend):
        return attention_reference(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    reason = _unsupported(q, k, v)
    if reason is not None:
        if _refuses_dense_mask(q) and _needs_dense_mask(q, k, causal, doc_ids):
            raise ValueError(
                f"kernels.attention: the Triton kernels do not cover {reason} (q {tuple(q.shape)} "
                f"{q.dtype}, k {tuple(k.shape)}), and the reference would build a dense "
                f"(B, 1, {q.shape[2]}, {k.shape[2]}) mask on the GPU"
            )
        _warn_once(reason)
        return attention_reference(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "hopper":
        from kernels import attention_hopper

        why_not = attention_hopper.unsupported(q, k, v)
        if why_not is None:
            spans = _document_spans(doc_ids) if doc_ids is not None else (None, None, None)
            runs = attention_hopper.document_runs(spans[0]) if doc_ids is not None else (None,) * 2
            out, _ = attention_hopper.flash_attention_hopper_forward(
                q, k, v, *spans, *runs, bool(causal), scale, bool(deterministic)
            )
            return out
        _warn_once(f"{why_not} in the hopper kernels", "the FlashAttention-2 kernels")
    spans = _document_spans(doc_ids) if doc_ids is not None else (None, None, None)
    out, _ = _flash_attention_forward(q, k, v, *spans, bool(causal), scale)
    return out


IMPLS = ("fa2", "hopper")


def _resolve_impl(impl: str | None) -> str:
    choice = impl or os.environ.get("KERNELS_ATTENTION_IMPL") or "fa2"
    if choice not in IMPLS:
        raise ValueError(f"unknown attention impl {choice!r}; choose one of {IMPLS}")
    return choice


def _refuses_dense_mask(q: torch.Tensor) -> bool:
    """On a GPU a dense (B, 1, T, S) mask is a memory cliff, so it is refused (an error)."""
    return q.is_cuda


def _needs_dense_mask(q, k, causal: bool, doc_ids) -> bool:
    """Whether :func:`attention_reference` would materialise a (B, 1, T, S) mask."""
    return doc_ids is not None or (causal and q.shape[-2] != k.shape[-2])


def supported_head_dims(on_gpu: bool = not INTERPRET) -> tuple[int, ...]:
    """Head dims the Triton kernels are built for; the GPU set is the one checked for sm_90."""
    return (64, 128) if on_gpu else (16, 32, 64, 128)


# --------------------------------------------------------------------------- dispatch helpers


def _check_shapes(q, k, v, doc_ids) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention takes q (B, Hq, T, D) and k, v (B, Hkv, S, D); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share the batch "
            "size, k and v their heads and length, q and k their head dim"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}"
        )
    if doc_ids is not None and tuple(doc_ids.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"doc_ids must have shape (B, S) = {(k.shape[0], k.shape[2])}, one id per key "
            f"position; got {tuple(doc_ids.shape)}"
        )


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    D, T, S = q.shape[-1], q.shape[-2], k.shape[-2]
    on_gpu = q.is_cuda and not INTERPRET
    dtypes = (torch.bfloat16, torch.float16) if on_gpu else _CPU_DTYPES
    if D not in supported_head_dims(on_gpu) or v.shape[-1] != D:
        return f"head dim {D} (kernel head dims: {supported_head_dims(on_gpu)})"
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} on {q.device.type} (kernel dtypes: {dtypes})"
    if T > S or T == 0:
        return f"{T} queries against {S} keys"
    if not (q.device == k.device == v.device):
        return "q, k and v on different devices"
    return None


_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(reason: str, instead: str = "the PyTorch reference") -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"kernels.attention: the Triton kernel does not cover {reason}; using {instead}",
            stacklevel=3,
        )


def _document_spans(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense int32 document ids and, per position, the span [lo, hi) holding its document.

    ``lo``/``hi`` are the first and one past the last position of the same id in the row, so for
    packed sequences (each document contiguous) they bound the document exactly, and for ids that
    recur they still cover every key of that id; the kernels skip key blocks outside the span and
    mask by id inside it. Computed with a stable sort, no host synchronisation.
    """
    B, S = doc_ids.shape
    sorted_ids, order = torch.sort(doc_ids, dim=1, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = starts.cumsum(1) - 1  # dense id of each sorted position
    first = torch.full_like(order, S).scatter_reduce(1, group, order, "amin")
    last = torch.full_like(order, -1).scatter_reduce(1, group, order, "amax")
    dense = torch.empty_like(group).scatter_(1, order, group)
    lo, hi = first.gather(1, dense), last.gather(1, dense) + 1
    return (
        dense.to(torch.int32).contiguous(),
        lo.to(torch.int32).contiguous(),
        hi.to(torch.int32).contiguous(),
    )


def _empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills is made here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index (batch, head, position) by stride and need unit stride along D."""
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------- tile choice

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, for Hopper. Each was compiled
# for sm_90 (scripts/check_kernels_sm90.py): no register spills, HGMMA in every matrix product.
_GPU_TILES = {
    64: {
        "fwd": (128, 64, 8, 3),
        "dkdv": (64, 128, 8, 3),
        "dq": (128, 64, 8, 3),
        "delta": (128, 0, 4, 1),
    },
    128: {
        "fwd": (128, 64, 8, 3),
        "dkdv": (32, 128, 8, 3),
        "dq": (128, 64, 8, 3),
        "delta": (128, 0, 8, 1),
    },
}
# The interpreter costs about the same per (program x block) whatever the tile: small tiles keep
# the ragged edges of small test shapes exercised.
_INTERPRET_TILES = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}
_INTERPRET_TILES["delta"] = (32, 0, 4, 1)


def _tiles_for(head_dim: int, interpret: bool) -> dict[str, tuple[int, int, int, int]]:
    return _INTERPRET_TILES if interpret else _GPU_TILES[head_dim]


# --------------------------------------------------------------------------- autograd


# Custom ops rather than a bare autograd.Function: torch.compile treats them as opaque calls
# (shapes from the fake functions), so a compiled model never traces into the Triton launches.


@torch.library.custom_op(
    "kernels::flash_attention_forward",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? doc, Tensor? doc_lo, Tensor? doc_hi, "
    "bool causal, float scale) -> (Tensor, Tensor)",
)
def _flash_attention_forward(q, k, v, doc, doc_lo, doc_hi, causal, scale):
    """(O, LSE): the attention output and each query row's log-sum-exp (base 2, scaled)."""
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    with _on_device(q):
        return _flash_forward(q, k, v, (doc, doc_lo, doc_hi), causal, scale)


@_flash_attention_forward.register_fake
def _(q, k, v, doc, doc_lo, doc_hi, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op(
    "kernels::flash_attention_backward",
    mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? doc, "
    "Tensor? doc_lo, Tensor? doc_hi, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
)
def _flash_attention_backward(do, q, k, v, o, lse, doc, doc_lo, doc_hi, causal, scale):
    """(dQ, dK, dV) from dO and what the forward pass saved."""
    q, k, v, do = (_rows_contiguous(x) for x in (q, k, v, do.to(q.dtype)))
    with _on_device(q):
        return _flash_backward(do, q, k, v, o, lse, (doc, doc_lo, doc_hi), causal, scale)


@_flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, doc, doc_lo, doc_hi, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output) -> None:
    q, k, v, doc, doc_lo, doc_hi, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc, doc_lo, doc_hi)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _lse_grad):
    q, k, v, o, lse, doc, doc_lo, doc_hi = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward(
        do, q, k, v, o, lse, doc, doc_lo, doc_hi, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None


_flash_attention_forward.register_autograd(_attention_backward, setup_context=_save_for_backward)


def _on_device(x: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (they differ on multi-GPU hosts)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


_unused_doc: dict[torch.device, torch.Tensor] = {}


def _doc_args(spans, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if spans[0] is not None:
        return spans
    if device not in _unused_doc:  # a placeholder pointer, never read when HAS_DOC is off
        _unused_doc[device] = torch.zeros(1, dtype=torch.int32, device=device)
    unused = _unused_doc[device]
    return unused, unused, unused


def _bh_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _flash_forward(q, k, v, spans, causal: bool, scale: float):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # O is laid out (B, T, H, D) so that merging the heads afterwards is a free view.
    o = _empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = _empty((B, H, T), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _tiles_for(D, INTERPRET)["fwd"]
    args = (
        q, k, v, o, lse, *_doc_args(spans, q.device),
        *_bh_strides(q), *_bh_strides(k), *_bh_strides(v), *_bh_strides(o),
        H, H // Hkv, T, S, scale,
    )  # fmt: skip
    consts = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_DOC=spans[0] is not None)
    _launch(_attn_fwd_kernel, (B * H, triton.cdiv(T, bm)), args, consts, warps, stages)
    return o, lse


def _flash_backward(do, q, k, v, o, lse, spans, causal: bool, scale: float):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    tiles = _tiles_for(D, INTERPRET)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_DOC=spans[0] is not None)
    doc = _doc_args(spans, q.device)

    delta = _empty((B, H, T), dtype=torch.float32, device=q.device)
    bm, _, warps, stages = tiles["delta"]
    args = (o, do, delta, *_bh_strides(o), *_bh_strides(do), H, T)
    consts = dict(HEAD_DIM=D, BLOCK_M=bm)
    _launch(_attn_bwd_delta_kernel, (B * H, triton.cdiv(T, bm)), args, consts, warps, stages)

    dk = _empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(v.shape, dtype=v.dtype, device=v.device)
    bm, bn, warps, stages = tiles["dkdv"]
    args = (
        q, k, v, do, lse, delta, dk, dv, *doc,
        *_bh_strides(q), *_bh_strides(k), *_bh_strides(v), *_bh_strides(do),
        *_bh_strides(dk), *_bh_strides(dv),
        H, Hkv, H // Hkv, T, S, scale,
    )  # fmt: skip
    consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
    _launch(_attn_bwd_dkdv_kernel, (B * Hkv, triton.cdiv(S, bn)), args, consts, warps, stages)

    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    bm, bn, warps, stages = tiles["dq"]
    args = (
        q, k, v, do, lse, delta, dq, *doc,
        *_bh_strides(q), *_bh_strides(k), *_bh_strides(v), *_bh_strides(do), *_bh_strides(dq),
        H, H // Hkv, T, S, scale,
    )  # fmt: skip
    consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
    _launch(_attn_bwd_dq_kernel, (B * H, triton.cdiv(T, bm)), args, consts, warps, stages)
    return dq, dk, dv


_stages_that_fit: dict[tuple, int] = {}


def _launch(kernel, grid, args, consts: dict, num_warps: int, num_stages: int) -> None:
    """Launch ``kernel``; on GPUs with less shared memory than Hopper, with fewer stages.

    The tiles are sized for Hopper (227 KB of shared memory per block); where a configuration
    does not fit (consumer GPUs), the software pipeline is shortened until it does, once per
    configuration and device.
    """
    if kernel is not _attn_bwd_delta_kernel:  # the others take q first
        consts = dict(consts, UPCAST=INTERPRET and args[0].dtype == torch.bfloat16)
    key = (kernel, tuple(sorted(consts.items())), args[0].device)
    stages = _stages_that_fit.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **consts, num_warps=num_warps, num_stages=stages)
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _stages_that_fit[key] = stages
        return


# --------------------------------------------------------------------------- Triton kernels
#
# Conventions: every (batch, head) matrix is addressed as base + position * stride_t + column,
# positions past the end are masked on load and store. Scores are kept in base 2: with
# qk_scale = scale * log2(e), p = exp2(s * qk_scale - m), and the saved LSE is in the same units.
# The running max starts at -1e30, not -inf, so a row whose keys are all masked so far gives
# exp2(-inf - m) = 0 instead of NaN. On the GPU tl.dot takes bf16/fp16 operands and accumulates in
# fp32. UPCAST (bf16 in the interpreter only) converts tiles to fp32 right after loading, because
# the interpreter computes bf16 arithmetic on raw bits; fp16 and fp32 take the GPU's code path.

if triton is not None:

    @triton.jit
    def _key_range(
        start_m,
        T,
        S,
        doc_lo_row,
        doc_hi_row,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
    ):
        """Keys [lo, hi) that queries [start_m, start_m + BLOCK_M) may see, split at ``mid``.

        Blocks in [lo, mid) lie wholly inside the keys and at or before the causal diagonal of
        every query row, so they need no causal or bounds mask; [mid, hi) does. lo and mid are
        multiples of BLOCK_N.
        """
        off = S - T  # query row i sits at key position i + off
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, start_m + BLOCK_M + off)
        lo = 0
        if HAS_DOC:
            rows = start_m + tl.arange(0, BLOCK_M)
            ok = rows < T
            lo = tl.min(tl.load(doc_lo_row + off + rows, mask=ok, other=S), 0)
            hi = tl.minimum(hi, tl.max(tl.load(doc_hi_row + off + rows, mask=ok, other=0), 0))
            lo = lo // BLOCK_N * BLOCK_N
        if CAUSAL:
            mid = (start_m + off + 1) // BLOCK_N * BLOCK_N
        else:
            mid = S // BLOCK_N * BLOCK_N
        mid = tl.minimum(mid, hi // BLOCK_N * BLOCK_N)
        mid = tl.maximum(mid, lo)
        return lo, mid, hi

    @triton.jit
    def _query_range(
        start_n,
        T,
        S,
        doc_lo_row,
        doc_hi_row,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
    ):
        """Query rows [lo, hi) that may see keys [start_n, start_n + BLOCK_N); lo is a multiple
        of BLOCK_M."""
        off = S - T  # query row i sits at key position i + off
        lo = 0
        hi = T
        if CAUSAL:
            lo = tl.maximum(start_n - off, 0)
        if HAS_DOC:
            keys = start_n + tl.arange(0, BLOCK_N)
            ok = keys < S
            lo = tl.maximum(lo, tl.min(tl.load(doc_lo_row + keys, mask=ok, other=S), 0) - off)
            hi = tl.minimum(hi, tl.max(tl.load(doc_hi_row + keys, mask=ok, other=0), 0) - off)
        return lo // BLOCK_M * BLOCK_M, hi

    @triton.jit
    def _fwd_visit(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        q_doc,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        doc_row,
        start,
        end,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EDGE: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Online softmax over key blocks [start, end); EDGE blocks get the causal/bounds mask."""
        offs_n = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, HEAD_DIM)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + cols[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + cols[None, :]
        for start_n in range(start, end, BLOCK_N):
            keys = start_n + offs_n
            in_keys = keys < S
            k = tl.load(
                k_ptrs + tl.cast(start_n, tl.int64) * stride_kt, mask=in_keys[:, None], other=0.0
            )
            v = tl.load(
                v_ptrs + tl.cast(start_n, tl.int64) * stride_vt, mask=in_keys[:, None], other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k))
            if EDGE:
                keep = in_keys[None, :]
                if CAUSAL:
                    keep = keep & (keys[None, :] <= q_pos[:, None])
                s = tl.where(keep, s, float("-inf"))
            if HAS_DOC:
                k_doc = tl.load(doc_row + keys, mask=in_keys, other=-2)
                s = tl.where(q_doc[:, None] == k_doc[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        OUT,
        LSE,
        DOC,
        DOC_LO,
        DOC_HI,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_ob,
        stride_oh,
        stride_ot,
        H,
        GROUP,
        T,
        S,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """O and the log-sum-exp of one query block of one head."""
        bh = tl.program_id(0)
        # Under the causal mask the last query blocks see the most keys: start them first.
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        doc_row = DOC + b * S

        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        in_rows = rows < T
        q_pos = rows + (S - T)
        cols = tl.arange(0, HEAD_DIM)
        tile = offs_m[:, None] * stride_qt + cols[None, :]  # 32-bit within the block
        q_ptrs = Q + b * stride_qb + h * stride_qh + tl.cast(start_m, tl.int64) * stride_qt + tile
        q = tl.load(q_ptrs, mask=in_rows[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_doc = rows
        if HAS_DOC:
            q_doc = tl.load(doc_row + q_pos, mask=in_rows, other=-1)
        lo, mid, hi = _key_range(
            start_m, T, S, DOC_LO + b * S, DOC_HI + b * S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOC
        )

        qk_scale = scale * 1.4426950408889634  # log2(e): scores in base 2
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        acc, l_i, m_i = _fwd_visit(
            acc, l_i, m_i, q, q_pos, q_doc, k_base, v_base, stride_kt, stride_vt, doc_row,
            lo, mid, S, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_DOC, UPCAST,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_visit(
            acc, l_i, m_i, q, q_pos, q_doc, k_base, v_base, stride_kt, stride_vt, doc_row,
            mid, hi, S, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_DOC, UPCAST,
        )  # fmt: skip

        l_i = tl.where(in_rows, l_i, 1.0)  # rows past T saw no key; keep them finite
        o_ptrs = OUT + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_ot
        o_ptrs += offs_m[:, None] * stride_ot + cols[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=in_rows[:, None])
        tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=in_rows)

    @triton.jit
    def _attn_bwd_delta_kernel(
        OUT,
        DO,
        DELTA,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_dob,
        stride_doh,
        stride_dot,
        H,
        T,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """delta = rowsum(dO * O): the softmax backward's correction term, one per query row."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start_m = tl.program_id(1) * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        in_rows = rows < T
        cols = tl.arange(0, HEAD_DIM)
        start = tl.cast(start_m, tl.int64)
        o_ptrs = OUT + b * stride_ob + h * stride_oh + start * stride_ot
        o_ptrs += offs_m[:, None] * stride_ot + cols[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + start * stride_dot
        do_ptrs += offs_m[:, None] * stride_dot + cols[None, :]
        o = tl.load(o_ptrs, mask=in_rows[:, None], other=0.0).to(tl.float32)
        do = tl.load(do_ptrs, mask=in_rows[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=in_rows)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        DOC,
        DOC_LO,
        DOC_HI,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_dob,
        stride_doh,
        stride_dot,
        stride_dkb,
        stride_dkh,
        stride_dkt,
        stride_dvb,
        stride_dvh,
        stride_dvt,
        H,
        H_KV,
        GROUP,
        T,
        S,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """dK, dV of one key block of one kv head, summed over the GROUP query heads sharing it.

        Computed transposed (keys as rows) so that every product has the key block as its M
        dimension. One flat loop walks (query head, query block) pairs: one loop keeps register
        pressure low enough for Hopper tiles. Query rows past T load as zeros (q, dO, lse,
        delta) and add nothing.
        """
        bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
        b = (bh // H_KV).to(tl.int64)
        hk = (bh % H_KV).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        keys = start_n + offs_n
        in_keys = keys < S
        cols = tl.arange(0, HEAD_DIM)
        start = tl.cast(start_n, tl.int64)
        k_ptrs = K + b * stride_kb + hk * stride_kh + start * stride_kt
        k_ptrs += offs_n[:, None] * stride_kt + cols[None, :]
        v_ptrs = V + b * stride_vb + hk * stride_vh + start * stride_vt
        v_ptrs += offs_n[:, None] * stride_vt + cols[None, :]
        k = tl.load(k_ptrs, mask=in_keys[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_keys[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        doc_row = DOC + b * S
        k_doc = keys
        if HAS_DOC:
            k_doc = tl.load(doc_row + keys, mask=in_keys, other=-2)
        lo, hi = _query_range(
            start_n, T, S, DOC_LO + b * S, DOC_HI + b * S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOC
        )

        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        offs_m = tl.arange(0, BLOCK_M)
        q_offs = offs_m[:, None] * stride_qt + cols[None, :]
        do_offs = offs_m[:, None] * stride_dot + cols[None, :]
        n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
        for it in range(0, GROUP * n_blocks):
            g = it // n_blocks
            start_m = lo + (it - g * n_blocks) * BLOCK_M
            h = hk * GROUP + g
            rows = start_m + offs_m
            in_rows = rows < T
            q_head = Q + b * stride_qb + h * stride_qh + tl.cast(start_m, tl.int64) * stride_qt
            do_head = DO + b * stride_dob + h * stride_doh + tl.cast(start_m, tl.int64) * stride_dot
            q = tl.load(q_head + q_offs, mask=in_rows[:, None], other=0.0)
            do = tl.load(do_head + do_offs, mask=in_rows[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + (b * H + h) * T + rows, mask=in_rows, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + rows, mask=in_rows, other=0.0)
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            if CAUSAL:
                p_t = tl.where(keys[:, None] <= rows[None, :] + (S - T), p_t, 0.0)
            if HAS_DOC:
                q_doc = tl.load(doc_row + rows + (S - T), mask=in_rows, other=-1)
                p_t = tl.where(k_doc[:, None] == q_doc[None, :], p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk)

        dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + start * stride_dkt
        dk_ptrs += offs_n[:, None] * stride_dkt + cols[None, :]
        dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + start * stride_dvt
        dv_ptrs += offs_n[:, None] * stride_dvt + cols[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=in_keys[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=in_keys[:, None])

    @triton.jit
    def _dq_visit(
        dq,
        q,
        do,
        lse,
        delta,
        q_pos,
        q_doc,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        doc_row,
        start,
        end,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EDGE: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Add key blocks [start, end) to a query block's dQ (before the softmax scale)."""
        offs_n = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, HEAD_DIM)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + cols[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + cols[None, :]
        for start_n in range(start, end, BLOCK_N):
            keys = start_n + offs_n
            in_keys = keys < S
            k = tl.load(
                k_ptrs + tl.cast(start_n, tl.int64) * stride_kt, mask=in_keys[:, None], other=0.0
            )
            v = tl.load(
                v_ptrs + tl.cast(start_n, tl.int64) * stride_vt, mask=in_keys[:, None], other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            if EDGE:
                keep = in_keys[None, :]
                if CAUSAL:
                    keep = keep & (keys[None, :] <= q_pos[:, None])
                p = tl.where(keep, p, 0.0)
            if HAS_DOC:
                k_doc = tl.load(doc_row + keys, mask=in_keys, other=-2)
                p = tl.where(q_doc[:, None] == k_doc[None, :], p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        DOC,
        DOC_LO,
        DOC_HI,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_dob,
        stride_doh,
        stride_dot,
        stride_dqb,
        stride_dqh,
        stride_dqt,
        H,
        GROUP,
        T,
        S,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """dQ of one query block of one head, over the keys it can see."""
        bh = tl.program_id(0)
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        doc_row = DOC + b * S

        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        in_rows = rows < T
        q_pos = rows + (S - T)
        cols = tl.arange(0, HEAD_DIM)
        start = tl.cast(start_m, tl.int64)
        q_ptrs = Q + b * stride_qb + h * stride_qh + start * stride_qt
        q_ptrs += offs_m[:, None] * stride_qt + cols[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + start * stride_dot
        do_ptrs += offs_m[:, None] * stride_dot + cols[None, :]
        q = tl.load(q_ptrs, mask=in_rows[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=in_rows[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=in_rows, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=in_rows, other=0.0)
        q_doc = rows
        if HAS_DOC:
            q_doc = tl.load(doc_row + q_pos, mask=in_rows, other=-1)
        lo, mid, hi = _key_range(
            start_m, T, S, DOC_LO + b * S, DOC_HI + b * S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOC
        )

        qk_scale = scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        dq = _dq_visit(
            dq, q, do, lse, delta, q_pos, q_doc, k_base, v_base, stride_kt, stride_vt, doc_row,
            lo, mid, S, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_DOC, UPCAST,
        )  # fmt: skip
        dq = _dq_visit(
            dq, q, do, lse, delta, q_pos, q_doc, k_base, v_base, stride_kt, stride_vt, doc_row,
            mid, hi, S, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_DOC, UPCAST,
        )  # fmt: skip
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + start * stride_dqt
        dq_ptrs += offs_m[:, None] * stride_dqt + cols[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=in_rows[:, None])


# --------------------------------------------------------------------------- sm_90 builds


def sm90_builds() -> list[dict]:
    """Every configuration the GPU dispatcher can launch, for scripts/check_kernels_sm90.py."""
    builds = []
    for d in supported_head_dims(on_gpu=True):
        tiles = _tiles_for(d, interpret=False)
        for dtype in ("bf16", "fp16"):
            bm, _, warps, stages = tiles["delta"]
            builds.append(
                _build(
                    f"delta_d{d}_{dtype}",
                    _attn_bwd_delta_kernel,
                    dtype,
                    warps,
                    stages,
                    {"HEAD_DIM": d, "BLOCK_M": bm},
                    matrix=False,
                )  # fmt: skip
            )
            for causal in (True, False):
                for has_doc in (False, True):
                    flags = f"{'causal' if causal else 'full'}{'_doc' if has_doc else ''}"
                    for kind, fn in (
                        ("fwd", _attn_fwd_kernel),
                        ("dkdv", _attn_bwd_dkdv_kernel),
                        ("dq", _attn_bwd_dq_kernel),
                    ):
                        bm, bn, warps, stages = tiles[kind]
                        consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal,
                                  "HAS_DOC": has_doc, "UPCAST": False}  # fmt: skip
                        builds.append(
                            _build(
                                f"{kind}_d{d}_{dtype}_{flags}",
                                fn,
                                dtype,
                                warps,
                                stages,
                                consts,
                                matrix=True,
                            )  # fmt: skip
                        )
    return builds


def _build(name, fn, dtype, num_warps, num_stages, constexprs, *, matrix) -> dict:
    """One build; the kernels' arguments are tensors of ``dtype`` unless named otherwise below."""
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("LSE", "DELTA"):
            signature[arg] = "*fp32"
        elif arg in ("DOC", "DOC_LO", "DOC_HI"):
            signature[arg] = "*i32"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("H", "H_KV", "GROUP", "T", "S") or arg.startswith("stride_"):
            signature[arg] = "i32"
        else:
            signature[arg] = f"*{dtype}"
    # The launcher marks pointers and 16-divisible integers; strides of (.., D) rows with D in
    # {64, 128} always are.
    aligned = [a for a, t in signature.items() if t.startswith("*") or a.startswith("stride_")]
    return {
        "name": name,
        "fn": fn,
        "signature": signature,
        "constexprs": dict(constexprs),
        "num_warps": num_warps,
        "num_stages": num_stages,
        "matrix": matrix,
        "divisible_by_16": aligned,
    }
