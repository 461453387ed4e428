"""The flash-attention kernels against a float64 reference, run by the Triton interpreter on CPU.

Every case draws fresh random inputs (the seed is in the failure message) and every buffer the
op allocates for a kernel to fill starts as NaN, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import warnings
import zlib

import pytest
import torch

import kernels
from kernels import attention, attention_reference
from pretrain.config import ModelConfig
from pretrain.model import Transformer

attn = importlib.import_module("kernels.attention")  # the module (``kernels.attention`` is the op)

pytestmark = [
    pytest.mark.skipif(
        not attn.INTERPRET, reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1"
    ),
    pytest.mark.usefixtures("poisoned_buffers"),  # every kernel output starts as NaN
]

TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    # The interpreter truncates fp32 -> bf16 instead of rounding: allow about two bf16 ulps.
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def seed_of(request) -> int:
    """A seed fixed per test (from its id), so a failure repeats; ATTENTION_TEST_SEED=random
    draws a fresh one each run to explore more inputs."""
    if os.environ.get("ATTENTION_TEST_SEED") == "random":
        return random.SystemRandom().randrange(2**31)
    return zlib.crc32(request.node.nodeid.encode()) % 2**31


@pytest.fixture
def rng(request):
    seed = seed_of(request)
    return seed, torch.Generator().manual_seed(seed)


def packed_doc_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, S) ids 0, 0, ..., 1, 1, ... from each row's document lengths."""
    rows = [
        torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row
    ]
    return torch.stack(rows)


def check_against_float64(
    rng,
    *,
    B: int,
    Hq: int,
    Hkv: int,
    T: int,
    D: int,
    S: int | None = None,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    bthd_layout: bool = False,
    impl: str = "fa2",
    deterministic: bool = False,
    corrupt: str | None = None,
) -> None:
    """Output and dq, dk, dv of the Triton op against the float64 reference on the same inputs.

    ``corrupt`` names a result ("output", "dq", "dk", "dv") to scale by 1.01 before comparing,
    which must then fail: the tolerances are tight enough to see a 1% error.
    """
    seed, gen = rng
    S = T if S is None else S

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if bthd_layout:  # the model's layout: (B, T, H, D) memory viewed as (B, H, T, D)
        q, k, v = (randn(B, n, h, D).transpose(1, 2) for n, h in ((T, Hq), (S, Hkv), (S, Hkv)))
    else:
        q, k, v = randn(B, Hq, T, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
    grad_out = randn(B, Hq, T, D)

    ours = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention(
        *ours, causal=causal, doc_ids=doc_ids, scale=scale, backend="triton", impl=impl,
        deterministic=deterministic,
    )  # fmt: skip
    out.backward(grad_out)

    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*exact, causal=causal, doc_ids=doc_ids, scale=scale)
    ref.backward(grad_out.double())

    assert out.dtype == dtype and out.shape == (B, Hq, T, D)
    for name, got, want in zip(
        ("output", "dq", "dk", "dv"),
        (out, *(x.grad for x in ours)),
        (ref, *(x.grad for x in exact)),
    ):
        assert got.dtype == dtype
        if name == corrupt:
            got = got * 1.01
        torch.testing.assert_close(
            got.double(), want, **TOLERANCES[dtype], msg=lambda m, n=name: f"{n}, seed {seed}: {m}"
        )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gqa_ratios(rng, causal, groups):
    check_against_float64(rng, B=1, Hq=groups, Hkv=1, T=50, D=16, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_ragged_length_over_several_blocks(rng, causal):
    check_against_float64(rng, B=2, Hq=2, Hkv=1, T=123, D=32, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents(rng, causal):
    doc_ids = packed_doc_ids([[20, 41, 5, 57], [90, 33]])  # boundaries inside and on blocks
    check_against_float64(rng, B=2, Hq=4, Hkv=2, T=123, D=16, causal=causal, doc_ids=doc_ids)


def test_recurring_document_ids_mask_by_id(rng):
    """Equal ids attend to each other even when not adjacent, exactly as the reference does."""
    doc_ids = torch.tensor([[4] * 10 + [9] * 40 + [4] * 15 + [1] * 30])
    check_against_float64(rng, B=1, Hq=2, Hkv=1, T=95, D=16, causal=True, doc_ids=doc_ids)


@pytest.mark.parametrize("D", [64, 128])
def test_large_head_dims(rng, D):
    doc_ids = packed_doc_ids([[13, 27]])
    check_against_float64(rng, B=1, Hq=2, Hkv=1, T=40, D=D, doc_ids=doc_ids)


def test_queries_are_the_last_positions_of_longer_keys(rng):
    doc_ids = packed_doc_ids([[30, 47]])
    check_against_float64(rng, B=1, Hq=2, Hkv=1, T=20, S=77, D=16, doc_ids=doc_ids)


def test_model_layout_and_custom_scale(rng):
    check_against_float64(rng, B=2, Hq=4, Hkv=2, T=37, D=16, scale=0.3, bthd_layout=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(rng, dtype):
    doc_ids = packed_doc_ids([[17, 30]])
    check_against_float64(rng, B=1, Hq=2, Hkv=1, T=47, D=32, doc_ids=doc_ids, dtype=dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_gpu_tile_shapes(rng, monkeypatch, D):
    """The Hopper tiles (BLOCK_M != BLOCK_N, 128-row blocks) in fp16, which the interpreter runs
    through the GPU's code path (half-precision tl.dot operands, fp32 accumulation)."""
    gpu_tiles = attn._tiles_for(D, interpret=False)
    monkeypatch.setattr(attn, "_tiles_for", lambda head_dim, interpret: gpu_tiles)
    doc_ids = packed_doc_ids([[70, 100, 30], [200]])
    check_against_float64(rng, B=2, Hq=2, Hkv=1, T=200, D=D, doc_ids=doc_ids, dtype=torch.float16)


def test_every_output_buffer_is_poisoned(rng, poisoned_buffers):
    check_against_float64(rng, B=1, Hq=1, Hkv=1, T=16, D=16)
    names = "o lse delta dk dv dq".split()
    assert len(poisoned_buffers) == len(names), "a kernel output was allocated outside _empty"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # rows that do see NaN keys
def test_skipped_blocks_are_never_read():
    """NaN keys/values in blocks a query block should skip must not reach its output or dq."""
    T, D = 128, 16  # interpreter blocks of 32
    q = torch.randn(1, 1, T, D, requires_grad=True)
    k, v = torch.randn(1, 1, T, D), torch.randn(1, 1, T, D)

    # Causal: query rows [0, 64) never look at keys from 64 on.
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 64:], v_nan[:, :, 64:] = float("nan"), float("nan")
    out = attention(q, k_nan, v_nan, backend="triton")
    (dq,) = torch.autograd.grad(out[:, :, :64].sum(), q)
    ref = attention_reference(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    torch.testing.assert_close(out[:, :, :64], ref, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(dq[:, :, :64]).all()

    # Documents: query rows [64, 128) all belong to the document [40, 128) and skip keys [0, 32).
    doc_ids = packed_doc_ids([[40, 88]])
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, :32], v_nan[:, :, :32] = float("nan"), float("nan")
    out = attention(q, k_nan, v_nan, doc_ids=doc_ids, causal=False, backend="triton")
    (dq,) = torch.autograd.grad(out[:, :, 64:].sum(), q)
    ref = attention_reference(q, k, v, doc_ids=doc_ids, causal=False)
    torch.testing.assert_close(out[:, :, 64:], ref[:, :, 64:], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(dq[:, :, 64:]).all()


def test_document_spans():
    doc_ids = torch.tensor([[7, 7, 3, 3, 3, 7, 2], [0, 0, 0, 0, 5, 5, 5]])
    dense, lo, hi = attn._document_spans(doc_ids)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    assert torch.equal(dense[:, :, None] == dense[:, None, :], same)
    assert lo.tolist() == [[0, 0, 2, 2, 2, 0, 6], [0, 0, 0, 0, 4, 4, 4]]
    assert hi.tolist() == [[6, 6, 5, 5, 5, 6, 7], [4, 4, 4, 4, 7, 7, 7]]
    assert dense.dtype == lo.dtype == hi.dtype == torch.int32


def test_unsupported_head_dim_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attn, "_warned", set())
    q, k, v = torch.randn(1, 2, 9, 24), torch.randn(1, 1, 9, 24), torch.randn(1, 1, 9, 24)
    with pytest.warns(UserWarning, match="head dim 24"):
        out = attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, attention_reference(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, backend="triton")  # the second call is silent


def test_bad_shapes_are_refused():
    q, k = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k, backend="triton")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head dim"):
        attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), backend="triton")
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        attention(q, k, k, doc_ids=torch.zeros(1, 7, dtype=torch.long), backend="triton")


def test_sm90_builds_cover_every_gpu_configuration():
    builds = attn.sm90_builds()
    seen = {(b["fn"], b["num_warps"], b["num_stages"], tuple(sorted(b["constexprs"].items())))
            for b in builds}  # fmt: skip
    kernels_by_kind = {"fwd": attn._attn_fwd_kernel, "dkdv": attn._attn_bwd_dkdv_kernel,
                       "dq": attn._attn_bwd_dq_kernel}  # fmt: skip
    for D in attn.supported_head_dims(on_gpu=True):
        tiles = attn._tiles_for(D, interpret=False)
        for kind, fn in kernels_by_kind.items():
            bm, bn, warps, stages = tiles[kind]
            for causal in (True, False):
                for has_doc in (True, False):
                    consts = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                                  HAS_DOC=has_doc, UPCAST=False)  # fmt: skip
                    key = (fn, warps, stages, tuple(sorted(consts.items())))
                    assert key in seen, f"no sm_90 build for {kind} D={D} {consts}"
    for b in builds:
        assert list(b["signature"]) == list(b["fn"].arg_names)
        assert {b["signature"][n] for n in ("Q", "K", "V") if n in b["signature"]} <= {
            "*bf16",
            "*fp16",
        }


def test_model_training_with_triton_attention_matches_reference(monkeypatch, request):
    """A few optimizer steps of the model: Triton attention against the PyTorch reference."""
    cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(seed_of(request))
    tokens = torch.randint(0, cfg.vocab_size, (2, 25), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = packed_doc_ids([[9, 15], [20, 4]])

    def train(backend: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        monkeypatch.setattr(kernels, "attention", functools.partial(attention, backend=backend))
        torch.manual_seed(0)
        model = Transformer(cfg)
        # A rate at which the loss falls: a diverging run magnifies fp32 rounding past any bound.
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(4):
            loss = model(inputs, targets, doc_ids=doc_ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    ref_losses, ref_params = train("torch")
    losses, params = train("triton")
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], atol=1e-5, rtol=1e-4, msg=name)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) functions and autograd registration agree with the real kernels, which
    is what lets torch.compile treat the op as one opaque call."""
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, 16, 16, requires_grad=True) for _ in range(2))
    spans = attn._document_spans(packed_doc_ids([[5, 11]]))
    torch.library.opcheck(attn._flash_attention_forward, (q, k, v, *spans, True, 0.25))
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op has no gradient itself
    out, lse = attn._flash_attention_forward(q, k, v, *spans, True, 0.25)
    args = (torch.randn_like(out), q, k, v, out, lse, *spans, True, 0.25)
    torch.library.opcheck(attn._flash_attention_backward, args)


def test_launch_shortens_the_pipeline_where_shared_memory_runs_out(monkeypatch):
    """Hopper-sized tiles on a GPU with less shared memory: fewer stages, remembered."""
    import triton

    tried = []

    class SmallGpuKernel:  # stands in for a launch on a GPU that fits only one stage
        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **consts):
                tried.append(num_stages)
                if num_stages > 1:
                    raise triton.runtime.errors.OutOfResources(160_000, 101_376, "shared memory")

            return launch

    monkeypatch.setattr(attn, "_stages_that_fit", {})
    kernel, args = SmallGpuKernel(), (torch.zeros(1),)
    attn._launch(kernel, (1,), args, {"BLOCK_M": 128}, num_warps=8, num_stages=3)
    attn._launch(kernel, (1,), args, {"BLOCK_M": 128}, num_warps=8, num_stages=3)
    assert tried == [3, 2, 1, 1]
