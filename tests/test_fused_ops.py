"""Fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy: Triton (interpreted) vs float64 math.

Each op's outputs and input gradients are compared with the same function written out in float64
here (not the module's own fp32 reference), with shapes that leave ragged edges in every block:
rows narrower than the block, head counts not a multiple of the head block, vocabularies spanning
several blocks with a partial last one, token counts not a multiple of the chunk.
"""

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from kernels.swiglu import swiglu

# The package exports functions under the same names as these modules, hence import_module.
ce_module = importlib.import_module("kernels.cross_entropy")
rms_norm_module = importlib.import_module("kernels.rms_norm")
rope_module = importlib.import_module("kernels.rope")

# bf16: the interpreter truncates fp32 -> bf16 instead of rounding, so allow a few bf16 ulps.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def _check_against_float64(op, reference64, inputs, dtype, *, atol_scale=1.0):
    """Run ``op`` on ``inputs`` cast to ``dtype`` and ``reference64`` in float64; compare all."""
    ours = [
        t.detach().to(dtype).clone().requires_grad_() if t.is_floating_point() else t
        for t in inputs
    ]
    ref = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out, out_ref = op(*ours), reference64(*ref)
    out = out if isinstance(out, tuple) else (out,)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in out_ref]
    torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out)])
    torch.autograd.backward(out_ref, grads)
    tol = TOL[dtype] * atol_scale
    for o, r in zip(out, out_ref):
        assert o.dtype == dtype or o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol)
    for t, r in zip(ours, ref):
        if t.is_floating_point():
            assert t.grad is not None
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=tol, atol=tol)
    return out


def _is_fused(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "Function" in type(out.grad_fn).__name__


# RMSNorm -----------------------------------------------------------------------------------------


def _rms_norm64(x, w, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((2, 7, 50), torch.float32),
        ((2, 7, 50), torch.float16),
        ((2, 7, 50), torch.bfloat16),
        ((3, 128), torch.float32),
    ],
)
def test_rms_norm_matches_float64(shape, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(shape), 1 + 0.1 * torch.randn(shape[-1])
    op = functools.partial(rms_norm, eps=1e-5, backend="triton")
    (out,) = _check_against_float64(op, _rms_norm64, [x, w], dtype)
    assert _is_fused(out)


def test_rms_norm_strided_input_and_bf16_weight_follow_the_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 40)[:, :33]  # rows with a stride wider than the row
    w = torch.randn(33).to(torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, w, backend="triton"), rms_norm_reference(x, w))


def test_rms_norm_weight_gradient_sums_over_many_rows():
    """More rows than backward programs, so each program accumulates several rows' dw."""
    torch.manual_seed(0)
    x, w = torch.randn(19, 24), torch.randn(24)
    _check_against_float64(
        functools.partial(rms_norm, backend="triton"), _rms_norm64, [x, w], torch.float32
    )


@pytest.fixture
def poison_rms_outputs(monkeypatch):
    """Every buffer rms_norm.py allocates for an output starts as NaN: unwritten elements show."""

    def nan_empty(shape, dtype, device):
        return torch.full(
            torch.Size(shape if isinstance(shape, tuple) else (shape,)),
            float("nan"),
            dtype=dtype,
            device=device,
        )

    monkeypatch.setattr(rms_norm_module, "_empty", nan_empty)


@pytest.fixture
def wide_rows(monkeypatch):
    """Rows wider than 64 features take the looped path, in blocks of 32."""
    monkeypatch.setattr(rms_norm_module, "MAX_ONE_BLOCK", 64)
    monkeypatch.setattr(rms_norm_module, "WIDE_BLOCK", 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_wide_rows_loop_and_match_float64(dtype, wide_rows, poison_rms_outputs):
    """150 features: four full 32-blocks and a ragged one; 9 rows over 4 backward programs."""
    assert rms_norm_module.kernel_config(150) == (32, rms_norm_module.WIDE_NUM_WARPS, False)
    torch.manual_seed(0)
    x, w = torch.randn(9, 150), 1 + 0.1 * torch.randn(150)
    op = functools.partial(rms_norm, eps=1e-5, backend="triton")
    (out,) = _check_against_float64(op, _rms_norm64, [x, w], dtype)
    assert _is_fused(out)


def _add_rms_norm64(x, residual, w, eps=1e-5):
    summed = x + residual
    return _rms_norm64(summed, w, eps), summed


@pytest.mark.parametrize(
    "shape,dtype,wide",
    [
        ((2, 7, 50), torch.float32, False),
        ((2, 7, 50), torch.bfloat16, False),
        ((3, 5, 100), torch.float32, True),
        ((3, 5, 100), torch.float16, True),
    ],
)
def test_add_rms_norm_matches_float64(shape, dtype, wide, poison_rms_outputs, monkeypatch):
    """Both outputs (normalized, new residual) and the gradients of x, residual and weight."""
    if wide:
        monkeypatch.setattr(rms_norm_module, "MAX_ONE_BLOCK", 64)
        monkeypatch.setattr(rms_norm_module, "WIDE_BLOCK", 32)
    torch.manual_seed(0)
    x, residual = torch.randn(shape), 2 * torch.randn(shape)
    w = 1 + 0.1 * torch.randn(shape[-1])
    op = functools.partial(kernels.add_rms_norm, eps=1e-5, backend="triton")
    normed, summed = _check_against_float64(op, _add_rms_norm64, [x, residual, w], dtype)
    assert _is_fused(normed) and _is_fused(summed)
    assert normed.dtype == summed.dtype == dtype


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward is 1% off: a wrong gradient the comparison must catch."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def test_add_rms_norm_comparison_catches_a_one_percent_error():
    torch.manual_seed(0)
    x, residual, w = torch.randn(4, 40), torch.randn(4, 40), 1 + 0.1 * torch.randn(40)

    def wrong_output(x, r, w):
        normed, summed = kernels.add_rms_norm(x, r, w, backend="triton")
        return normed * 1.01, summed

    def wrong_gradient(x, r, w):
        return kernels.add_rms_norm(_ScaleGrad.apply(x), r, w, backend="triton")

    for op in (wrong_output, wrong_gradient):
        with pytest.raises(AssertionError):
            _check_against_float64(op, _add_rms_norm64, [x, residual, w], torch.float32)


def test_add_rms_norm_with_only_the_residual_stream_used_and_mixed_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 24, requires_grad=True)
    residual = torch.randn(3, 24, requires_grad=True)
    w = torch.ones(24, requires_grad=True)
    _, summed = kernels.add_rms_norm(x, residual, w, backend="triton")
    (summed * torch.arange(24.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(24.0).expand(3, 24))
    assert torch.equal(residual.grad, x.grad) and torch.count_nonzero(w.grad) == 0
    # Mismatched dtypes take the separate reference ops.
    normed, summed = kernels.add_rms_norm(
        x.detach(), residual.detach().double(), w, backend="triton"
    )
    assert not _is_fused(normed) and summed.dtype == torch.float64


# RoPE --------------------------------------------------------------------------------------------


def _rope64(q, k, cos, sin):
    def rotate(x):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_matches_float64_with_shared_positions(dtype):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 5, 3, 11, 32  # head counts not a multiple of the head block
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    cos, sin = rope_cos_sin(torch.arange(T), D)

    def op(q, k):
        return apply_rope(q, k, cos, sin, backend="triton")

    def ref(q, k):
        return _rope64(q, k, cos.double(), sin.double())

    out = _check_against_float64(op, ref, [q, k], dtype)
    assert all(_is_fused(o) for o in out)


def test_rope_matches_float64_with_per_sequence_positions_and_strided_q():
    """(B, 1, T, D/2) angles, q as the model makes it: a transposed view of (B, T, H, D)."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 9, 16
    positions = torch.randint(0, 100, (B, T))
    cos, sin = rope_cos_sin(positions, D)
    cos, sin = cos[:, None], sin[:, None]
    q_bthd, k = torch.randn(B, T, H, D), torch.randn(B, 2, T, D)

    def op(q_bthd, k):
        return apply_rope(q_bthd.transpose(1, 2), k, cos, sin, backend="triton")

    def ref(q_bthd, k):
        return _rope64(q_bthd.transpose(1, 2), k, cos.double(), sin.double())

    _check_against_float64(op, ref, [q_bthd, k], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_bthd_layout_reads_and_writes_b_t_h_d_and_matches_float64(dtype, monkeypatch):
    """q/k (B, T, H, D) in and out, forward and backward, with NaN-filled output buffers; q a
    strided slice of a fused projection output (B, T, Hq + 2 Hkv, D)."""

    def nan_empty(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rope_module, "_empty", nan_empty)
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 5, 3, 7, 32
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D)
    positions = torch.randint(0, 50, (B, T))
    cos, sin = rope_cos_sin(positions, D)
    cos, sin = cos[:, None], sin[:, None]

    def op(qkv):
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]
        return apply_rope(q, k, cos, sin, backend="triton", layout="bthd")

    def ref(qkv):
        q, k = qkv[:, :, :Hq].transpose(1, 2), qkv[:, :, Hq : Hq + Hkv].transpose(1, 2)
        q_out, k_out = _rope64(q, k, cos.double(), sin.double())
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    q_out, k_out = _check_against_float64(op, ref, [qkv], dtype)
    assert q_out.shape == (B, T, Hq, D) and q_out.is_contiguous() and k_out.is_contiguous()
    # A free view over what the kernel wrote, not a copy made after it.
    assert type(q_out.grad_fn).__name__ == "TransposeBackward0"
    assert "_RopeFunction" in type(q_out.grad_fn.next_functions[0][0]).__name__
    # The reference follows the same layout argument; an unknown layout is an error.
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]
    for ours, theirs in zip(
        apply_rope(q, k, cos, sin, backend="triton", layout="bthd"),
        apply_rope_reference(q, k, cos, sin, layout="bthd"),
    ):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(q, k, cos, sin, backend="triton", layout="bhdt")


def test_rope_reference_agrees_with_float64():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    for ours, ref in zip(apply_rope_reference(q, k, cos, sin), _rope64(q, k, cos, sin)):
        torch.testing.assert_close(ours, ref)


# SwiGLU ------------------------------------------------------------------------------------------


def _swiglu64(gate, up):
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_matches_float64(dtype):
    torch.manual_seed(0)
    gate, up = 3 * torch.randn(3, 5, 173), torch.randn(3, 5, 173)  # 2595: several ragged blocks
    op = functools.partial(swiglu, backend="triton")
    (out,) = _check_against_float64(op, _swiglu64, [gate, up], dtype)
    assert _is_fused(out)


# Linear + cross-entropy --------------------------------------------------------------------------


def _linear_ce64(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _ce_inputs(n=37, d=16, vocab=300, ignore_every=5, seed=0):
    torch.manual_seed(seed)
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d) / math.sqrt(d)
    targets = torch.randint(0, vocab, (n,))
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [None, 10])
def test_linear_cross_entropy_matches_float64(reduction, chunk_tokens):
    """Vocabulary 300 spans three 128-wide blocks; 37 tokens in chunks of 10 leave a partial one."""
    hidden, weight, targets = _ce_inputs()
    assert weight.shape[0] % ce_module.INTERPRET_BLOCK_V != 0

    def op(h, w):
        return linear_cross_entropy(
            h, w, targets, reduction=reduction, backend="triton", chunk_tokens=chunk_tokens
        )

    def ref(h, w):
        return _linear_ce64(h, w, targets, reduction=reduction)

    (loss,) = _check_against_float64(op, ref, [hidden, weight], torch.float32)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_linear_cross_entropy_fp16():
    hidden, weight, targets = _ce_inputs(n=20, vocab=200)

    def op(h, w):
        return linear_cross_entropy(h, w, targets, backend="triton", chunk_tokens=8)

    def ref(h, w):
        return _linear_ce64(h, w, targets)

    _check_against_float64(op, ref, [hidden, weight], torch.float16, atol_scale=2)


def test_linear_cross_entropy_custom_ignore_index():
    hidden, weight, targets = _ce_inputs(ignore_every=0)
    targets[3:9] = 7

    def op(h, w):
        return linear_cross_entropy(h, w, targets, ignore_index=7, backend="triton")

    def ref(h, w):
        return _linear_ce64(h, w, targets, ignore_index=7)

    _check_against_float64(op, ref, [hidden, weight], torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_all_targets_ignored(reduction):
    """No valid target: the sum is 0, the mean NaN (as F.cross_entropy), the gradients zero."""
    hidden, weight, targets = _ce_inputs(n=9)
    targets[:] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction, backend="triton")
    ref = linear_cross_entropy_reference(hidden, weight, targets, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert torch.isnan(loss).item() == (reduction == "mean")
    if reduction == "sum":
        loss.backward()
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_linear_cross_entropy_gradient_scales_with_upstream_and_skips_frozen_weight():
    hidden, weight, targets = _ce_inputs()
    h = hidden.clone().requires_grad_()
    (3.0 * linear_cross_entropy(h, weight, targets, backend="triton", chunk_tokens=16)).backward()
    h64 = hidden.double().requires_grad_()
    (3.0 * _linear_ce64(h64, weight.double(), targets)).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-5, atol=2e-5)


def test_linear_cross_entropy_without_grad_gives_the_loss():
    hidden, weight, targets = _ce_inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, backend="triton", chunk_tokens=7)
    expected = _linear_ce64(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_rejects_bad_shapes_and_reduction():
    hidden, weight, targets = _ce_inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none", backend="triton")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1], backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(hidden, weight.double(), targets, backend="triton")


# Build lists for the sm_90 checker ----------------------------------------------------------------


def test_sm90_builds_cover_every_configuration_the_dispatchers_pick():
    def configs(module, key):
        builds = module.sm90_builds()
        for b in builds:
            assert set(b["signature"]) >= set(b["constexprs"])
            assert all(b["signature"][name] == "constexpr" for name in b["constexprs"])
        return {(b["constexprs"][key], b["num_warps"]) for b in builds}

    rms_builds = rms_norm_module.sm90_builds()
    rms = {
        (b["constexprs"]["BLOCK_N"], b["num_warps"], b["constexprs"]["ONE_BLOCK"], b["name"][:12])
        for b in rms_builds
    }
    for n in [1, 100, 128, 129, 1000, 2048, 3000, 4096, 5000, 8192, 8193, 16384, 50000]:
        for kind in ("rms_norm_fwd", "rms_norm_bwd"):
            assert rms_norm_module.kernel_config(n) + (kind,) in rms
    for fused in (False, True):  # the residual variants of every size exist too
        assert sum(b["constexprs"].get("HAS_RESIDUAL") is fused for b in rms_builds) == 24
        assert sum(b["constexprs"].get("HAS_DS") is fused for b in rms_builds) == 24
    rope = configs(rope_module, "BLOCK_HALF")
    for head_dim in range(2, rope_module.MAX_HEAD_DIM + 1, 2):
        block_half, _, num_warps = rope_module.kernel_config(head_dim, torch.device("cuda"))
        assert (block_half, num_warps) in rope
    ce = configs(ce_module, "BLOCK_V")
    assert ce_module.kernel_config(torch.device("cuda")) in ce


# Dispatch and use inside the model ---------------------------------------------------------------


def test_cpu_tensors_run_the_reference_unless_triton_is_forced():
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    assert not _is_fused(rms_norm(x, w))
    assert not _is_fused(rms_norm(x, w, backend="torch"))
    assert _is_fused(rms_norm(x, w, backend="triton"))


def test_transformer_loss_and_gradients_with_fused_ops_match_the_references(monkeypatch):
    """The model's own calls (strided q, reshaped hidden, tied head) through the fused ops."""
    from pretrain.config import ModelConfig
    from pretrain.model import Transformer

    cfg = ModelConfig(
        vocab_size=150, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16,
        tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(0, 150, (2, 12))
    targets = torch.randint(0, 150, (2, 12))
    targets[0, :4] = -100

    def loss_and_grads():
        model.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads()
    for name in ("rms_norm", "apply_rope", "swiglu", "linear_cross_entropy"):
        monkeypatch.setattr(
            kernels, name, functools.partial(getattr(kernels, name), backend="triton")
        )
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# Linear + cross-entropy: target checks, chunking, weight-gradient accumulation --------------------


def test_linear_cross_entropy_rejects_out_of_range_targets_but_keeps_ignore_index():
    hidden, weight, targets = _ce_inputs(n=12, vocab=200)  # every 5th target is -100 (ignored)
    for bad in (200, -1, 10_000):
        wrong = targets.clone()
        wrong[7] = bad
        with pytest.raises(ValueError, match=f"target {bad} at token 7 is outside"):
            linear_cross_entropy(hidden, weight, wrong, backend="triton")
    # Skipping the check makes the bad token's loss NaN instead of a plausible number.
    wrong = targets.clone()
    wrong[7] = 200
    loss = linear_cross_entropy(hidden, weight, wrong, backend="triton", validate_targets=False)
    assert torch.isnan(loss)
    # A custom ignore_index outside the vocabulary is still just ignored.
    custom = targets.clone()
    custom[targets == -100] = 999
    loss = linear_cross_entropy(hidden, weight, custom, ignore_index=999, backend="triton")
    expected = _linear_ce64(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_default_chunks_are_multiples_of_256_tokens():
    for vocab in (50_257, 128_256, 32_000, 1_000_000, 4_000_000):
        for dtype in (torch.bfloat16, torch.float32):
            chunk = ce_module.default_chunk_tokens(vocab, dtype)
            assert chunk % 256 == 0 and chunk >= 256
            assert chunk * vocab * dtype.itemsize <= max(ce_module.CHUNK_BYTES, 256 * vocab * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_gradient_accumulates_in_fp32_without_a_full_half_precision_temporary(
    dtype, monkeypatch
):
    """On CPU the fp32-output addmm is missing, so the slab path runs: slabs of 7 vocab rows."""
    torch.manual_seed(0)
    V, d, n = 50, 16, 24
    monkeypatch.setattr(ce_module, "FALLBACK_SLAB_BYTES", 7 * d * torch.finfo(dtype).bits // 8)
    start = torch.randn(V, d)
    g, h = torch.randn(n, V).to(dtype), torch.randn(n, d).to(dtype)
    grad_weight = start.clone()
    ce_module._accumulate_weight_grad(grad_weight, g, h)
    ce_module._accumulate_weight_grad(grad_weight, g, h)
    expected = start.double() + 2 * g.double().t() @ h.double()
    assert grad_weight.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(grad_weight.double(), expected, rtol=tol, atol=tol)
    if dtype != torch.float32:
        assert ce_module._FP32_ADDMM.get("cpu") is False


def test_linear_cross_entropy_fp16_weight_gradient_scales_with_upstream():
    """The backward scales in place and rounds straight into the weight's dtype."""
    hidden, weight, targets = _ce_inputs(n=20, vocab=200)
    h, w = hidden.half().requires_grad_(), weight.half().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, backend="triton", chunk_tokens=8)
    (2.5 * loss).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (2.5 * _linear_ce64(h64, w64, targets)).backward()
    assert w.grad.dtype == torch.float16
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-2, atol=1e-3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss = linear_cross_entropy(h, w, targets, backend="triton", chunk_tokens=8)
        loss.backward(retain_graph=True)
        loss.backward()
