"""The Hopper attention path (kernels/attention_hopper.py) against a float64 reference, run by the
Triton interpreter on CPU: tensor-descriptor loads, the block classes of document masks, the
five-product backward with atomic dQ, every forward autotuning candidate and the backward tiles
of the GPU, the deterministic backward, and the interface around them.

As in test_attention.py, inputs are fresh random draws (the seed is in the failure message) and
every buffer the op allocates for a kernel to fill starts as NaN.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from test_attention import check_against_float64, packed_doc_ids, seed_of

from kernels import attention, attention_reference

attn = importlib.import_module("kernels.attention")
hop = importlib.import_module("kernels.attention_hopper")

pytestmark = [
    pytest.mark.skipif(
        not attn.INTERPRET, reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1"
    ),
    pytest.mark.usefixtures("poisoned_buffers"),  # every kernel output starts as NaN
]


@pytest.fixture
def rng(request):
    seed = seed_of(request)
    return seed, torch.Generator().manual_seed(seed)


def hopper(rng, **kw):
    check_against_float64(rng, impl="hopper", **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_gqa_and_ragged_length(rng, causal, groups):
    hopper(rng, B=1, Hq=groups, Hkv=1, T=77, D=16, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_queries_are_the_last_positions_of_longer_keys(rng, causal):
    hopper(rng, B=1, Hq=2, Hkv=1, T=37, S=101, D=32, causal=causal)


@pytest.mark.parametrize(
    "causal, lengths",
    [
        (True, [[123]]),  # one document: every block pair is interior
        (True, [[20, 41, 5, 57], [90, 33]]),  # boundaries inside blocks and on them
        (False, [[20, 41, 5, 57], [90, 33]]),
        (True, [[64, 32, 27], [32, 91]]),  # boundaries on the 32-row block grid
        (False, [[64, 32, 27], [32, 91]]),
        (True, [[8] * 15 + [3]]),  # 16 documents, several per block
    ],
    ids=["1doc", "4+2docs", "4+2docs-full", "aligned", "aligned-full", "16docs"],
)
def test_packed_documents(rng, causal, lengths):
    doc_ids = packed_doc_ids(lengths)
    hopper(rng, B=doc_ids.shape[0], Hq=1, Hkv=1, T=123, D=16, causal=causal, doc_ids=doc_ids)


def test_documents_with_fewer_queries_than_keys(rng):
    doc_ids = packed_doc_ids([[30, 47, 23]])
    hopper(rng, B=1, Hq=2, Hkv=2, T=45, S=100, D=16, doc_ids=doc_ids)


def test_recurring_document_ids_mask_by_id(rng):
    doc_ids = torch.tensor([[4] * 10 + [9] * 40 + [4] * 15 + [1] * 30])
    hopper(rng, B=1, Hq=2, Hkv=1, T=95, D=16, doc_ids=doc_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(rng, dtype):
    doc_ids = packed_doc_ids([[17, 50]])
    hopper(rng, B=1, Hq=2, Hkv=1, T=67, D=32, doc_ids=doc_ids, dtype=dtype)


def test_model_layout_and_custom_scale(rng):
    hopper(rng, B=2, Hq=4, Hkv=2, T=37, D=16, scale=0.3, bthd_layout=True)


@pytest.mark.parametrize("causal", [True, False])
def test_deterministic_backward(rng, causal):
    doc_ids = packed_doc_ids([[40, 43]])
    hopper(rng, B=1, Hq=2, Hkv=1, T=83, D=16, causal=causal, doc_ids=doc_ids, deterministic=True)


@pytest.mark.parametrize("name", ["output", "dq", "dk", "dv"])
def test_a_one_percent_error_is_caught(rng, name):
    doc_ids = packed_doc_ids([[25, 40]])
    with pytest.raises(AssertionError, match=name):
        hopper(rng, B=1, Hq=1, Hkv=1, T=65, D=16, doc_ids=doc_ids, corrupt=name)


@pytest.mark.parametrize("entry", hop._FWD_SPACE, ids=lambda e: "m{}n{}w{}s{}ws{:d}".format(*e))
def test_every_forward_candidate_of_the_gpu(rng, monkeypatch, entry):
    """Each autotuning candidate's tiles (and its warp-specialized single loop) in fp16, with the
    backward at the GPU's tiles, on ragged documents."""
    monkeypatch.setattr(hop, "_INTERPRET_FWD", entry)
    monkeypatch.setattr(hop, "_bwd_tiles", lambda d: dict(hop._INTERPRET_BWD, **hop._BWD_TILES[d]))
    doc_ids = packed_doc_ids([[70, 100, 30]])
    hopper(rng, B=1, Hq=2, Hkv=1, T=200, D=64, doc_ids=doc_ids, dtype=torch.float16)


def test_gpu_tiles_at_head_dim_128_without_documents(rng, monkeypatch):
    monkeypatch.setattr(hop, "_INTERPRET_FWD", hop._FWD_SPACE[0])
    monkeypatch.setattr(hop, "_bwd_tiles", lambda d: dict(hop._INTERPRET_BWD, **hop._BWD_TILES[d]))
    hopper(rng, B=1, Hq=2, Hkv=1, T=150, S=170, D=128, dtype=torch.float16)


def test_every_output_buffer_is_poisoned(rng, poisoned_buffers):
    hopper(rng, B=1, Hq=1, Hkv=1, T=16, D=16)
    names = "o lse delta dk dv dq".split()
    assert len(poisoned_buffers) == len(names), "a kernel output was allocated outside _empty"


def test_interior_blocks_never_read_document_ids():
    """With documents on the block grid every visited block pair is interior: the kernels must
    give the right answer even when the id array holds garbage (spans and runs stay right)."""
    T, D = 128, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen, requires_grad=True) for _ in range(3))
    doc_ids = packed_doc_ids([[64, 32, 32]])
    dense, lo, hi = attn._document_spans(doc_ids)
    runs = hop.document_runs(dense)
    garbage = torch.randint(100, 10**6, dense.shape, generator=gen, dtype=torch.int32)
    for causal in (True, False):
        out, _ = hop.flash_attention_hopper_forward(
            q, k, v, garbage, lo, hi, *runs, causal, D**-0.5, False
        )
        out.sum().backward()
        grads = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        ref = attention_reference(q, k, v, causal=causal, doc_ids=doc_ids)
        ref.sum().backward()
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        for g, x in zip(grads, (q, k, v)):
            torch.testing.assert_close(g, x.grad, atol=2e-5, rtol=1e-4)
            x.grad = None
    # Boundaries inside blocks do read the ids: the same garbage then breaks the output.
    doc_ids = packed_doc_ids([[50, 78]])
    dense, lo, hi = attn._document_spans(doc_ids)
    runs = hop.document_runs(dense)
    with torch.no_grad():
        out, _ = hop.flash_attention_hopper_forward(
            q, k, v, garbage, lo, hi, *runs, True, D**-0.5, False
        )
        ref = attention_reference(q, k, v, causal=True, doc_ids=doc_ids)
    assert not torch.allclose(out, ref, atol=1e-3)


def test_document_runs():
    dense = torch.tensor([[0, 0, 1, 1, 1, 0, 2], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    lo, hi = hop.document_runs(dense)
    assert lo.tolist() == [[0, 0, 2, 2, 2, 5, 6], [0, 0, 0, 0, 4, 4, 4]]
    assert hi.tolist() == [[2, 2, 5, 5, 5, 6, 7], [4, 4, 4, 4, 7, 7, 7]]
    assert lo.dtype == hi.dtype == torch.int32


def test_impl_is_chosen_by_argument_or_environment(monkeypatch):
    calls = []
    real = hop.flash_attention_hopper_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(hop, "flash_attention_hopper_forward", spy)
    q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    monkeypatch.delenv("KERNELS_ATTENTION_IMPL", raising=False)
    attention(q, k, v, backend="triton")
    assert not calls  # fa2 is the default
    attention(q, k, v, backend="triton", impl="hopper")
    monkeypatch.setenv("KERNELS_ATTENTION_IMPL", "hopper")
    attention(q, k, v, backend="triton")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, backend="triton", impl="fa3")


def test_without_descriptors_the_fa2_kernels_run_with_one_warning(monkeypatch):
    monkeypatch.setattr(hop, "HAS_DESCRIPTORS", False)
    monkeypatch.setattr(attn, "_warned", set())
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 1, 20, 16), torch.randn(1, 1, 20, 16)
    with pytest.warns(UserWarning, match="no tensor descriptors.*FlashAttention-2"):
        out = attention(q, k, v, backend="triton", impl="hopper")
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=2e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, backend="triton", impl="hopper")


def test_unaligned_rows_are_refused_by_the_hopper_path():
    x = torch.randn(1, 2, 10, 17)[..., :16]  # row stride of 17 elements: not 16-byte aligned
    assert "not 16-byte aligned" in hop.unsupported(x, x, x)
    y = torch.randn(1, 2, 10, 16)
    assert hop.unsupported(y, y, y) is None


def test_no_dense_mask_fallback_on_a_gpu(monkeypatch):
    """Where the kernels cannot run and the reference would build a (B, 1, T, S) mask, a GPU
    call is an error naming the shape; a mask-free shape still falls back."""
    monkeypatch.setattr(attn, "_refuses_dense_mask", lambda q: True)
    monkeypatch.setattr(attn, "_warned", set())
    q, k = torch.randn(1, 2, 9, 24), torch.randn(1, 1, 9, 24)
    doc_ids = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match=r"head dim 24.*\(1, 2, 9, 24\).*\(B, 1, 9, 9\)"):
        attention(q, k, k, doc_ids=doc_ids, backend="triton")
    k_long = torch.randn(1, 1, 12, 24)
    with pytest.raises(ValueError, match="dense"):
        attention(q, k_long, k_long, backend="triton")
    with pytest.warns(UserWarning, match="head dim 24"):
        attention(q, k, k, backend="triton")  # causal, T == S: SDPA needs no mask


def test_long_sequences_are_not_sent_to_the_reference():
    """Row offsets are 64-bit: no shape is routed away for the size of its offsets."""
    q = torch.empty_strided((1, 1, 2, 16), (2**33, 2**32, 2**31, 1))
    assert attn._unsupported(q, q, q) is None


def test_custom_ops_pass_opcheck():
    q = torch.randn(1, 1, 16, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, 16, 16, requires_grad=True) for _ in range(2))
    spans = attn._document_spans(packed_doc_ids([[5, 11]]))
    runs = hop.document_runs(spans[0])
    args = (q, k, v, *spans, *runs, True, 0.25, False)
    torch.library.opcheck(hop.flash_attention_hopper_forward, args)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = hop.flash_attention_hopper_forward(q, k, v, *spans, *runs, True, 0.25, False)
    args = (torch.randn_like(out), q, k, v, out, lse, *spans, *runs, True, 0.25, False)
    torch.library.opcheck(hop.flash_attention_hopper_backward, args)


def test_sm90_builds_cover_every_gpu_configuration():
    builds = hop.sm90_builds()
    seen = {(b["fn"], b["num_warps"], b["num_stages"], tuple(sorted(b["constexprs"].items())))
            for b in builds}  # fmt: skip
    for D in attn.supported_head_dims(on_gpu=True):
        for causal in (True, False):
            for has_doc in (True, False):
                configs = [hop._fwd_config(e) for e in hop._FWD_SPACE]
                kept = hop._prune_fwd(configs, {}, HEAD_DIM=D, HAS_DOC=has_doc)
                assert kept and not (has_doc and any(c.kwargs["WARP_SPEC"] for c in kept))
                flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, UPCAST=False)
                for cfg in kept:
                    consts = dict(flags, **cfg.kwargs)
                    key = (hop._hopper_fwd_kernel, cfg.num_warps, cfg.num_stages,
                           tuple(sorted(consts.items())))  # fmt: skip
                    assert key in seen, f"no sm_90 build for the forward {consts}"
                bm, bn, warps, stages = hop._BWD_TILES[D]["dkdv_doc" if has_doc else "dkdv"]
                consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn, DQ_TMA=True)
                key = (hop._hopper_bwd_kernel, warps, stages, tuple(sorted(consts.items())))
                assert key in seen, f"no sm_90 build for the backward {consts}"
    for b in builds:
        assert list(b["signature"]) == list(b["fn"].arg_names)
        assert b["descriptors"] == (b["fn"] is not hop._dq_convert_kernel)
        assert b["warp_specialized"] == bool(b["constexprs"].get("WARP_SPEC"))
