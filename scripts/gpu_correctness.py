"""Check every Triton kernel on a CUDA GPU against a high-precision reference, in fp32/bf16/fp16.

The CPU test suite runs the kernels in the Triton interpreter, which cannot do bf16 arithmetic,
races or tf32; this script runs the compiled kernels on the GPU. For each op, shape and dtype it
computes the outputs and input gradients three ways: our kernel in the dtype, the PyTorch
reference in the same dtype, and the reference on float64 copies (the yardstick; references that
accumulate in fp32 do so there too). Ours passes when its error is within twice the reference's
own error in that dtype, or below a small floor. Every call of ours is made with the module's
reference function replaced by one that raises, so a silent fallback cannot pass as the kernel.

Ops: attention (causal, non-causal, GQA, document masks, ragged lengths), decode attention,
RMSNorm and the fused residual add + RMSNorm (against ``torch.nn.functional.rms_norm``), SwiGLU,
RoPE in both layouts (``bhtd``, and ``bthd`` on strided views of a fused q/k/v projection),
linear + cross-entropy, Newton-Schulz orthogonalization, ten AdamW steps against
torch.optim.AdamW (plain, and with the gradient clipped through ``clip_grad_scale`` /
``step(grad_scale=...)`` against ``clip_grad_norm_``), and ten Muon steps against
torch.optim.Muon (torch >= 2.9) where the reference for both is the same Muon in float64.

Usage::

    PYTHONPATH=. python scripts/gpu_correctness.py [--json PATH]
    python scripts/gpu_correctness.py --smoke     # tiny shapes on CPU, Triton interpreter

Exit 1 when a check fails; 0 with a message when there is no CUDA device (without --smoke).
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before kernels is imported: the decorators bind to the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

# Errors below these (relative to the largest reference value) pass whatever the baseline does.
# fp32 allows for tf32 matrix products, the GPU default in tl.dot.
FLOOR = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
FLOOR_POINTWISE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# Five bf16 Newton-Schulz steps land a few percent from the exact iteration whatever the order of
# accumulation; a wrong kernel (coefficients, a transpose, a padding tile) is off by O(1).
FLOOR_NEWTON_SCHULZ = {torch.bfloat16: 5e-2}


@dataclass
class Check:
    op: str
    case: str
    dtype: str
    err_ours: float
    err_torch: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.err_ours <= self.limit


@contextlib.contextmanager
def no_fallback(module_name: str, attr: str) -> Iterator[None]:
    """Make ``module.attr`` (the op's PyTorch path) raise while ours runs."""
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{module_name}.{attr} was called: the op fell back to PyTorch")

    setattr(module, attr, refuse)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not cover.*")
            yield
    finally:
        setattr(module, attr, original)


def outputs_and_grads(fn: Callable, inputs: list, grad_seed: int) -> list[torch.Tensor]:
    """Outputs of ``fn(*inputs)`` and the gradients of the float inputs for a fixed upstream."""
    leaves = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    if not leaves:
        return [o.detach() for o in outs]
    gen = torch.Generator(device=outs[0].device).manual_seed(grad_seed)
    ups = [torch.randn(o.shape, device=o.device, generator=gen).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    return [o.detach() for o in outs] + list(grads)


def cast_inputs(inputs: list, dtype: torch.dtype) -> list:
    """Leaf copies of the float tensors in ``dtype`` (with grad where the original had it)."""
    cast = []
    for x in inputs:
        if torch.is_tensor(x) and x.is_floating_point():
            y = x.detach().to(dtype)
            cast.append(y.requires_grad_(x.requires_grad))
        else:
            cast.append(x)
    return cast


def relative_error(got: list[torch.Tensor], gold: list[torch.Tensor]) -> float:
    """Largest |got - gold| over all tensors, each relative to its gold's largest value."""
    errs = []
    for g, r in zip(got, gold):
        r = r.double()
        errs.append(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return max(errs)


def compare(op, case, dtype, ours, reference, inputs, fallback, floor=FLOOR, grad_seed=0) -> Check:
    """Ours and the reference in ``dtype`` against the reference in float64."""
    gold = outputs_and_grads(reference, cast_inputs(inputs, torch.float64), grad_seed)
    same = outputs_and_grads(reference, cast_inputs(inputs, dtype), grad_seed)
    with no_fallback(*fallback):
        mine = outputs_and_grads(ours, cast_inputs(inputs, dtype), grad_seed)
    err_torch, err_ours = relative_error(same, gold), relative_error(mine, gold)
    return Check(op, case, str(dtype).removeprefix("torch."), err_ours, err_torch,
                 limit_for(err_torch, floor[dtype]))  # fmt: skip


def limit_for(err_torch: float, floor: float) -> float:
    """Twice the reference's own error, at least ``floor``; just ``floor`` when the reference
    overflowed in the dtype (an infinite limit would pass anything)."""
    return max(2 * err_torch, floor) if math.isfinite(err_torch) else floor


# --------------------------------------------------------------------------- the ops


def randn(*shape, device, grad=True, seed=0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, device=device, generator=gen, dtype=torch.float32).requires_grad_(
        grad
    )


def attention_checks(device, dtypes, smoke: bool) -> list[Check]:
    if smoke:
        cases = [(1, 2, 2, 50, 32, True, False), (1, 4, 2, 40, 16, False, True)]
    else:
        cases = [
            (2, 4, 4, 256, 64, True, False),
            (1, 8, 2, 1000, 128, True, False),  # GQA, ragged length
            (2, 4, 2, 123, 64, False, False),
            (2, 8, 8, 300, 128, True, True),  # packed documents
            (1, 4, 1, 50, 128, True, False),
        ]
    checks = []
    for B, Hq, Hkv, T, D, causal, docs in cases:
        doc_ids = None
        if docs:  # three documents of uneven lengths per row
            cuts = torch.tensor([T // 5, T // 2], device=device)
            doc_ids = (torch.arange(T, device=device)[None, :] >= cuts[:, None]).sum(0)
            doc_ids = doc_ids.expand(B, T).contiguous()
        inputs = [
            randn(B, Hq, T, D, device=device, seed=1),
            randn(B, Hkv, T, D, device=device, seed=2),
        ]
        inputs.append(randn(B, Hkv, T, D, device=device, seed=3))
        label = (
            f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D}"
            + (" causal" if causal else "")
            + (" docs" if docs else "")
        )

        def ref(q, k, v, causal=causal, doc_ids=doc_ids):
            return kernels.attention_reference(q, k, v, causal=causal, doc_ids=doc_ids)

        for impl in ("fa2", "hopper"):  # the hopper path: descriptors, atomic-dQ backward

            def ours(q, k, v, causal=causal, doc_ids=doc_ids, impl=impl):
                return kernels.attention(
                    q, k, v, causal=causal, doc_ids=doc_ids, backend="triton", impl=impl
                )

            for dtype in dtypes:
                checks.append(compare("attention", f"{label} {impl}", dtype, ours, ref, inputs,
                                      ("kernels.attention", "attention_reference")))  # fmt: skip
    return checks


def decode_attention_checks(device, dtypes, smoke: bool) -> list[Check]:
    cases = [(3, 4, 2, 64, 32)] if smoke else [(5, 8, 2, 1024, 64), (4, 32, 8, 2048, 128)]
    checks = []
    for B, Hq, Hkv, L, D in cases:
        q = randn(B, Hq, D, device=device, grad=False, seed=4)
        k_cache = randn(B + 2, Hkv, L, D, device=device, grad=False, seed=5)
        v_cache = randn(B + 2, Hkv, L, D, device=device, grad=False, seed=6)
        slots = torch.arange(B, device=device, dtype=torch.int32).flip(0) + 1
        lengths = torch.linspace(1, L, B, device=device).round().to(torch.int32)
        label = f"B{B} Hq{Hq} Hkv{Hkv} L{L} D{D}"

        def ours(q, kc, vc, slots=slots, lengths=lengths):
            return decode_attention(q, kc, vc, slots, lengths, backend="triton")

        def ref(q, kc, vc, slots=slots, lengths=lengths):
            return decode_attention_reference(q, kc, vc, slots, lengths)

        for dtype in dtypes:
            checks.append(compare("decode_attention", label, dtype, ours, ref, [q, k_cache, v_cache],
                                  ("kernels.decode_attention", "decode_attention_reference")))  # fmt: skip
    return checks


def pointwise_checks(device, dtypes, smoke: bool) -> list[Check]:
    checks = []
    norm_shapes = [(3, 50, 256)] if smoke else [(3, 50, 4096), (1000, 8192), (7, 2048), (5, 768)]
    for shape in norm_shapes:
        inputs = [
            randn(*shape, device=device, seed=7),
            1 + 0.1 * randn(shape[-1], device=device, seed=8),
        ]
        inputs[1] = inputs[1].detach().requires_grad_()
        for dtype in dtypes:
            checks.append(compare(
                "rms_norm", "x".join(map(str, shape)), dtype,
                lambda x, w: kernels.rms_norm(x, w, backend="triton"), kernels.rms_norm_reference,
                inputs, ("kernels.rms_norm", "rms_norm_reference"), FLOOR_POINTWISE,
            ))  # fmt: skip
    glu_shapes = [(17, 96)] if smoke else [(123, 14336), (4, 257, 2048)]
    for shape in glu_shapes:
        inputs = [randn(*shape, device=device, seed=9), randn(*shape, device=device, seed=10)]
        for dtype in dtypes:
            checks.append(compare(
                "swiglu", "x".join(map(str, shape)), dtype,
                lambda g, u: kernels.swiglu(g, u, backend="triton"), kernels.swiglu_reference,
                inputs, ("kernels.swiglu", "swiglu_reference"), FLOOR_POINTWISE,
            ))  # fmt: skip
    rope_cases = [(2, 4, 2, 20, 32, False)] if smoke else [
        (2, 8, 2, 123, 128, False), (1, 12, 12, 1024, 64, False), (3, 4, 4, 77, 64, True)
    ]  # fmt: skip
    for B, Hq, Hkv, T, D, per_row in rope_cases:
        positions = torch.arange(T, device=device)
        if per_row:  # packed documents restart their positions
            positions = (positions[None, :] + 7 * torch.arange(B, device=device)[:, None]) % 50
        cos, sin = kernels.rope_cos_sin(positions, D)
        if per_row:
            cos, sin = cos[:, None], sin[:, None]
        inputs = [
            randn(B, Hq, T, D, device=device, seed=11),
            randn(B, Hkv, T, D, device=device, seed=12),
        ]

        def ours(q, k, cos=cos, sin=sin):
            return kernels.apply_rope(q, k, cos, sin, backend="triton")

        def ref(q, k, cos=cos, sin=sin):
            return kernels.apply_rope_reference(q, k, cos, sin)

        label = f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D}" + (" per-row positions" if per_row else "")
        for dtype in dtypes:
            checks.append(compare("rope", label, dtype, ours, ref, inputs,
                                  ("kernels.rope", "apply_rope_reference"), FLOOR_POINTWISE))  # fmt: skip
    return (
        checks
        + add_rms_norm_checks(device, dtypes, smoke)
        + rope_bthd_checks(device, dtypes, smoke)
    )


def add_rms_norm_checks(device, dtypes, smoke: bool) -> list[Check]:
    """The residual add fused with RMSNorm against PyTorch's own ``F.rms_norm`` of the sum."""
    checks, dtypes = [], dtypes[:1] if smoke else dtypes  # --smoke: the logic, in fp32
    for shape in [(2, 4, 64)] if smoke else [(3, 50, 4096), (1000, 8192), (5, 768)]:
        inputs = [
            randn(*shape, device=device, seed=17),
            randn(*shape, device=device, seed=18),
            (1 + 0.1 * randn(shape[-1], device=device, seed=19)).detach().requires_grad_(),
        ]

        def ref(x, r, w):
            summed = x + r
            return torch.nn.functional.rms_norm(summed, (w.shape[0],), w, 1e-5), summed

        for dtype in dtypes:
            checks.append(compare(
                "add_rms_norm", "x".join(map(str, shape)), dtype,
                lambda x, r, w: kernels.add_rms_norm(x, r, w, 1e-5, backend="triton"), ref,
                inputs, ("kernels.rms_norm", "add_rms_norm_reference"), FLOOR_POINTWISE,
            ))  # fmt: skip
    return checks


def rope_bthd_checks(device, dtypes, smoke: bool) -> list[Check]:
    """RoPE in the (B, T, H, D) layout on q and k as strided views of one fused q/k/v output,
    the way a fused projection hands them over (the gradient flows into the fused tensor)."""
    checks, dtypes = [], dtypes[:1] if smoke else dtypes
    for B, Hq, Hkv, T, D in (
        [(1, 2, 1, 6, 16)] if smoke else [(2, 32, 8, 257, 64), (1, 8, 8, 1024, 128)]
    ):
        cos, sin = kernels.rope_cos_sin(torch.arange(T, device=device), D)
        qkv = randn(B, T, Hq + 2 * Hkv, D, device=device, seed=20)

        def split(qkv, Hq=Hq, Hkv=Hkv):
            return qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]

        def ours(qkv, cos=cos, sin=sin):
            return kernels.apply_rope(*split(qkv), cos, sin, backend="triton", layout="bthd")

        def ref(qkv, cos=cos, sin=sin):  # the bhtd reference on transposed copies
            q, k = (t.transpose(1, 2) for t in split(qkv))
            q_out, k_out = kernels.apply_rope_reference(q, k, cos, sin)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)

        for dtype in dtypes:
            checks.append(compare("rope bthd", f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} fused qkv", dtype,
                                  ours, ref, [qkv], ("kernels.rope", "apply_rope_reference"),
                                  FLOOR_POINTWISE))  # fmt: skip
    return checks


def cross_entropy_checks(device, dtypes, smoke: bool) -> list[Check]:
    cases = (
        [(37, 32, 300, "mean")]
        if smoke
        else [(1000, 1024, 32000, "mean"), (513, 768, 50304, "sum")]
    )
    checks = []
    for N, d, V, reduction in cases:
        hidden = randn(N, d, device=device, seed=13)
        weight = (randn(V, d, device=device, seed=14) * d**-0.5).detach().requires_grad_()
        targets = torch.randint(
            0, V, (N,), device=device, generator=torch.Generator(device=device).manual_seed(15)
        )
        targets[::7] = -100  # ignored positions

        def ours(h, w, targets=targets, reduction=reduction):
            return kernels.linear_cross_entropy(
                h, w, targets, reduction=reduction, backend="triton"
            )

        def ref(h, w, targets=targets, reduction=reduction):
            return kernels.linear_cross_entropy_reference(h, w, targets, reduction=reduction)

        for dtype in dtypes:
            checks.append(compare("linear_cross_entropy", f"N{N} d{d} V{V} {reduction}", dtype,
                                  ours, ref, [hidden, weight],
                                  ("kernels.cross_entropy", "linear_cross_entropy_reference")))  # fmt: skip
    return checks


def adamw_checks(device, dtypes, smoke: bool) -> list[Check]:
    """Ten steps of ours vs torch.optim.AdamW on fp32 masters rounded to the dtype each step.

    kernels.AdamW keeps fp32 moments for every parameter dtype and stores the parameter in its
    own dtype after each update; the reference does the same explicitly, in float64.
    """
    shapes = (
        [(33, 17), (64,), (3, 5, 7)]
        if smoke
        else [(4096, 1024), (1024,), (50304, 768), (3, 1000, 7)]
    )
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    checks = []
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(16)
        init = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
        grads = [
            [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
            for _ in range(10)
        ]
        mine = [p.clone() for p in init]
        gold = [p.double() for p in init]
        same = [p.clone() for p in init]
        ours_opt = kernels.AdamW(mine, backend="triton", **hyper)
        gold_opt = torch.optim.AdamW(gold, foreach=False, **hyper)
        same_opt = torch.optim.AdamW(same, foreach=False, **hyper)
        for step in grads:
            for group, opt in ((mine, ours_opt), (gold, gold_opt), (same, same_opt)):
                for p, g in zip(group, step):
                    p.grad = g.to(p.dtype)
                if opt is ours_opt:
                    with no_fallback("kernels.adamw", "_torch_update"):
                        opt.step()
                else:
                    opt.step()
            with torch.no_grad():
                for p in gold:  # the parameter lives in ``dtype`` between steps
                    p.copy_(p.to(dtype).double())
        err_ours, err_torch = relative_error(mine, gold), relative_error(same, gold)
        floor = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        limit = max(2 * err_torch, floor)
        checks.append(Check("adamw", "10 steps " + " ".join("x".join(map(str, s)) for s in shapes),
                            str(dtype).removeprefix("torch."), err_ours, err_torch, limit))  # fmt: skip
    return checks


def newton_schulz_checks(device, smoke: bool) -> list[Check]:
    """The bf16 iteration of the kernels against the same iteration in PyTorch matmuls (the
    operations torch.optim.Muon uses), both measured against it in float64."""
    shapes = [(16, 40), (40, 16)] if smoke else [(1024, 4096), (4096, 1024), (3, 768, 768)]
    checks = []
    for shape in shapes:
        g = randn(*shape, device=device, grad=False, seed=21)

        def ours(g):
            return kernels.newton_schulz(g, dtype=g.dtype, backend="triton")

        def ref(g):
            return kernels.newton_schulz_reference(g, dtype=g.dtype)

        checks.append(compare("newton_schulz", "x".join(map(str, shape)), torch.bfloat16, ours,
                              ref, [g], ("kernels.newton_schulz", "_iterate_torch"),
                              FLOOR_NEWTON_SCHULZ))  # fmt: skip
    return checks


def adamw_clip_checks(device, dtypes, smoke: bool) -> list[Check]:
    """Ten clipped AdamW steps (three with --smoke): ours takes the coefficient of ``kernels.clip_grad_scale`` in the
    kernel (``step(grad_scale=...)``, ``p.grad`` untouched); the reference clips ``p.grad``
    with ``torch.nn.utils.clip_grad_norm_`` and steps torch.optim.AdamW. The gradients are
    scaled so that every step clips."""
    shapes = [(9, 7), (16,)] if smoke else [(4096, 1024), (1024,), (3, 1000, 7)]
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    max_norm, checks, n_steps = 1.0, [], 3 if smoke else 10
    dtypes = dtypes[:1] if smoke else dtypes
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(22)
        init = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
        grads = [[torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
                 for _ in range(n_steps)]  # fmt: skip
        mine, gold, same = (
            [p.clone() for p in init],
            [p.double() for p in init],
            [p.clone() for p in init],
        )
        ours_opt = kernels.AdamW(mine, backend="triton", **hyper)
        gold_opt = torch.optim.AdamW(gold, foreach=False, **hyper)
        same_opt = torch.optim.AdamW(same, foreach=False, **hyper)
        clipped = 0
        for step in grads:
            for group in (mine, gold, same):
                for p, g in zip(group, step):
                    p.grad = g.to(p.dtype)
            norm, coefficient = kernels.clip_grad_scale(mine, max_norm)
            clipped += int(coefficient.item() < 1.0)
            with no_fallback("kernels.adamw", "_torch_update"):
                ours_opt.step(grad_scale=coefficient)
            for group, opt in ((gold, gold_opt), (same, same_opt)):
                torch.nn.utils.clip_grad_norm_(group, max_norm)
                opt.step()
            with torch.no_grad():
                for p in gold:
                    p.copy_(p.to(dtype).double())
        err_ours, err_torch = relative_error(mine, gold), relative_error(same, gold)
        floor = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        limit = limit_for(err_torch, floor) if clipped == len(grads) else 0.0  # no clip: fail
        checks.append(Check("adamw clipped", f"{n_steps} steps max_norm {max_norm} ({clipped} clipped)",
                            str(dtype).removeprefix("torch."), err_ours, err_torch, limit))  # fmt: skip
    return checks


def muon_checks(device, smoke: bool) -> list[Check]:
    """Ten steps (two with --smoke) of kernels.Muon (bf16 Newton-Schulz in the kernels) and of torch.optim.Muon
    (its own bf16 iteration) on the same fp32 matrices, each against kernels.Muon computed in
    float64 throughout. Needs torch.optim.Muon (torch >= 2.9); none otherwise."""
    torch_muon = getattr(torch.optim, "Muon", None)
    if torch_muon is None:
        print("gpu_correctness: torch.optim.Muon missing (torch < 2.9): Muon check skipped")
        return []
    shapes = [(16, 40)] if smoke else [(1024, 4096), (4096, 1024), (768, 768)]
    n_steps = 2 if smoke else 10
    hyper = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True}
    gen = torch.Generator(device=device).manual_seed(23)
    init = [torch.randn(s, device=device, generator=gen) for s in shapes]
    grads = [[torch.randn(s, device=device, generator=gen) for s in shapes] for _ in range(n_steps)]
    mine, gold, same = (
        [p.clone() for p in init],
        [p.double() for p in init],
        [p.clone() for p in init],
    )
    ours_opt = kernels.Muon(mine, backend="triton", **hyper)
    gold_opt = kernels.Muon(gold, backend="torch", ns_dtype=torch.float64, **hyper)
    same_opt = torch_muon(same, **hyper)
    for step in grads:
        for group in (mine, gold, same):
            for p, g in zip(group, step):
                p.grad = g.to(p.dtype)
        with no_fallback("kernels.newton_schulz", "_iterate_torch"):
            ours_opt.step()
        gold_opt.step()
        same_opt.step()
    err_ours, err_torch = relative_error(mine, gold), relative_error(same, gold)
    case = (
        f"{n_steps} steps "
        + " ".join("x".join(map(str, s)) for s in shapes)
        + " vs torch.optim.Muon"
    )
    return [Check("muon", case, "bfloat16", err_ours, err_torch, limit_for(err_torch, 1e-3))]


# --------------------------------------------------------------------------- main


def run_all(device: torch.device, smoke: bool) -> list[Check]:
    low = (
        (torch.float16,) if smoke else (torch.bfloat16, torch.float16)
    )  # no bf16 in the interpreter
    everything = (torch.float32, *low)
    checks = []
    checks += attention_checks(device, low if device.type == "cuda" else everything, smoke)
    checks += decode_attention_checks(device, everything, smoke)
    checks += pointwise_checks(device, everything, smoke)
    checks += cross_entropy_checks(device, everything, smoke)
    checks += adamw_checks(device, (torch.float32, *low), smoke)
    checks += adamw_clip_checks(device, (torch.float32, *low), smoke)
    checks += newton_schulz_checks(device, smoke)
    checks += muon_checks(device, smoke)
    return checks


def table(checks: list[Check]) -> str:
    head = ["op", "case", "dtype", "err ours", "err torch", "limit", "ok"]
    rows = [[c.op, c.case, c.dtype, f"{c.err_ours:.2e}", f"{c.err_torch:.2e}", f"{c.limit:.2e}",
             "ok" if c.ok else "FAIL"] for c in checks]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the checks as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_correctness: no CUDA device, nothing to check (use --smoke on a CPU)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    checks = run_all(device, args.smoke)
    print(table(checks))
    failed = [c for c in checks if not c.ok]
    print(f"gpu_correctness: {len(checks) - len(failed)}/{len(checks)} checks pass")
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
            "ok": not failed,
            "checks": [c.__dict__ | {"ok": c.ok} for c in checks],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
