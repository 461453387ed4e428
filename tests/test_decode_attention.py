"""Decode attention over a KV cache: Triton kernel (interpreted on CPU) against the reference,
the reference against plain causal attention, and per-row independence of the batch."""

import importlib
import os

import pytest
import torch

from kernels.attention import attention_reference
from kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    sm90_builds,
)

decode_module = importlib.import_module("kernels.decode_attention")

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


@pytest.fixture
def poison_buffers(monkeypatch):
    """Outputs and split scratch start as NaN: any element read before it is written shows."""

    def nan_empty(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(decode_module, "_empty", nan_empty)


@needs_interpreter
@pytest.mark.parametrize("split_kv", [True, False])
@pytest.mark.parametrize(
    "dtype,Hq,Hkv,D,lengths,tol",
    [
        (torch.float32, 4, 2, 16, [1, 37, 50], 1e-5),
        (torch.float32, 6, 2, 32, [123, 16, 64], 1e-5),  # group of 3 (padded to 4)
        (torch.float16, 4, 4, 16, [9, 70], 5e-3),
        (torch.bfloat16, 4, 1, 16, [33, 2], 3e-2),
    ],
)
def test_triton_kernel_matches_reference(dtype, Hq, Hkv, D, lengths, tol, split_kv, poison_buffers):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    L, n_slots = 128, 4
    k_cache, v_cache = _cache(n_slots, Hkv, L, D, dtype, seed=3)
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    slots = torch.tensor([3, 0, 2][: len(lengths)])
    lengths_t = torch.tensor(lengths)
    k_cache, v_cache, q, slots, lengths_t = (
        t.to(device) for t in (k_cache, v_cache, q, slots, lengths_t)
    )
    got = decode_attention(
        q, k_cache, v_cache, slots, lengths_t, backend="triton", split_kv=split_kv
    )
    expected = decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), slots, lengths_t
    )
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def _split_case(seed=7):
    """Rows of 1..128 keys: within one split, exactly one (32), several, one key past a split,
    and the whole cache; GQA with a group of 3 padded to 4."""
    Hq, Hkv, L, D = 6, 2, 128, 16
    k_cache, v_cache = _cache(5, Hkv, L, D, torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.tensor([33, 1, 128, 32])
    slots = torch.tensor([4, 0, 2, 1])
    q = torch.randn(len(lengths), Hq, D, generator=gen)
    return q, k_cache, v_cache, slots, lengths


@needs_interpreter
def test_split_kv_matches_float64_and_spans_several_splits(poison_buffers):
    q, k_cache, v_cache, slots, lengths = _split_case()
    _, split_keys, combine = decode_module.split_config(4, 16, torch.device("cpu"))
    assert (split_keys, combine) == (32, 2) and int(
        lengths.max()
    ) >= 2 * combine * split_keys  # 2 combine rounds
    got = decode_attention(q, k_cache, v_cache, slots, lengths, backend="triton")
    expected = decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), slots, lengths
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # A host bound on the lengths sizes the scratch; the result is bitwise the same.
    bounded = decode_attention(
        q, k_cache, v_cache, slots, lengths, backend="triton", max_length=128
    )
    assert torch.equal(bounded, got)
    # A deliberate off-by-one (the row's last key left out) is caught by the same comparison.
    keep = lengths > 1
    short = decode_attention(
        q[keep], k_cache, v_cache, slots[keep], lengths[keep] - 1, backend="triton"
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(short.double(), expected[keep], rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("split_kv", [True, False])
def test_triton_row_is_bitwise_the_same_alone_and_in_any_batch(split_kv):
    """The split count follows the row's own length: a short row next to a 128-key one, alone
    (with a scratch bound of its own length), or at another position in the batch: same bits."""
    q, k_cache, v_cache, slots, lengths = _split_case()
    run = lambda q, s, n, **kw: decode_attention(  # noqa: E731
        q, k_cache, v_cache, s, n, backend="triton", split_kv=split_kv, **kw
    )
    full = run(q, slots, lengths)
    for b in (0, 3):  # 33 keys (two splits) and 32 (one) next to a 128-key row
        n = int(lengths[b])
        alone = run(q[b : b + 1], slots[b : b + 1], lengths[b : b + 1], max_length=n)
        assert torch.equal(alone[0], full[b])
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(run(q[perm], slots[perm], lengths[perm]), full[perm])


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
