"""Decode attention: one new query token per sequence against that sequence's slot of a KV cache.

The cache is preallocated, ``k_cache``/``v_cache`` of shape (slots, Hkv, L, D); row ``b`` of the
batch reads slot ``slots[b]`` and attends to its first ``lengths[b]`` positions (its own key at
``lengths[b] - 1`` included). ``q`` is (B, Hq, D) with Hq a multiple of Hkv (grouped-query), and
the output has q's shape and dtype.

The result of a row depends only on that row's query, slot contents and length, never on which
other rows share the batch: the reference computes each row by itself, and the kernels give each
(row, kv head) its own programs. That is what lets the server promise that a request's tokens
do not depend on its neighbours.

Split-KV (flash-decoding, the default): with one program per (row, kv head), a batch of a few
long-context rows keeps only a handful of the GPU's SMs busy. The split kernel instead gives each
(row, kv head, split of ``SPLIT_KEYS`` consecutive keys) a program that writes an unnormalized
partial output with its running max and sum, and a combine kernel merges a row's partials. The
split size is a fixed constant, so how a row is split depends only on its own length, and the
combine walks the row's splits in a fixed order in fixed-size blocks: a row's output is bitwise the
same alone or in any batch. ``split_kv=False`` runs the single-pass kernel instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import INTERPRET, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

# Keys per split and splits merged per combine iteration. Both are fixed (never derived from the
# batch), which is what keeps a row's result independent of the other rows. The interpreter gets
# small ones so that short test sequences span several splits and several combine iterations.
GPU_SPLIT_KEYS, GPU_COMBINE_BLOCK = 256, 16
INTERPRET_SPLIT_KEYS, INTERPRET_COMBINE_BLOCK = 32, 2
SPLIT_NUM_WARPS, SPLIT_NUM_STAGES = 4, 2


def _combine_warps(head_dim: int) -> int:
    return 1 if head_dim <= 64 else 2


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the kernels (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch, one row at a time over exactly that row's keys.

    Each row is computed by the same call whatever else is in the batch, so its numbers cannot
    depend on the other rows (CPU kernels choose their blocking by shape), and no work is spent
    on the unused end of a slot.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Hq, D, dtype=compute, device=q.device)
    for b, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        k = k_cache[slot, :, :n].to(compute)  # (Hkv, n, D)
        v = v_cache[slot, :, :n].to(compute)
        qb = q[b].to(compute).view(Hkv, Hq // Hkv, D)  # the query heads sharing each kv head
        out[b] = F.scaled_dot_product_attention(qb, k, v, scale=scale).view(Hq, D)
    return out.to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        Q,
        K,
        V,
        Out,
        Slots,
        Lengths,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_kl,
        stride_vs,
        stride_vh,
        stride_vl,
        stride_ob,
        stride_oh,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program per (batch row, kv head): the GROUP query heads sharing that kv head.

        Online softmax over the slot's first ``length`` positions in blocks of BLOCK_N keys,
        accumulated in fp32; every load is upcast at once (the interpreter's bf16 is raw bits).
        """
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(Slots + row).to(tl.int64)
        length = tl.load(Lengths + row)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        q_ptrs = Q + row * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0).to(tl.float32) * scale

        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        s = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < length
            k = tl.load(
                k_base + n[:, None] * stride_kl + d[None, :], mask=n_ok[:, None], other=0.0
            ).to(tl.float32)
            v = tl.load(
                v_base + n[:, None] * stride_vl + d[None, :], mask=n_ok[:, None], other=0.0
            ).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (GROUP_PAD, BLOCK_N)
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new

        out = acc / s[:, None]
        o_ptrs = Out + row * stride_ob + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])

    @triton.jit
    def _decode_split_kernel(
        Q,
        K,
        V,
        PartialO,
        PartialM,
        PartialL,
        Slots,
        Lengths,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_kl,
        stride_vs,
        stride_vh,
        stride_vl,
        stride_pb,
        stride_ph,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
    ):
        """One program per (batch row, kv head, split): keys [split * SPLIT_KEYS, +SPLIT_KEYS).

        Writes the GROUP query heads' unnormalized output sum(p * v), running max m and sum of
        p = exp(score - m) for the split (PartialO is (B, Hq, splits, D), PartialM/L (B, Hq,
        splits), both fp32). Splits at or past the row's length write nothing; the combine never
        reads them.
        """
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(Slots + row).to(tl.int64)
        length = tl.load(Lengths + row)
        start = split * SPLIT_KEYS
        end = tl.minimum(start + SPLIT_KEYS, length)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        heads = kv_head * GROUP + g
        q_ptrs = Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0).to(tl.float32) * scale

        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        s = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(
                k_base + n[:, None] * stride_kl + d[None, :], mask=n_ok[:, None], other=0.0
            ).to(tl.float32)
            v = tl.load(
                v_base + n[:, None] * stride_vl + d[None, :], mask=n_ok[:, None], other=0.0
            ).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (GROUP_PAD, BLOCK_N)
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new

        used = g_ok & ((g * 0 + start) < length)  # a vector compare (the interpreter wants one)
        stat = row.to(tl.int64) * stride_pb + heads * stride_ph + split  # (B, Hq, splits) offsets
        tl.store(PartialM + stat, m, mask=used)
        tl.store(PartialL + stat, s, mask=used)
        o_ptrs = PartialO + stat[:, None] * D + d[None, :]
        tl.store(o_ptrs, acc, mask=used[:, None])

    @triton.jit
    def _decode_combine_kernel(
        PartialO,
        PartialM,
        PartialL,
        Out,
        Lengths,
        stride_pb,
        stride_ph,
        stride_ob,
        stride_oh,
        D: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        COMBINE_BLOCK: tl.constexpr,
    ):
        """One program per (batch row, query head): merge the row's cdiv(length, SPLIT_KEYS)
        partials in order, COMBINE_BLOCK at a time, rescaling each to the running max."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.load(Lengths + row)
        n_splits = tl.cdiv(length, SPLIT_KEYS)
        base = row.to(tl.int64) * stride_pb + head * stride_ph
        d = tl.arange(0, D)
        m = tl.full((), float("-inf"), dtype=tl.float32)
        total = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for s0 in range(0, n_splits, COMBINE_BLOCK):
            sp = s0 + tl.arange(0, COMBINE_BLOCK)
            ok = sp < n_splits
            m_i = tl.load(PartialM + base + sp, mask=ok, other=float("-inf"))
            l_i = tl.load(PartialL + base + sp, mask=ok, other=0.0)
            o_i = tl.load(
                PartialO + (base + sp)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0
            )
            m_new = tl.maximum(m, tl.max(m_i, axis=0))  # finite: every used split has a key
            alpha = tl.exp(m - m_new)
            w = tl.where(ok, tl.exp(m_i - m_new), 0.0)
            total = total * alpha + tl.sum(l_i * w, axis=0)
            acc = acc * alpha + tl.sum(o_i * w[:, None], axis=0)
            m = m_new
        out = acc / total
        tl.store(Out + row * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty))


def _block_n(group_pad: int, head_dim: int) -> int:
    """Keys per block: the (GROUP_PAD, BLOCK_N, D) products stay near 4K fp32 values per program,
    which the sm_90 build keeps in registers without spilling."""
    return max(8, min(64, 4096 // (group_pad * head_dim)))


def split_config(group_pad: int, head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, SPLIT_KEYS, COMBINE_BLOCK) of the split-KV path on ``device``."""
    if device.type == "cpu" and INTERPRET:
        split, combine = INTERPRET_SPLIT_KEYS, INTERPRET_COMBINE_BLOCK
    else:
        split, combine = GPU_SPLIT_KEYS, GPU_COMBINE_BLOCK
    return min(_block_n(group_pad, head_dim), split), split, combine


def _check_inputs(q, k_cache, v_cache):
    D = q.shape[-1]
    if D & (D - 1):
        raise ValueError(f"the decode attention kernel needs a power-of-two head dim, got {D}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode attention needs the head dim contiguous in q and the caches")


def _decode_attention_split(q, k_cache, v_cache, slots, lengths, scale, max_length):
    """Split-KV: partials per (row, kv head, split), then one combine program per (row, head)."""
    _check_inputs(q, k_cache, v_cache)
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    block_n, split_keys, combine_block = split_config(group_pad, D, q.device)
    # The grid covers the longest row the cache (or the caller's bound) allows; programs past a
    # row's own length store nothing. No row's arithmetic depends on this count.
    n_splits = max(1, triton.cdiv(min(L, max_length or L), split_keys))
    partial_o = _empty((B, Hq, n_splits, D), torch.float32, q.device)
    partial_m = _empty((B, Hq, n_splits), torch.float32, q.device)
    partial_l = _empty((B, Hq, n_splits), torch.float32, q.device)
    slots32 = slots.to(torch.int32).contiguous()
    lengths32 = lengths.to(torch.int32).contiguous()
    _decode_split_kernel[(B, Hkv, n_splits)](
        q,
        k_cache,
        v_cache,
        partial_o,
        partial_m,
        partial_l,
        slots32,
        lengths32,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        partial_m.stride(0),
        partial_m.stride(1),
        scale,
        GROUP=group,
        GROUP_PAD=group_pad,
        D=D,
        BLOCK_N=block_n,
        SPLIT_KEYS=split_keys,
        num_warps=SPLIT_NUM_WARPS,
        num_stages=SPLIT_NUM_STAGES,
    )
    out = _empty(q.shape, q.dtype, q.device)
    _decode_combine_kernel[(B, Hq)](
        partial_o,
        partial_m,
        partial_l,
        out,
        lengths32,
        partial_m.stride(0),
        partial_m.stride(1),
        out.stride(0),
        out.stride(1),
        D=D,
        SPLIT_KEYS=split_keys,
        COMBINE_BLOCK=combine_block,
        num_warps=_combine_warps(D),
        num_stages=1,
    )
    return out


def _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    _check_inputs(q, k_cache, v_cache)
    out = _empty(q.shape, q.dtype, q.device)
    _decode_attention_kernel[(B, Hkv)](
        q,
        k_cache,
        v_cache,
        out,
        slots.to(torch.int32).contiguous(),
        lengths.to(torch.int32).contiguous(),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        scale,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        D=D,
        BLOCK_N=_block_n(triton.next_power_of_2(group), D),
        num_warps=4,
        num_stages=2,  # the configuration the sm_90 build compiles
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
    split_kv: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Attention of one query per row over its cache slot; the Triton kernels on CUDA.

    ``split_kv`` (default) runs the split-KV kernels, which keep the GPU busy with few rows and
    long contexts; ``False`` the single-pass kernel (one program per row and kv head). Either way
    a row's result does not depend on the batch. ``max_length``, an upper bound on ``lengths``
    known on the host, only sizes the split-KV scratch (default: the cache length); it must not be
    below any row's length.
    """
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of key/value heads {k_cache.shape[1]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton(q, backend):
        if split_kv:
            return _decode_attention_split(q, k_cache, v_cache, slots, lengths, scale, max_length)
        return _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale)
    return decode_attention_reference(q, k_cache, v_cache, slots, lengths, scale=scale)


def sm90_builds() -> list[dict]:
    """The kernel's sm_90 build configurations, for the ahead-of-time compile check.

    One entry per (dtype, head dim, group) the models in configs/ use: the tiny and GPT-2 shapes
    (D 32/64), Llama 1B/8B (D 64/128, groups of 4).
    """
    if triton is None:
        return []
    builds, combined = [], set()
    for dtype, head_dim, group in [
        ("bf16", 32, 2),
        ("bf16", 64, 1),
        ("bf16", 64, 4),
        ("bf16", 128, 4),
        ("fp16", 128, 4),
        ("fp32", 64, 4),
    ]:
        ptr = f"*{dtype}"
        signature = {
            "Q": ptr,
            "K": ptr,
            "V": ptr,
            "Out": ptr,
            "Slots": "*i32",
            "Lengths": "*i32",
            **{
                name: "i32"
                for name in (
                    "stride_qb",
                    "stride_qh",
                    "stride_ks",
                    "stride_kh",
                    "stride_kl",
                    "stride_vs",
                    "stride_vh",
                    "stride_vl",
                    "stride_ob",
                    "stride_oh",
                )
            },
            "scale": "fp32",
            "GROUP": "constexpr",
            "GROUP_PAD": "constexpr",
            "D": "constexpr",
            "BLOCK_N": "constexpr",
        }
        constexprs = {
            "GROUP": group,
            "GROUP_PAD": triton.next_power_of_2(group),
            "D": head_dim,
            "BLOCK_N": _block_n(triton.next_power_of_2(group), head_dim),
        }
        builds.append(
            {
                "name": f"decode_attention_{dtype}_d{head_dim}_g{group}",
                "fn": _decode_attention_kernel,
                "signature": signature,
                "constexprs": constexprs,
                "num_warps": 4,
                "num_stages": 2,
                "matrix": False,
            }
        )
        split_signature = {
            "Q": ptr,
            "K": ptr,
            "V": ptr,
            "PartialO": "*fp32",
            "PartialM": "*fp32",
            "PartialL": "*fp32",
            "Slots": "*i32",
            "Lengths": "*i32",
            **{
                name: "i32"
                for name in (
                    "stride_qb",
                    "stride_qh",
                    "stride_ks",
                    "stride_kh",
                    "stride_kl",
                    "stride_vs",
                    "stride_vh",
                    "stride_vl",
                    "stride_pb",
                    "stride_ph",
                )
            },
            "scale": "fp32",
            **{name: "constexpr" for name in ("GROUP", "GROUP_PAD", "D", "BLOCK_N", "SPLIT_KEYS")},
        }
        block_n, split_keys, combine_block = split_config(
            triton.next_power_of_2(group), head_dim, torch.device("cuda")
        )
        builds.append(
            {
                "name": f"decode_split_{dtype}_d{head_dim}_g{group}",
                "fn": _decode_split_kernel,
                "signature": split_signature,
                "constexprs": constexprs | {"BLOCK_N": block_n, "SPLIT_KEYS": split_keys},
                "num_warps": SPLIT_NUM_WARPS,
                "num_stages": SPLIT_NUM_STAGES,
                "matrix": False,
            }
        )
        if (dtype, head_dim) in combined:
            continue
        combined.add((dtype, head_dim))
        builds.append(
            {
                "name": f"decode_combine_{dtype}_d{head_dim}",
                "fn": _decode_combine_kernel,
                "signature": {
                    "PartialO": "*fp32",
                    "PartialM": "*fp32",
                    "PartialL": "*fp32",
                    "Out": ptr,
                    "Lengths": "*i32",
                    **{n: "i32" for n in ("stride_pb", "stride_ph", "stride_ob", "stride_oh")},
                    "D": "constexpr",
                    "SPLIT_KEYS": "constexpr",
                    "COMBINE_BLOCK": "constexpr",
                },
                "constexprs": {
                    "D": head_dim,
                    "SPLIT_KEYS": split_keys,
                    "COMBINE_BLOCK": combine_block,
                },
                "num_warps": _combine_warps(head_dim),
                "num_stages": 1,
                "matrix": False,
            }
        )
    return builds
