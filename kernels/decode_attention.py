"""Decode attention: one new query token per sequence against that sequence's slot of a KV cache.

The cache is preallocated, ``k_cache``/``v_cache`` of shape (slots, Hkv, L, D); row ``b`` of the
batch reads slot ``slots[b]`` and attends to its first ``lengths[b]`` positions (its own key at
``lengths[b] - 1`` included). ``q`` is (B, Hq, D) with Hq a multiple of Hkv (grouped-query), and
the output has q's shape and dtype.

The result of a row depends only on that row's query, slot contents and length, never on which
other rows share the batch: the reference computes each row by itself, and the kernel gives each
(row, kv head) its own program. That is what lets the server promise that a request's tokens
do not depend on its neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None


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


def _block_n(group_pad: int, head_dim: int) -> int:
    """Keys per block: the (GROUP_PAD, BLOCK_N, D) products stay near 4K fp32 values per program,
    which the sm_90 build keeps in registers without spilling."""
    return max(8, min(64, 4096 // (group_pad * head_dim)))


def _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    if D & (D - 1):
        raise ValueError(f"the decode attention kernel needs a power-of-two head dim, got {D}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode attention needs the head dim contiguous in q and the caches")
    out = torch.empty_like(q)
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
) -> torch.Tensor:
    """Attention of one query per row over its cache slot; the Triton kernel on CUDA."""
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of key/value heads {k_cache.shape[1]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton(q, backend):
        return _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale)
    return decode_attention_reference(q, k_cache, v_cache, slots, lengths, scale=scale)


def sm90_builds() -> list[dict]:
    """The kernel's sm_90 build configurations, for the ahead-of-time compile check.

    One entry per (dtype, head dim, group) the models in configs/ use: the tiny and GPT-2 shapes
    (D 32/64), Llama 1B/8B (D 64/128, groups of 4).
    """
    if triton is None:
        return []
    builds = []
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
    return builds
