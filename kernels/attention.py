"""Scaled dot-product attention: causal, grouped-query, optionally masked per document.

Layout and semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
q is (B, Hq, T, D), k and v are (B, Hkv, S, D) with Hq a multiple of Hkv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import use_triton


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
) -> torch.Tensor:
    """Exact attention; the Triton flash-attention kernel on CUDA, the reference elsewhere."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}"
        )
    use_triton(q, backend)  # validates the backend choice; the Triton kernel is not built yet
    return attention_reference(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
