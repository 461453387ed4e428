"""Flash attention for Hopper: tensor descriptors, an autotuned forward, a five-product backward.

The same operation as :mod:`kernels.attention` (same arguments, same saved base-2 log-sum-exp),
reorganised around what sm_90 offers and the FlashAttention-2 kernels there do not use:

- Q, K, V, O (and dQ's inputs in the backward) move through tensor descriptors
  (``tl.make_tensor_descriptor``), which Triton lowers to TMA copies on sm_90. A descriptor
  bounds-checks in hardware and fills rows past the end with zeros, so the key loop needs no
  load masks at all; only the blocks on the causal diagonal or past the last key take a mask.
- The forward is ``triton.autotune``-d over BLOCK_M, BLOCK_N in {64, 128}, warps and pipeline
  stages per (head dim, causal, document mask), and its key loop can be warp-specialized
  (``tl.range(..., warp_specialize=True)``) where the compiler supports it.
- The backward computes each score block once: the dK/dV kernel also produces that block's dQ
  contribution and adds it with fp32 atomics into an fp32 buffer that a small kernel scales and
  converts, five matrix products per block instead of seven. dQ is then not bitwise
  reproducible (the order of the fp32 additions varies); ``deterministic=True`` keeps the
  FlashAttention-2 two-kernel backward.
- Document masks cost what they must: besides the spans that skip whole blocks, each query (or
  key) block learns from the per-position runs of equal ids whether it lies inside one run; the
  blocks of the other side wholly inside that run take the unmasked loop, and only blocks
  crossing a document boundary load ids and compare them.

Every row offset is computed in 64-bit arithmetic (descriptor coordinates are 32-bit positions
within one (batch, head) matrix), so long sequences need no special case.
"""

from __future__ import annotations

import importlib

import torch

from kernels._backend import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

_fa2 = importlib.import_module("kernels.attention")  # the module; ``kernels.attention`` is the op

#: Tensor descriptors and the allocator they need for on-device creation (Triton >= 3.3).
HAS_DESCRIPTORS = (
    triton is not None
    and hasattr(tl, "make_tensor_descriptor")
    and hasattr(triton, "set_allocator")
)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why this path cannot take inputs the FlashAttention-2 kernels can, or None.

    TMA needs 16-byte aligned base addresses and row strides; every tensor descriptor of a
    (batch, head) matrix starts at such an address when the whole tensor does.
    """
    if not HAS_DESCRIPTORS:
        return f"triton {getattr(triton, '__version__', '-')} has no tensor descriptors"
    for name, x in (("q", q), ("k", k), ("v", v)):
        size = x.element_size()
        if x.data_ptr() % 16 or any((s * size) % 16 for s in x.stride()[:3]):
            return f"{name} with strides {tuple(x.stride())} or an address not 16-byte aligned"
    return None


# --------------------------------------------------------------------------- document runs


def document_runs(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the run [lo, hi) of equal consecutive ids that holds it (int32, (B, S)).

    Computed once per batch with a few scans. A block of positions inside one run has a single
    document; a block of queries and a block of keys inside the same run need no document mask.
    For packed sequences the runs are the documents.
    """
    B, S = dense.shape
    pos = torch.arange(S, device=dense.device, dtype=torch.int32).expand(B, S)
    start = torch.ones_like(dense, dtype=torch.bool)
    start[:, 1:] = dense[:, 1:] != dense[:, :-1]
    end = torch.ones_like(start)
    end[:, :-1] = start[:, 1:]
    lo = torch.where(start, pos, 0).cummax(1).values
    hi = torch.where(end, pos + 1, S).flip(1).cummin(1).values.flip(1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


# --------------------------------------------------------------------------- configurations

# Forward autotuning space on Hopper. Pruned per head dim (``_prune_fwd``) to the shapes whose
# sm_90 builds do not spill; scripts/check_kernels_sm90.py compiles every one that survives.
# Warp specialization on Hopper needs 4 warps in Triton 3.9 (one producer warp group is added
# and setmaxnreg moves registers to the consumers); with 8 warps the request is ignored.
_FWD_SPACE = [
    # (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize)
    (128, 128, 8, 2, False),
    (128, 64, 8, 3, False),
    (64, 128, 4, 3, False),
    (64, 64, 4, 3, False),
    (128, 128, 4, 2, True),
    (128, 64, 4, 3, True),
]
# Kept per (head dim, document mask): at D=128 the 128 x 128 tile spills with documents.
_FWD_KEEP = {
    (64, False): {0, 1, 2, 3, 4, 5},
    (64, True): {0, 1, 2, 3},
    (128, False): {0, 1, 2, 4},
    (128, True): {1, 2},
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV(+dQ) kernel without and with documents,
# the delta pre-pass and the dQ conversion per head dim. Query blocks of 64 rows; key blocks of
# 128 at D=64, of 64 at D=128, where the two fp32 accumulators (dK, dV) and the dQ tile
# otherwise spill; the document build at D=128 (five loops) fits only with query blocks of 32.
_BWD_TILES = {
    64: {
        "dkdv": (64, 128, 8, 2),
        "dkdv_doc": (64, 128, 8, 2),
        "delta": (128, 0, 4, 1),
        "dq_convert": (64, 0, 4, 1),
    },
    128: {
        "dkdv": (64, 64, 8, 2),
        "dkdv_doc": (32, 128, 8, 2),
        "delta": (128, 0, 8, 1),
        "dq_convert": (64, 0, 4, 1),
    },
}
# The interpreter: one configuration, small tiles so small test shapes have ragged edges.
_INTERPRET_FWD = (32, 32, 4, 1, False)
_INTERPRET_BWD = {
    "dkdv": (32, 32, 4, 1),
    "dkdv_doc": (32, 32, 4, 1),
    "delta": (32, 0, 4, 1),
    "dq_convert": (32, 0, 4, 1),
}


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return found >= (major, minor)


# The warp-specialized candidates were checked with triton 3.9 (what older versions do with the
# request on Hopper was not): elsewhere they are pruned.
_WARP_SPEC_CHECKED = triton is not None and _triton_at_least(3, 9)


def _fwd_config(entry):
    bm, bn, warps, stages, ws = entry
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def _prune_fwd(configs, named_args, **kwargs):
    """The candidates built for this head dim and document flag (all for other head dims),
    without warp specialization when document ids are loaded in the loop: Triton 3.9 aborts
    that sm_90 compile ("LLVM ERROR: unsupported load type for producer commit")."""
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    has_doc = kwargs.get("HAS_DOC", named_args.get("HAS_DOC", False))
    keep = _FWD_KEEP.get((d, bool(has_doc)))
    chosen = [
        c
        for i, c in enumerate(configs)
        if (keep is None or i in keep)
        and not (c.kwargs["WARP_SPEC"] and (has_doc or not _WARP_SPEC_CHECKED))
    ]
    return chosen or configs[:1]


def _bwd_tiles(head_dim: int) -> dict[str, tuple[int, int, int, int]]:
    return _INTERPRET_BWD if INTERPRET else _BWD_TILES[head_dim]


# --------------------------------------------------------------------------- allocator


def _ensure_allocator() -> None:
    """Give Triton a global-memory allocator for on-device descriptor creation, if none is set.

    Each program writes its descriptors (128 bytes each) to a scratch buffer that the launcher
    asks this allocator for. The setting is per thread (a context variable), and autograd runs
    the backward in its own thread, so it is checked before every launch.
    """
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc_scratch)


def _alloc_scratch(size: int, alignment: int, stream):
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "kernels::flash_attention_hopper_forward",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? doc, Tensor? doc_lo, Tensor? doc_hi, "
    "Tensor? run_lo, Tensor? run_hi, bool causal, float scale, bool deterministic) "
    "-> (Tensor, Tensor)",
)
def flash_attention_hopper_forward(
    q, k, v, doc, doc_lo, doc_hi, run_lo, run_hi, causal, scale, deterministic
):
    """(O, LSE) as :func:`kernels.attention._flash_attention_forward`; ``deterministic`` only
    selects the backward."""
    q, k, v = (_fa2._rows_contiguous(x) for x in (q, k, v))
    with _fa2._on_device(q):
        return _forward(q, k, v, (doc, doc_lo, doc_hi, run_lo, run_hi), causal, scale)


@flash_attention_hopper_forward.register_fake
def _(q, k, v, doc, doc_lo, doc_hi, run_lo, run_hi, causal, scale, deterministic):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op(
    "kernels::flash_attention_hopper_backward",
    mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? doc, "
    "Tensor? doc_lo, Tensor? doc_hi, Tensor? run_lo, Tensor? run_hi, bool causal, float scale, "
    "bool deterministic) -> (Tensor, Tensor, Tensor)",
)
def flash_attention_hopper_backward(
    do, q, k, v, o, lse, doc, doc_lo, doc_hi, run_lo, run_hi, causal, scale, deterministic
):
    """(dQ, dK, dV). ``deterministic``: the FlashAttention-2 backward (separate dQ kernel)."""
    q, k, v, do = (_fa2._rows_contiguous(x) for x in (q, k, v, do.to(q.dtype)))
    with _fa2._on_device(q):
        if deterministic:
            return _fa2._flash_backward(do, q, k, v, o, lse, (doc, doc_lo, doc_hi), causal, scale)
        docs = (doc, doc_lo, doc_hi, run_lo, run_hi)
        return _backward(do, q, k, v, o, lse, docs, causal, scale)


@flash_attention_hopper_backward.register_fake
def _(do, q, k, v, o, lse, doc, doc_lo, doc_hi, run_lo, run_hi, causal, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output) -> None:
    q, k, v, doc, doc_lo, doc_hi, run_lo, run_hi, causal, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc, doc_lo, doc_hi, run_lo, run_hi)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _lse_grad):
    q, k, v, o, lse, *docs = ctx.saved_tensors
    dq, dk, dv = flash_attention_hopper_backward(
        do, q, k, v, o, lse, *docs, ctx.causal, ctx.scale, ctx.deterministic
    )
    return dq, dk, dv, *([None] * 8)


flash_attention_hopper_forward.register_autograd(
    _attention_backward, setup_context=_save_for_backward
)


# --------------------------------------------------------------------------- launches


def _doc_args(docs, device):
    if docs[0] is not None:
        return docs
    return _fa2._doc_args((None,), device) + _fa2._doc_args((None,), device)[:2]


def _forward(q, k, v, docs, causal: bool, scale: float):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = _fa2._empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = _fa2._empty((B, H, T), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, o, lse, *_doc_args(docs, q.device),
        *_fa2._bh_strides(q), *_fa2._bh_strides(k), *_fa2._bh_strides(v), *_fa2._bh_strides(o),
        H, H // Hkv, T, S, scale,
    )  # fmt: skip
    flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_DOC=docs[0] is not None)
    flags["UPCAST"] = INTERPRET and q.dtype == torch.bfloat16
    _ensure_allocator()
    if INTERPRET:  # one configuration: the interpreter cannot time candidates
        bm, bn, warps, stages, ws = _INTERPRET_FWD
        grid = (B * H, triton.cdiv(T, bm))
        _hopper_fwd_kernel[grid](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=ws, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    else:
        grid = lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"]))  # noqa: E731
        _hopper_fwd_tuned[grid](*args, **flags)
    return o, lse


def _backward(do, q, k, v, o, lse, docs, causal: bool, scale: float):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    tiles = _bwd_tiles(D)
    doc = _doc_args(docs, q.device)
    upcast = INTERPRET and q.dtype == torch.bfloat16

    delta = _fa2._empty((B, H, T), dtype=torch.float32, device=q.device)
    bm, _, warps, stages = tiles["delta"]
    args = (o, do, delta, *_fa2._bh_strides(o), *_fa2._bh_strides(do), H, T)
    grid = (B * H, triton.cdiv(T, bm))
    _fa2._attn_bwd_delta_kernel[grid](
        *args, HEAD_DIM=D, BLOCK_M=bm, num_warps=warps, num_stages=stages
    )

    # fp32 accumulator of dQ / scale, (B, H, T, D); every key block adds into it.
    dq_acc = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device)
    dk = _fa2._empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _fa2._empty(v.shape, dtype=v.dtype, device=v.device)
    bm, bn, warps, stages = tiles["dkdv_doc" if docs[0] is not None else "dkdv"]
    args = (
        q, k, v, do, lse, delta, dq_acc, dk, dv, *doc,
        *_fa2._bh_strides(q), *_fa2._bh_strides(k), *_fa2._bh_strides(v),
        *_fa2._bh_strides(do), *_fa2._bh_strides(dk), *_fa2._bh_strides(dv),
        H, Hkv, H // Hkv, T, S, scale,
    )  # fmt: skip
    consts = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_DOC=docs[0] is not None)
    _ensure_allocator()
    _hopper_bwd_kernel[(B * Hkv, triton.cdiv(S, bn))](
        *args, **consts, DQ_TMA=not INTERPRET, UPCAST=upcast, num_warps=warps, num_stages=stages
    )

    dq = _fa2._empty(q.shape, dtype=q.dtype, device=q.device)
    bm, _, warps, stages = tiles["dq_convert"]
    grid = (B * H, triton.cdiv(T, bm))
    _dq_convert_kernel[grid](
        dq_acc, dq, *_fa2._bh_strides(dq), H, T, scale, HEAD_DIM=D, BLOCK_M=bm,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------- Triton kernels
#
# Conventions as in kernels/attention.py: scores in base 2 (qk_scale = scale * log2(e)), running
# max starting at -1e30, UPCAST only for bf16 in the interpreter. Descriptor coordinates are
# positions within one (batch, head) matrix; the (batch, head) base offsets are 64-bit.

if triton is not None and HAS_DESCRIPTORS:

    @triton.jit
    def _single_run(run_lo_row, run_hi_row, first, last):
        """The run [lo, hi) of ``first`` and whether positions [first, last] all lie in it."""
        lo = tl.load(run_lo_row + first)
        hi = tl.load(run_hi_row + first)
        return lo, hi, hi > last

    @triton.jit
    def _fwd_blocks(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        q_doc,
        k_desc,
        v_desc,
        doc_row,
        start,
        end,
        S,
        qk_scale,
        BLOCK_N: tl.constexpr,
        MASK_KEYS: tl.constexpr,
        CAUSAL: tl.constexpr,
        MASK_DOC: tl.constexpr,
        WARP_SPEC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Online softmax over key blocks [start, end).

        MASK_KEYS: blocks on the causal diagonal or holding the last key (zero-filled past S).
        MASK_DOC: blocks that cross a document boundary for some query row of the block.
        Interior blocks take neither: two TMA loads, two products and the softmax update.
        """
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k))
            if MASK_KEYS:
                keys = start_n + offs_n
                keep = keys[None, :] < S
                if CAUSAL:
                    keep = keep & (keys[None, :] <= q_pos[:, None])
                s = tl.where(keep, s, float("-inf"))
            if MASK_DOC:
                keys = start_n + offs_n
                k_doc = tl.load(doc_row + keys, mask=keys < S, other=-2)
                s = tl.where(q_doc[:, None] == k_doc[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _hopper_fwd_kernel(
        Q,
        K,
        V,
        OUT,
        LSE,
        DOC,
        DOC_LO,
        DOC_HI,
        RUN_LO,
        RUN_HI,
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
        WARP_SPEC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """O and the log-sum-exp of one query block of one head.

        Key blocks [lo, hi) are visited in up to four loops: with documents, [lo, full_lo) and
        [full_hi, mid) with the id compare, the interior [full_lo, full_hi) without it (without
        documents [lo, mid) is all interior), then [mid, hi) on the causal diagonal / past the
        last key. WARP_SPEC builds visit [lo, hi) in one warp-specialized loop instead.
        """
        bh = tl.program_id(0)
        # Under the causal mask the last query blocks see the most keys: start them first.
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        off = S - T  # query row i sits at key position i + off
        q_desc = tl.make_tensor_descriptor(
            Q + b * stride_qb + h * stride_qh, shape=[T, HEAD_DIM], strides=[stride_qt, 1],
            block_shape=[BLOCK_M, HEAD_DIM],
        )  # fmt: skip
        k_desc = tl.make_tensor_descriptor(
            K + b * stride_kb + hk * stride_kh, shape=[S, HEAD_DIM], strides=[stride_kt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        v_desc = tl.make_tensor_descriptor(
            V + b * stride_vb + hk * stride_vh, shape=[S, HEAD_DIM], strides=[stride_vt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        o_desc = tl.make_tensor_descriptor(
            OUT + b * stride_ob + h * stride_oh, shape=[T, HEAD_DIM], strides=[stride_ot, 1],
            block_shape=[BLOCK_M, HEAD_DIM],
        )  # fmt: skip

        rows = start_m + tl.arange(0, BLOCK_M)
        in_rows = rows < T
        q_pos = rows + off
        q = q_desc.load([start_m, 0])
        if UPCAST:
            q = q.to(tl.float32)
        doc_row = DOC + b * S
        lo, mid, hi = _fa2._key_range(
            start_m, T, S, DOC_LO + b * S, DOC_HI + b * S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOC
        )
        qk_scale = scale * 1.4426950408889634  # log2(e): scores in base 2
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if WARP_SPEC:
            # Triton 3.9 warp-specializes a Hopper loop only when it is the kernel's only loop
            # and has no branches: one loop over every visited block, each one masked.
            q_doc = rows
            if HAS_DOC:
                q_doc = tl.load(doc_row + q_pos, mask=in_rows, other=-1)
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, lo, hi, S,
                qk_scale, BLOCK_N, True, CAUSAL, HAS_DOC, True, UPCAST,
            )  # fmt: skip
        elif HAS_DOC:
            q_doc = tl.load(doc_row + q_pos, mask=in_rows, other=-1)
            # Key blocks wholly inside the run of equal ids that holds every query of the
            # block need no document mask: [full_lo, full_hi) on the BLOCK_N grid from lo.
            last = tl.minimum(start_m + BLOCK_M, T) - 1 + off
            run_lo, run_hi, single = _single_run(
                RUN_LO + b * S, RUN_HI + b * S, start_m + off, last
            )
            full_lo = lo + tl.cdiv(tl.maximum(run_lo - lo, 0), BLOCK_N) * BLOCK_N
            full_hi = lo + tl.maximum(run_hi - lo, 0) // BLOCK_N * BLOCK_N
            full_lo = tl.minimum(full_lo, mid)
            full_hi = tl.maximum(tl.minimum(full_hi, mid), full_lo)
            # The diagonal / last blocks [mid, hi) skip the id compare too when every key they
            # leave unmasked is in the run: causal, those keys are <= the last query position;
            # otherwise the blocks must end in the run (or at S). They go to [mid, edge_hi).
            edge_hi = mid
            inside = run_lo <= mid
            if not CAUSAL:
                inside = inside & (run_hi >= tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, S))
            if single & inside:
                edge_hi = hi
            if not single:
                full_lo = mid
                full_hi = mid
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, lo, full_lo, S,
                qk_scale, BLOCK_N, False, CAUSAL, True, False, UPCAST,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, full_lo, full_hi, S,
                qk_scale, BLOCK_N, False, CAUSAL, False, False, UPCAST,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, full_hi, mid, S,
                qk_scale, BLOCK_N, False, CAUSAL, True, False, UPCAST,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, mid, edge_hi, S,
                qk_scale, BLOCK_N, True, CAUSAL, False, False, UPCAST,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, q_doc, k_desc, v_desc, doc_row, edge_hi, hi, S,
                qk_scale, BLOCK_N, True, CAUSAL, True, False, UPCAST,
            )  # fmt: skip
        else:
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, rows, k_desc, v_desc, doc_row, lo, mid, S,
                qk_scale, BLOCK_N, False, CAUSAL, False, False, UPCAST,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, q_pos, rows, k_desc, v_desc, doc_row, mid, hi, S,
                qk_scale, BLOCK_N, True, CAUSAL, False, False, UPCAST,
            )  # fmt: skip

        l_i = tl.where(in_rows, l_i, 1.0)  # rows past T saw no key; keep them finite
        o_desc.store([start_m, 0], (acc / l_i[:, None]).to(OUT.dtype.element_ty))
        tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=in_rows)

    @triton.jit
    def _bwd_blocks(
        dk,
        dv,
        k,
        v,
        keys,
        k_doc,
        q_desc,
        do_desc,
        dq_desc,
        LSE,
        DELTA,
        DQ_ACC,
        doc_row,
        b,
        hk,
        H,
        GROUP,
        start,
        end,
        T,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASK_CAUSAL: tl.constexpr,
        MASK_DOC: tl.constexpr,
        DQ_TMA: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Add query blocks [start, end) of the GROUP heads sharing kv head ``hk`` to one key
        block's dK, dV, and their dQ.

        Five products per block, keys as rows: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
        dK += dS^T Q, and dQ += dS K, added to an fp32 buffer (dQ is needed by every key block,
        so no program owns it). One flat loop over (head, block) pairs, not a loop per head:
        nested loops cost registers the Hopper tiles do not have. Query rows past T load as
        zeros and add nothing; their dQ rows are masked (or clipped by the TMA copy).
        """
        offs_m = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, HEAD_DIM)
        dq_offs = offs_m[:, None] * HEAD_DIM + cols[None, :]
        n_blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
        for it in range(0, GROUP * n_blocks):
            g = it // n_blocks
            start_m = start + (it - g * n_blocks) * BLOCK_M
            h = (hk * GROUP + g).to(tl.int32)
            bh = b * H + h  # int64
            rows = start_m + offs_m
            in_rows = rows < T
            q = q_desc.load([h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
            do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh * T + rows, mask=in_rows, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=in_rows, other=0.0)
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            if MASK_CAUSAL:
                p_t = tl.where(keys[:, None] <= rows[None, :] + (S - T), p_t, 0.0)
            if MASK_DOC:
                q_doc = tl.load(doc_row + rows + (S - T), mask=in_rows, other=-1)
                p_t = tl.where(k_doc[:, None] == q_doc[None, :], p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
            ds_t = ds_t.to(q.dtype)
            dk = tl.dot(ds_t, q, dk)
            dq = tl.dot(tl.trans(ds_t), k)
            if DQ_TMA:  # one TMA reduce-add of the tile; rows past T are clipped by the copy
                dq_desc.atomic_add([h, start_m, 0], dq.reshape(1, BLOCK_M, HEAD_DIM))
            else:
                dq_ptrs = DQ_ACC + (bh * T + start_m) * HEAD_DIM + dq_offs
                tl.atomic_add(dq_ptrs, dq, mask=in_rows[:, None], sem="relaxed")
        return dk, dv

    @triton.jit
    def _hopper_bwd_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ_ACC,
        DK,
        DV,
        DOC,
        DOC_LO,
        DOC_HI,
        RUN_LO,
        RUN_HI,
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
        DQ_TMA: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """dK, dV of one key block of one kv head (summed over its GROUP query heads) and the
        block's share of every dQ row it touches.

        Query blocks [lo, hi) are split once per program: [lo, diag) on the causal diagonal
        (causal mask), then, with documents, the blocks wholly inside this key block's run of
        equal ids unmasked and the rest with the id compare.
        """
        bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
        b = (bh // H_KV).to(tl.int64)
        hk = (bh % H_KV).to(tl.int64)
        off = S - T
        k_desc = tl.make_tensor_descriptor(
            K + b * stride_kb + hk * stride_kh, shape=[S, HEAD_DIM], strides=[stride_kt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        v_desc = tl.make_tensor_descriptor(
            V + b * stride_vb + hk * stride_vh, shape=[S, HEAD_DIM], strides=[stride_vt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        # Query-side matrices of all H heads of this batch row: (head, position, column).
        q_desc = tl.make_tensor_descriptor(
            Q + b * stride_qb, shape=[H, T, HEAD_DIM], strides=[stride_qh, stride_qt, 1],
            block_shape=[1, BLOCK_M, HEAD_DIM],
        )  # fmt: skip
        do_desc = tl.make_tensor_descriptor(
            DO + b * stride_dob, shape=[H, T, HEAD_DIM], strides=[stride_doh, stride_dot, 1],
            block_shape=[1, BLOCK_M, HEAD_DIM],
        )  # fmt: skip
        # dQ's fp32 accumulator (B, H, T, D), added to by TMA reduce on the GPU (DQ_TMA; the
        # interpreter has no descriptor reductions and uses element atomics).
        dq_desc = tl.make_tensor_descriptor(
            DQ_ACC + b * H * T * HEAD_DIM, shape=[H, T, HEAD_DIM], strides=[T * HEAD_DIM, HEAD_DIM, 1],
            block_shape=[1, BLOCK_M, HEAD_DIM],
        )  # fmt: skip
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        keys = start_n + tl.arange(0, BLOCK_N)
        doc_row = DOC + b * S
        lo, hi = _fa2._query_range(
            start_n, T, S, DOC_LO + b * S, DOC_HI + b * S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOC
        )
        diag = lo
        if CAUSAL:  # from here on every query row sees every key of the block
            diag = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off - lo, 0), BLOCK_M) * BLOCK_M
            diag = tl.minimum(diag, tl.maximum(hi, lo))
        k_doc = keys
        full_lo = diag
        full_hi = diag
        diag_doc = lo
        if HAS_DOC:
            k_doc = tl.load(doc_row + keys, mask=keys < S, other=-2)
            last = tl.minimum(start_n + BLOCK_N, S) - 1
            run_lo, run_hi, single = _single_run(RUN_LO + b * S, RUN_HI + b * S, start_n, last)
            # Query rows of this run: [run_lo - off, run_hi - off); rows past T add nothing.
            full_lo = lo + tl.cdiv(tl.maximum(run_lo - off - lo, 0), BLOCK_M) * BLOCK_M
            full_hi = lo + tl.maximum(run_hi - off - lo, 0) // BLOCK_M * BLOCK_M
            if run_hi - off >= T:
                full_hi = tl.maximum(hi, lo)
            full_lo = tl.maximum(full_lo, diag)
            full_hi = tl.maximum(tl.minimum(full_hi, tl.maximum(hi, lo)), full_lo)
            # Diagonal query blocks [lo, diag) inside the run skip the id compare: [lo, diag_doc).
            # The last of them ends on the BLOCK_M grid, possibly past diag (or at T).
            diag_end = tl.minimum(lo + tl.cdiv(tl.maximum(diag - lo, 0), BLOCK_M) * BLOCK_M, T)
            if single & (lo + off >= run_lo) & (diag_end + off <= run_hi):
                diag_doc = diag
            if not single:
                full_lo = tl.maximum(hi, diag)
                full_hi = full_lo

        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        if CAUSAL:
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, lo, diag_doc, T, S, qk_scale, HEAD_DIM, BLOCK_M, True, False, DQ_TMA, UPCAST,
            )  # fmt: skip
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, diag_doc, diag, T, S, qk_scale, HEAD_DIM, BLOCK_M, True, HAS_DOC, DQ_TMA, UPCAST,
            )  # fmt: skip
        if HAS_DOC:
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, diag, full_lo, T, S, qk_scale, HEAD_DIM, BLOCK_M, False, True, DQ_TMA, UPCAST,
            )  # fmt: skip
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, full_lo, full_hi, T, S, qk_scale, HEAD_DIM, BLOCK_M, False, False, DQ_TMA, UPCAST,
            )  # fmt: skip
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, full_hi, hi, T, S, qk_scale, HEAD_DIM, BLOCK_M, False, True, DQ_TMA, UPCAST,
            )  # fmt: skip
        else:
            dk, dv = _bwd_blocks(
                dk, dv, k, v, keys, k_doc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ_ACC, doc_row, b, hk, H,
                GROUP, diag, hi, T, S, qk_scale, HEAD_DIM, BLOCK_M, False, False, DQ_TMA, UPCAST,
            )  # fmt: skip

        dk_desc = tl.make_tensor_descriptor(
            DK + b * stride_dkb + hk * stride_dkh, shape=[S, HEAD_DIM], strides=[stride_dkt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        dv_desc = tl.make_tensor_descriptor(
            DV + b * stride_dvb + hk * stride_dvh, shape=[S, HEAD_DIM], strides=[stride_dvt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )  # fmt: skip
        dk_desc.store([start_n, 0], (dk * scale).to(DK.dtype.element_ty))
        dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))

    @triton.jit
    def _dq_convert_kernel(
        DQ_ACC,
        DQ,
        stride_dqb,
        stride_dqh,
        stride_dqt,
        H,
        T,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """dQ = scale * (the fp32 sum the key blocks accumulated), in dQ's dtype and strides."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start_m = tl.program_id(1) * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        in_rows = rows < T
        cols = tl.arange(0, HEAD_DIM)
        local = tl.arange(0, BLOCK_M)[:, None]
        acc_ptrs = DQ_ACC + (bh.to(tl.int64) * T + start_m) * HEAD_DIM + local * HEAD_DIM + cols
        dq = tl.load(acc_ptrs, mask=in_rows[:, None], other=0.0) * scale
        dq_base = DQ + b * stride_dqb + h * stride_dqh + tl.cast(start_m, tl.int64) * stride_dqt
        tl.store(
            dq_base + local * stride_dqt + cols[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=in_rows[:, None],
        )

    _hopper_fwd_tuned = triton.autotune(
        configs=[_fwd_config(e) for e in _FWD_SPACE],
        key=["HEAD_DIM", "CAUSAL", "HAS_DOC", "T", "S"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )(_hopper_fwd_kernel)


# --------------------------------------------------------------------------- sm_90 builds


def sm90_builds() -> list[dict]:
    """Every configuration the GPU path can launch, for scripts/check_kernels_sm90.py: each
    forward autotuning candidate kept for its head dim and flags, the backward and the dQ
    conversion, in bf16; fp16 (the same code with another operand type) for the first forward
    candidate and the backward without documents."""
    if triton is None or not HAS_DESCRIPTORS:
        return []
    builds = []
    for d in _fa2.supported_head_dims(on_gpu=True):
        tiles = _BWD_TILES[d]
        for dtype in ("bf16", "fp16"):
            bm, _, warps, stages = tiles["dq_convert"]
            consts = {"HEAD_DIM": d, "BLOCK_M": bm}
            builds.append(_build(f"dq_convert_d{d}_{dtype}", _dq_convert_kernel, dtype, warps,
                                 stages, consts, matrix=False))  # fmt: skip
            for causal in (True, False):
                for has_doc in (False, True):
                    flags = f"{'causal' if causal else 'full'}{'_doc' if has_doc else ''}"
                    base = {"HEAD_DIM": d, "CAUSAL": causal, "HAS_DOC": has_doc, "UPCAST": False}
                    configs = [_fwd_config(e) for e in _FWD_SPACE]
                    kept = _prune_fwd(configs, {}, HEAD_DIM=d, HAS_DOC=has_doc)
                    for cfg in kept if dtype == "bf16" else kept[:1]:
                        kw = cfg.kwargs
                        name = (f"fwd_d{d}_{dtype}_{flags}_m{kw['BLOCK_M']}n{kw['BLOCK_N']}"
                                f"w{cfg.num_warps}s{cfg.num_stages}{'_ws' if kw['WARP_SPEC'] else ''}")  # fmt: skip
                        builds.append(_build(name, _hopper_fwd_kernel, dtype, cfg.num_warps,
                                             cfg.num_stages, dict(base, **kw), matrix=True))  # fmt: skip
                    if dtype == "fp16" and has_doc:  # the bf16 builds cover the tiles
                        continue
                    bm, bn, warps, stages = tiles["dkdv_doc" if has_doc else "dkdv"]
                    consts = dict(base, BLOCK_M=bm, BLOCK_N=bn, DQ_TMA=True)
                    builds.append(_build(f"bwd_d{d}_{dtype}_{flags}", _hopper_bwd_kernel, dtype,
                                         warps, stages, consts, matrix=True))  # fmt: skip
    return builds


def _build(name, fn, dtype, num_warps, num_stages, constexprs, *, matrix) -> dict:
    """One build; tensors are of ``dtype`` except the fp32 and int32 ones named here."""
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("LSE", "DELTA", "DQ_ACC"):
            signature[arg] = "*fp32"
        elif arg in ("DOC", "DOC_LO", "DOC_HI", "RUN_LO", "RUN_HI"):
            signature[arg] = "*i32"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("H", "H_KV", "GROUP", "T", "S") or arg.startswith("stride_"):
            signature[arg] = "i32"
        else:
            signature[arg] = f"*{dtype}"
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
        "descriptors": fn is not _dq_convert_kernel,  # loads/stores through TMA
        "warp_specialized": bool(constexprs.get("WARP_SPEC")),
    }
