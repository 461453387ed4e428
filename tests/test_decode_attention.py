"""Decode attention over a KV cache: Triton kernel (interpreted on CPU) against the reference,
the reference against plain causal attention, and per-row independence of the batch."""

import os

import pytest
import torch

from kernels.attention import attention_reference
from kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    sm90_builds,
)

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1",
)


def _cache(slots, hkv, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, hkv, L, D, generator=g).to(dtype)
    v = torch.randn(slots, hkv, L, D, generator=g).to(dtype)
    return k, v


def test_reference_matches_causal_attention_on_the_last_position():
    """The new token at position n-1 sees exactly keys 0..n-1, as in full causal attention."""
    torch.manual_seed(0)
    Hq, Hkv, L, D = 4, 2, 40, 16
    k_cache, v_cache = _cache(3, Hkv, L, D, torch.float64)
    slots = torch.tensor([2, 0])
    lengths = torch.tensor([17, 40])
    q = torch.randn(2, Hq, D, dtype=torch.float64)
    out = decode_attention_reference(q, k_cache, v_cache, slots, lengths)
    for b in range(2):
        n = int(lengths[b])
        qb = q[b][None, :, None, :]
        kb = k_cache[slots[b], :, :n][None]
        vb = v_cache[slots[b], :, :n][None]
        expected = attention_reference(qb, kb, vb, causal=True)[0, :, 0]
        torch.testing.assert_close(out[b], expected, rtol=1e-12, atol=1e-12)


def test_reference_row_does_not_depend_on_the_batch():
    """Bitwise: a row's output is the same alone, in a batch, and at any position in it."""
    torch.manual_seed(1)
    Hq, Hkv, L, D = 8, 4, 64, 32
    k_cache, v_cache = _cache(9, Hkv, L, D, torch.float32)
    q = torch.randn(8, Hq, D)
    slots = torch.tensor([3, 1, 4, 0, 5, 2, 6, 8])
    lengths = torch.tensor([5, 64, 1, 33, 17, 2, 60, 9])
    full = decode_attention_reference(q, k_cache, v_cache, slots, lengths)
    for b in range(8):
        alone = decode_attention_reference(
            q[b : b + 1], k_cache, v_cache, slots[b : b + 1], lengths[b : b + 1]
        )
        assert torch.equal(alone[0], full[b])
    perm = torch.tensor([7, 2, 5, 0, 1, 6, 3, 4])
    shuffled = decode_attention_reference(q[perm], k_cache, v_cache, slots[perm], lengths[perm])
    assert torch.equal(shuffled, full[perm])


@needs_interpreter
@pytest.mark.parametrize(
    "dtype,Hq,Hkv,D,lengths,tol",
    [
        (torch.float32, 4, 2, 16, [1, 37, 50], 1e-5),
        (torch.float32, 6, 2, 32, [123, 16, 64], 1e-5),  # group of 3 (padded to 4)
        (torch.float16, 4, 4, 16, [9, 70], 5e-3),
        (torch.bfloat16, 4, 1, 16, [33, 2], 3e-2),
    ],
)
def test_triton_kernel_matches_reference(dtype, Hq, Hkv, D, lengths, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    L, n_slots = 128, 4
    k_cache, v_cache = _cache(n_slots, Hkv, L, D, dtype, seed=3)
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    slots = torch.tensor([3, 0, 2][: len(lengths)])
    lengths_t = torch.tensor(lengths)
    k_cache, v_cache, q, slots, lengths_t = (
        t.to(device) for t in (k_cache, v_cache, q, slots, lengths_t)
    )
    got = decode_attention(q, k_cache, v_cache, slots, lengths_t, backend="triton")
    expected = decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), slots, lengths_t
    )
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_rejects_heads_that_do_not_group():
    k_cache, v_cache = _cache(1, 3, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(
            torch.randn(1, 4, 8), k_cache, v_cache, torch.tensor([0]), torch.tensor([4])
        )


def test_sm90_builds_describe_every_kernel_argument():
    builds = sm90_builds()
    assert builds
    for b in builds:
        assert set(b) == {
            "name",
            "fn",
            "signature",
            "constexprs",
            "num_warps",
            "num_stages",
            "matrix",
        }
        params = b["fn"].arg_names
        assert list(b["signature"]) == params
        assert {k for k, v in b["signature"].items() if v == "constexpr"} == set(b["constexprs"])
