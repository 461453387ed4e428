"""Benchmark the Triton kernels against PyTorch's own implementations on one CUDA GPU.

Each section runs ours and the baselines side by side in this one process, reports medians
(``triton.testing.do_bench``, which flushes L2 between runs) and checks correctness on the
benchmarked inputs:

- attention: causal bf16 forward, backward and forward+backward TFLOP/s of ``kernels.attention``
  (``ours``: the fa2 kernels; ``ours-hopper``: tensor descriptors, autotuned forward, atomic-dQ
  backward; ``ours-hopper-det``: its deterministic backward) vs ``scaled_dot_product_attention``
  with the flash and cuDNN backends and compiled FlexAttention, 16k tokens per batch
  (B x T), T from 1k to 16k, head dim 64 and 128, Hq = Hkv and a GQA case; errors of ours and of
  SDPA against an fp32 reference.
- adamw: one optimizer step over the parameter shapes of configs/llama-1b.toml (~1.2B
  parameters), fp32 and bf16, ``kernels.AdamW`` vs ``torch.optim.AdamW`` fused and foreach;
  achieved GB/s (bytes each step must move, from the tensors and the optimizer's own state) vs
  the measured copy bandwidth of the GPU.
- linear_cross_entropy: 16k tokens, 128k vocabulary, hidden 4096, bf16: time and peak memory of
  forward+backward vs the unfused ``logits = h @ W.T; cross_entropy(logits.float())``.
- pointwise: RMSNorm, residual add + RMSNorm, SwiGLU and RoPE forward and forward+backward GB/s
  vs the PyTorch reference in eager mode and under ``torch.compile``; the fused residual add +
  RMSNorm also vs our separate add and RMSNorm.
- adamw also times the step with gradient clipping: ``clip_grad_scale`` + ``step(grad_scale=...)``
  (the coefficient applied inside our kernel) vs ``clip_grad_norm_`` + fused ``torch.optim.AdamW``.
- linear_cross_entropy also runs our kernel with the previous weight-gradient accumulation
  (``grad_weight += logits.t() @ h``, a vocab x hidden half-precision temporary per chunk).
- decode_attention: split-KV vs the single-pass decode kernel at long context and small batches
  (bf16, GQA group 4, D = 128): time and achieved GB/s of the KV cache read.
- muon: the Newton-Schulz iteration (5 steps, bf16) of ``kernels.newton_schulz`` per batch of
  llama-1b's hidden matrices of one shape vs the same iteration in batched PyTorch matmuls and
  torch.optim.Muon's own function (one matrix at a time), with nominal TFLOP/s and the error
  against float64; then a whole ``kernels.Muon`` step vs a ``torch.optim.Muon`` step.

Usage::

    PYTHONPATH=. python scripts/bench_kernels.py --json bench.json
    PYTHONPATH=. python scripts/bench_kernels.py --sections attention --quick
    python scripts/bench_kernels.py --smoke     # every code path on CPU, tiny shapes, interpreter

Without a CUDA device (and without ``--smoke``) it says so and exits 0. ``--smoke`` runs the
kernels in the Triton interpreter on CPU tensors (fp32 where real runs use bf16, which the
interpreter gets wrong), times with ``time.perf_counter`` and compiles baselines with the
``eager`` backend of ``torch.compile``: its numbers mean nothing, its purpose is to exercise the
script.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of kernels (the decorators bind to the interpreter)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from kernels.adamw import AdamW  # noqa: E402

SECTIONS = ("attention", "adamw", "linear_cross_entropy", "pointwise", "decode_attention", "muon")


@dataclass
class Setup:
    """Where and how big: the GPU sizes, or tiny CPU sizes for ``--smoke``."""

    device: torch.device
    dtype: torch.dtype  # the low-precision dtype of the real runs (fp32 in smoke)
    smoke: bool
    quick: bool
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# --------------------------------------------------------------------------- timing


def measure_ms(fn: Callable[[], object], setup: Setup, grad_to_none=None) -> float:
    """Median milliseconds of ``fn``: do_bench on the GPU, a few perf_counter runs in smoke."""
    if setup.cuda:
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    times = []
    for _ in range(2):  # a warm-up run, then one timed run: smoke numbers only need to exist
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times[-1]


def free_memory(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    """The exception's type and first line: enough to tell an unsupported case from a bug."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120] if lines else ''}"


# --------------------------------------------------------------------------- attention


def sdpa_backends(setup: Setup) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    if setup.cuda:
        return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    return {"sdpa-math": SDPBackend.MATH}


# Our implementations: kernels.attention's impl and deterministic arguments.
OUR_ATTENTION = {
    "ours": dict(impl="fa2"),
    "ours-hopper": dict(impl="hopper"),
    "ours-hopper-det": dict(impl="hopper", deterministic=True),
}


def attention_impls(
    setup: Setup, gqa: bool, doc_ids: torch.Tensor | None = None
) -> dict[str, Callable]:
    """name -> f(q, k, v) causal attention (within documents with ``doc_ids``): ours (the fa2 and
    the hopper kernels), SDPA pinned to each of its backends and FlexAttention (compiled)."""
    from torch.nn.attention import sdpa_kernel

    def ours(options):
        def run(q, k, v):
            with warnings.catch_warnings():  # a fallback must not pass as ours
                warnings.filterwarnings("error", message=".*does not cover.*")
                return kernels.attention(
                    q, k, v, causal=True, doc_ids=doc_ids, backend="triton", **options
                )

        return run

    def pinned(backend):
        def run(q, k, v):
            if doc_ids is not None:
                raise NotImplementedError("this SDPA backend takes no document mask")
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        return run

    impls = {name: ours(options) for name, options in OUR_ATTENTION.items()}
    impls |= {name: pinned(b) for name, b in sdpa_backends(setup).items()}
    return impls | {"flex": flex_attention_impl(setup, gqa, doc_ids)}


def flex_attention_impl(setup: Setup, gqa: bool, doc_ids: torch.Tensor | None) -> Callable:
    """FlexAttention with a causal (and document) block mask, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, backend=setup.compile_backend, dynamic=False)
    masks: dict[tuple, object] = {}

    def run(q, k, v):
        B, T = q.shape[0], q.shape[2]
        if (B, T) not in masks:
            if doc_ids is None:

                def mask_mod(b, h, qi, ki):
                    return qi >= ki
            else:

                def mask_mod(b, h, qi, ki):
                    return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])

            masks[B, T] = create_block_mask(mask_mod, B, None, T, T, device=q.device.type)
        return compiled(q, k, v, block_mask=masks[B, T], enable_gqa=gqa)

    return run


def attention_cases(setup: Setup) -> list[tuple[str, int, int, int, int, int, int]]:
    """(label, B, Hq, Hkv, T, D, docs): 16k tokens per batch, T from 1k to 16k, and packed
    documents (``docs`` equal documents per row; 8 x 1k at T = 8k), causal within each."""
    if setup.smoke:
        tokens, lengths, heads = 64, (64,), [("mha", 2, 2, 32), ("gqa", 4, 2, 64)]
        packed = [("doc", 2, 2, 32, 64, 4)]
    else:
        tokens = 16384
        lengths = (1024, 4096, 16384) if setup.quick else (1024, 2048, 4096, 8192, 16384)
        heads = [("mha", 32, 32, 64), ("mha", 16, 16, 128), ("gqa", 32, 8, 128)]
        packed = [("doc8x1k", 16, 16, 128, 8192, 8)]
    cases = [
        (f"{kind} d{D} T{T}", tokens // T, hq, hkv, T, D, 0)
        for kind, hq, hkv, D in heads
        for T in lengths
    ]
    return cases + [
        (f"{kind} d{D} T{T}", tokens // T, hq, hkv, T, D, docs)
        for kind, hq, hkv, D, T, docs in packed
    ]


def attention_reference_grads(q, k, v, do, doc_ids=None) -> tuple[torch.Tensor, ...]:
    """Output and gradients in fp32: the yardstick both ours and SDPA are measured against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = q.shape[1] // k.shape[1]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    mask = None
    if doc_ids is not None:
        attention_mask = importlib.import_module("kernels.attention").attention_mask
        mask = attention_mask(q.shape[2], k.shape[2], causal=True, doc_ids=doc_ids, device=q.device)
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(
            qf,
            kf.repeat_interleave(groups, 1),
            vf.repeat_interleave(groups, 1),
            is_causal=mask is None,
            attn_mask=mask,
        )
    out.backward(do.float())
    return out.detach(), qf.grad, kf.grad, vf.grad


def max_errors(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> list[float]:
    return [(g.float() - r).abs().max().item() for g, r in zip(got, ref)]


def bench_attention_case(setup: Setup, case) -> list[dict]:
    label, B, Hq, Hkv, T, D, docs = case
    gen = torch.Generator(device=setup.device).manual_seed(0)
    doc_ids = None
    if docs:  # equal documents packed in each row
        doc_ids = (torch.arange(T, device=setup.device) // (T // docs)).expand(B, T).contiguous()

    def randn(*shape):
        x = torch.randn(*shape, device=setup.device, dtype=setup.dtype, generator=gen)
        return x.requires_grad_()

    q, k, v = randn(B, Hq, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D)
    do = torch.randn(B, Hq, T, D, device=setup.device, dtype=setup.dtype, generator=gen)
    ref = attention_reference_grads(q, k, v, do, doc_ids)
    scale = max(r.abs().max().item() for r in ref)
    span = T // docs if docs else T  # causal within each document: half of its score block
    flops_fwd = 4 * B * Hq * T * span * D / 2
    rows = []
    for name, fn in attention_impls(setup, Hkv != Hq, doc_ids).items():
        row = {"case": label, "impl": name, "B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D}
        row["docs"] = docs
        try:
            row |= time_attention(fn, (q, k, v), do, ref, flops_fwd, setup)
        except Exception as exc:  # a backend that does not take this case (e.g. GQA)
            row["error"] = error_text(exc)
        finally:
            q.grad = k.grad = v.grad = None
        rows.append(row)
    judge_attention(rows, scale)
    return rows


def time_attention(fn, qkv, do, ref, flops_fwd: float, setup: Setup) -> dict:
    """Errors against ``ref``, then forward, backward and forward+backward times and TFLOP/s."""
    out = fn(*qkv)
    out.backward(do)
    row = {"max_err": max_errors((out, *(t.grad for t in qkv)), ref)}
    fwd = measure_ms(lambda: fn(*qkv), setup)
    out = fn(*qkv)
    bwd = measure_ms(lambda: out.backward(do, retain_graph=True), setup, grad_to_none=list(qkv))
    both = measure_ms(lambda: fn(*qkv).backward(do), setup, grad_to_none=list(qkv))
    return row | {
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "fwd_bwd_ms": both,
        "fwd_tflops": flops_fwd / fwd / 1e9,
        "bwd_tflops": 2.5 * flops_fwd / bwd / 1e9,  # the usual count: backward = 2.5 forwards
        "fwd_bwd_tflops": 3.5 * flops_fwd / both / 1e9,
    }


def judge_attention(rows: list[dict], scale: float) -> None:
    """Ours is correct when each error is within twice the baselines' (or 1% of the largest
    value)."""
    baseline = [r["max_err"] for r in rows if r["impl"] not in OUR_ATTENTION and "max_err" in r]
    for row in rows:
        if row["impl"] not in OUR_ATTENTION or "max_err" not in row:
            continue
        limits = [max(2 * max(errs), 1e-2 * scale) for errs in zip(*baseline)] or [1e-2 * scale] * 4
        row["ok"] = all(e <= lim for e, lim in zip(row["max_err"], limits))


def bench_attention(setup: Setup) -> list[dict]:
    rows = []
    for case in progress(attention_cases(setup), "attention"):
        rows += bench_attention_case(setup, case)
        free_memory(setup)
    return rows


# --------------------------------------------------------------------------- adamw


def model_shapes(setup: Setup) -> list[tuple[int, ...]]:
    """Parameter shapes of the project's model for llama-1b (a toy one in smoke), built on meta."""
    from pretrain.config import ModelConfig, load_config
    from pretrain.model import Transformer

    if setup.smoke:  # the interpreter runs a few thousand elements per second
        cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)
    else:
        cfg = load_config(ROOT / "configs" / "llama-1b.toml").model
    with torch.device("meta"):
        model = Transformer(cfg)
    return [tuple(p.shape) for p in model.parameters()]


def copy_gbps(setup: Setup) -> float:
    """Device memory bandwidth as a large copy achieves it (read + write)."""
    n = (1 << 30) if setup.cuda else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), setup)
    return 2 * n / ms / 1e6


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes one step must move: read+write params and each state tensor, read the grads."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += 2 * p.nbytes + p.grad.nbytes
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.numel() == p.numel():
                    total += 2 * value.nbytes
    return total


def adamw_impls() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    hyper = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    return {
        "ours": lambda ps: AdamW(ps, backend="triton", **hyper),
        "torch-fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hyper),
        "torch-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hyper),
    }


def bench_adamw(setup: Setup) -> list[dict]:
    shapes = model_shapes(setup)
    n_params = sum(math.prod(s) for s in shapes)
    bandwidth = copy_gbps(setup)
    rows = []
    for dtype in progress(dict.fromkeys((torch.float32, setup.dtype)), "adamw"):
        params = [torch.randn(s, device=setup.device, dtype=dtype) * 0.02 for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for name, make in adamw_impls().items():
            row = {"impl": name, "dtype": str(dtype).removeprefix("torch."), "params": n_params}
            try:
                opt = make(params)
                opt.step()  # creates the state
                ms = measure_ms(opt.step, setup)
                moved = optimizer_bytes(opt)
                del opt
            except Exception as exc:
                rows.append(row | {"error": error_text(exc)})
                continue
            finally:
                free_memory(setup)
            gbps = moved / ms / 1e6
            row |= {"step_ms": ms, "bytes_per_param": moved / n_params, "gbps": gbps}
            row |= {"copy_gbps": bandwidth, "of_copy": gbps / bandwidth}
            rows.append(row)
        rows += bench_adamw_with_clip(setup, params, n_params, dtype)
        del params
        free_memory(setup)
    rows += adamw_correctness(setup)
    return rows


def bench_adamw_with_clip(setup: Setup, params, n_params: int, dtype) -> list[dict]:
    """A clipped step: our kernel applies the coefficient (no pass over the gradients, no host
    sync); torch clips in place (a read and a write of every gradient) and then steps."""
    from kernels.adamw import clip_grad_scale

    hyper = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    max_norm = 1e-3  # below the gradients' norm, so every step clips

    def ours():
        opt = AdamW(params, backend="triton", **hyper)

        def step():
            _, scale = clip_grad_scale(params, max_norm)
            opt.step(grad_scale=scale)

        return opt, step

    def torch_fused():
        opt = torch.optim.AdamW(params, fused=setup.cuda, **hyper)

        def step():
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()

        return opt, step

    rows = []
    for name, make in {"ours+clip": ours, "torch-fused+clip": torch_fused}.items():
        row = {"impl": name, "dtype": str(dtype).removeprefix("torch."), "params": n_params}
        try:
            opt, step = make()
            step()
            row["step_clip_ms"] = measure_ms(step, setup)
            del opt
        except Exception as exc:
            row["error"] = error_text(exc)
        finally:
            free_memory(setup)
        rows.append(row)
    return rows


def adamw_correctness(setup: Setup) -> list[dict]:
    """Ten steps on a few layers' shapes: ours against torch.optim.AdamW, per dtype."""
    shapes = model_shapes(setup)[:6]
    rows = []
    for dtype in dict.fromkeys((torch.float32, setup.dtype)):
        gen = torch.Generator(device=setup.device).manual_seed(0)
        init = [torch.randn(s, device=setup.device, generator=gen).to(dtype) for s in shapes]
        grads = [
            [torch.randn(s, device=setup.device, generator=gen).to(dtype) for s in shapes]
            for _ in range(10)
        ]
        results = {}
        for name in ("ours", "torch-foreach"):
            params = [p.clone() for p in init]
            opt = adamw_impls()[name](params)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = g
                opt.step()
            results[name] = params
        errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(*results.values())]
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        rows.append(
            {
                "impl": "ours vs torch (10 steps)",
                "dtype": str(dtype).removeprefix("torch."),
                "max_err": max(errs),
                "ok": max(errs) <= tol,
            }
        )
    return rows


# --------------------------------------------------------------------------- linear + CE


def unfused_linear_cross_entropy(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def previous_dw_linear_cross_entropy(hidden, weight, targets):
    """Our kernel with the weight gradient accumulated as before: ``grad_weight += g.t() @ h``."""
    import importlib

    ce = importlib.import_module("kernels.cross_entropy")

    def accumulate(grad_weight, g, h):
        if g.dtype == torch.float32:
            grad_weight.addmm_(g.t(), h)
        else:
            grad_weight += g.t() @ h

    current, ce._accumulate_weight_grad = ce._accumulate_weight_grad, accumulate
    try:
        return kernels.linear_cross_entropy(hidden, weight, targets, backend="triton")
    finally:
        ce._accumulate_weight_grad = current


def bench_linear_cross_entropy(setup: Setup) -> list[dict]:
    N, V, d = (16, 300, 32) if setup.smoke else (16384, 128256, 4096)
    gen = torch.Generator(device=setup.device).manual_seed(0)
    hidden = torch.randn(N, d, device=setup.device, dtype=setup.dtype, generator=gen)
    weight = torch.randn(V, d, device=setup.device, dtype=setup.dtype, generator=gen) * d**-0.5
    targets = torch.randint(0, V, (N,), device=setup.device, generator=gen)
    hidden.requires_grad_()
    weight.requires_grad_()
    impls = {
        "ours": lambda: kernels.linear_cross_entropy(hidden, weight, targets, backend="triton"),
        "ours-previous-dw": lambda: previous_dw_linear_cross_entropy(hidden, weight, targets),
        "torch-unfused": lambda: unfused_linear_cross_entropy(hidden, weight, targets),
    }
    rows, grads = [], {}
    for name, fn in impls.items():
        row = {"impl": name, "tokens": N, "vocab": V, "hidden": d}
        try:
            row |= time_loss(fn, (hidden, weight), setup)
            loss = fn()
            loss.backward()
            grads[name] = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
        except Exception as exc:
            row["error"] = error_text(exc)
        finally:
            hidden.grad = weight.grad = None
            free_memory(setup)
        rows.append(row)
    if "ours" in grads and "torch-unfused" in grads:
        ours, ref = grads["ours"], grads["torch-unfused"]
        errs = [
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(ours, ref)
        ]
        rows[0]["rel_err_loss_dh_dw"] = errs
        rows[0]["ok"] = max(errs) <= (1e-4 if setup.dtype == torch.float32 else 2e-2)
    return rows


def time_loss(fn: Callable[[], torch.Tensor], leaves, setup: Setup) -> dict:
    """Peak memory of forward+backward, then forward and forward+backward times."""
    peak = peak_memory_mib(lambda: fn().backward(), setup)
    for t in leaves:
        t.grad = None
    fwd = measure_ms(fn, setup)
    both = measure_ms(lambda: fn().backward(), setup, grad_to_none=list(leaves))
    return {"peak_mib": peak, "fwd_ms": fwd, "fwd_bwd_ms": both}


def peak_memory_mib(fn: Callable[[], object], setup: Setup) -> float | None:
    """Memory forward+backward needs above what was allocated before it (CUDA only)."""
    if not setup.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --------------------------------------------------------------------------- pointwise ops


def pointwise_cases(setup: Setup) -> list[dict]:
    """Each op: inputs, ours, the reference, and the bytes forward and backward must move."""
    dev, dt = setup.device, setup.dtype
    N, d, ffn = (64, 256, 384) if setup.smoke else (16384, 4096, 14336)
    B, T, Hq, Hkv, D = (2, 32, 4, 2, 32) if setup.smoke else (8, 2048, 32, 8, 128)
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen).requires_grad_()

    x, w = randn(N, d), randn(d)
    f = randn(N, d)  # a sublayer output joining the residual stream x
    gate, up = randn(N, ffn), randn(N, ffn)
    q, k = randn(B, Hq, T, D), randn(B, Hkv, T, D)
    cos, sin = kernels.rope_cos_sin(torch.arange(T, device=dev), D)
    size = x.element_size()
    return [
        {
            "op": "rms_norm",
            "shape": f"{N}x{d}",
            "inputs": (x, w),
            "ours": lambda x, w: kernels.rms_norm(x, w, backend="triton"),
            "ref": kernels.rms_norm_reference,
            "fwd_bytes": 2 * x.numel() * size,
            "bwd_bytes": 3 * x.numel() * size,
        },
        {
            "op": "add_rms_norm",
            "shape": f"{N}x{d}",
            "inputs": (f, x, w),
            "ours": lambda f, x, w: kernels.add_rms_norm(f, x, w, backend="triton"),
            "ref": kernels.add_rms_norm_reference,
            "extra": {"ours-separate": separate_add_rms_norm},
            "fwd_bytes": 4 * x.numel() * size,  # read f and x; write the sum and its norm
            "bwd_bytes": 4 * x.numel() * size,  # read both grads and the sum; write one grad
        },
        {
            "op": "swiglu",
            "shape": f"{N}x{ffn}",
            "inputs": (gate, up),
            "ours": lambda g, u: kernels.swiglu(g, u, backend="triton"),
            "ref": kernels.swiglu_reference,
            "fwd_bytes": 3 * gate.numel() * size,
            "bwd_bytes": 5 * gate.numel() * size,
        },
        {
            "op": "rope",
            "shape": f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D}",
            "inputs": (q, k),
            "ours": lambda q, k: kernels.apply_rope(q, k, cos, sin, backend="triton"),
            "ref": lambda q, k: kernels.apply_rope_reference(q, k, cos, sin),
            "fwd_bytes": 2 * (q.numel() + k.numel()) * size,
            "bwd_bytes": 2 * (q.numel() + k.numel()) * size,
        },
    ]


def separate_add_rms_norm(f, x, w):
    """Our RMSNorm kernel after a separate residual add (the unfused pair of passes)."""
    summed = f + x
    return kernels.rms_norm(summed, w, backend="triton"), summed


def forward_backward(fn, inputs, grads) -> Callable[[], None]:
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)

    return run


def bench_pointwise(setup: Setup) -> list[dict]:
    rows = []
    for case in progress(pointwise_cases(setup), "pointwise"):
        inputs = case["inputs"]
        impls = {
            "ours": case["ours"],
            "torch-eager": case["ref"],
            "torch-compile": torch.compile(case["ref"], backend=setup.compile_backend),
        } | case.get("extra", {})
        expected = case["ref"](*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        grads = tuple(torch.randn_like(t) for t in expected)
        for name, fn in impls.items():
            row = {"op": case["op"], "shape": case["shape"], "impl": name}
            try:
                out = fn(*inputs)
                out = out if isinstance(out, tuple) else (out,)
                row["max_err"] = max(
                    (a.float() - b.float()).abs().max().item() for a, b in zip(out, expected)
                )
                fwd = measure_ms(functools.partial(fn, *inputs), setup)
                both = measure_ms(
                    forward_backward(fn, inputs, grads), setup, grad_to_none=list(inputs)
                )
            except Exception as exc:
                rows.append(row | {"error": error_text(exc)})
                continue
            row |= {"fwd_ms": fwd, "fwd_bwd_ms": both}
            row["fwd_gbps"] = case["fwd_bytes"] / fwd / 1e6
            row["fwd_bwd_gbps"] = (case["fwd_bytes"] + case["bwd_bytes"]) / both / 1e6
            if name.startswith("ours"):
                tol = 1e-5 if setup.dtype == torch.float32 else 2e-2
                row["ok"] = row["max_err"] <= tol * max(e.abs().max().item() for e in expected)
            rows.append(row)
        free_memory(setup)
    return rows


# --------------------------------------------------------------------------- decode attention


def decode_cases(setup: Setup) -> list[tuple[int, int, int, int, int]]:
    """(B, Hq, Hkv, context, D): small batches at long context, where split-KV matters."""
    if setup.smoke:
        return [(1, 4, 1, 100, 32), (2, 4, 1, 70, 32)]
    contexts = (8192, 32768) if setup.quick else (4096, 16384, 65536, 131072)
    return [(B, 32, 8, n, 128) for n in contexts for B in (1, 4)]


def bench_decode_attention(setup: Setup) -> list[dict]:
    rows = []
    for case in progress(decode_cases(setup), "decode"):
        rows += bench_decode_case(setup, *case)
        free_memory(setup)
    return rows


def bench_decode_case(setup: Setup, B: int, Hq: int, Hkv: int, n: int, D: int) -> list[dict]:
    """Every row at the full context ``n``; both kernels checked against an fp32 reference."""
    from kernels.decode_attention import decode_attention, decode_attention_reference

    gen = torch.Generator(device=setup.device).manual_seed(0)
    shapes = [(B, Hkv, n, D), (B, Hkv, n, D), (B, Hq, D)]
    k_cache, v_cache, q = (
        torch.randn(s, device=setup.device, dtype=setup.dtype, generator=gen) for s in shapes
    )
    slots = torch.arange(B, device=setup.device)
    lengths = torch.full((B,), n, device=setup.device)
    expected = decode_attention_reference(q.float(), k_cache, v_cache, slots, lengths)
    kv_bytes = 2 * B * Hkv * n * D * k_cache.element_size()
    rows = []
    for name, split in (("ours-split-kv", True), ("ours-single-pass", False)):
        row = {"impl": name, "B": B, "context": n, "Hq": Hq, "Hkv": Hkv, "D": D}
        run = functools.partial(
            decode_attention, q, k_cache, v_cache, slots, lengths, backend="triton", split_kv=split
        )
        try:
            err = (run().float() - expected.float()).abs().max().item()
            ms = measure_ms(run, setup)
        except Exception as exc:
            rows.append(row | {"error": error_text(exc)})
            continue
        tol = 1e-4 if setup.dtype == torch.float32 else 2e-2
        rows.append(
            row | {"ms": ms, "kv_gbps": kv_bytes / ms / 1e6, "max_err": err, "ok": err <= tol}
        )
    return rows


# --------------------------------------------------------------------------- muon


def muon_shapes(setup: Setup) -> list[tuple[int, int]]:
    """The Muon matrices of llama-1b (a toy model in smoke): 2-D, not embed_tokens/lm_head."""
    from pretrain.config import ModelConfig, load_config
    from pretrain.model import Transformer

    if setup.smoke:
        cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)
    else:
        cfg = load_config(ROOT / "configs" / "llama-1b.toml").model
    with torch.device("meta"):
        model = Transformer(cfg)
    return [
        tuple(p.shape)
        for name, p in model.named_parameters()
        if p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
    ]


def ns_flops(batch: int, rows: int, cols: int, steps: int = 5) -> float:
    """Nominal FLOPs of the iteration (full X Xᵀ and A², as a plain implementation does them)."""
    m, n = min(rows, cols), max(rows, cols)
    return batch * steps * (4 * m * m * n + 2 * m**3)


def bench_muon(setup: Setup) -> list[dict]:
    """The Newton-Schulz iteration per batch of equal (rows <= cols) shapes, then a whole step."""
    from kernels.muon import Muon
    from kernels.newton_schulz import newton_schulz, newton_schulz_reference

    shapes = muon_shapes(setup)
    batches: dict[tuple[int, int], int] = {}
    for r, c in shapes:
        key = (min(r, c), max(r, c))
        batches[key] = batches.get(key, 0) + 1
    torch_zeropower = getattr(
        importlib.import_module("torch.optim._muon") if hasattr(torch.optim, "Muon") else None,
        "_zeropower_via_newtonschulz",
        None,
    )
    dtype = torch.bfloat16 if setup.cuda else torch.float32  # the interpreter's bf16 is wrong
    if setup.smoke:  # the interpreter takes seconds per iteration: the widest batch only
        widest = max(batches, key=lambda k: k[1])
        batches = {widest: batches[widest]}
    rows = []
    for (m, n), count in progress(batches.items(), "muon"):
        gen = torch.Generator(device=setup.device).manual_seed(0)
        g = torch.randn(count, m, n, device=setup.device, generator=gen)
        exact = newton_schulz_reference(g[:1].double(), dtype=torch.float64)
        impls = {
            "ours": lambda g=g: newton_schulz(g, dtype=dtype, backend="triton"),
            "torch-batched": lambda g=g: newton_schulz_reference(g, dtype=torch.bfloat16),
        }
        if torch_zeropower is not None:  # torch.optim.Muon's own function, one matrix at a time
            impls["torch-muon"] = lambda g=g: [
                torch_zeropower(x, (3.4445, -4.7750, 2.0315), 5, 1e-7) for x in g
            ]
        base = {"shape": f"{count}x{m}x{n}"}
        errs, shape_rows = {}, []
        for name, run in impls.items():
            row = {"impl": name, **base}
            try:
                out = run()
                first = out[0] if isinstance(out, list) else out[:1]
                errs[name] = ((first.double() - exact).abs().max() / exact.abs().max()).item()
                ms = measure_ms(run, setup)
            except Exception as exc:
                shape_rows.append(row | {"error": error_text(exc)})
                continue
            shape_rows.append(row | {"ms": ms, "tflops": ns_flops(count, m, n) / ms / 1e9,
                                     "max_rel_err": errs[name]})  # fmt: skip
        # bf16 on the GPU: no worse than twice PyTorch's bf16 iteration; fp32 in smoke: ~exact.
        limit = 2 * errs.get("torch-batched", 0.0) + 1e-3 if setup.cuda else 1e-4
        for row in shape_rows:
            if row["impl"] == "ours" and "error" not in row:
                row["ok"] = row["max_rel_err"] <= limit
        rows += shape_rows
        free_memory(setup)
    rows += bench_muon_step(setup, shapes, Muon)
    return rows


def bench_muon_step(setup: Setup, shapes, muon_cls) -> list[dict]:
    """A whole optimizer step over every Muon matrix: ours (kernels, batched) vs torch.optim.Muon."""
    hyper = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95}
    params = [torch.randn(s, device=setup.device) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    makers = {"ours-step": lambda: muon_cls(params, backend="triton", **hyper)}
    if setup.smoke:  # fp32 iteration: bf16 is what the interpreter gets wrong
        makers["ours-step"] = lambda: muon_cls(
            params, backend="triton", ns_dtype=torch.float32, **hyper
        )
    if hasattr(torch.optim, "Muon"):
        makers["torch-muon-step"] = lambda: torch.optim.Muon(params, **hyper)
    rows = []
    n_params = sum(p.numel() for p in params)
    for name, make in makers.items():
        row = {"impl": name, "shape": f"{len(params)} matrices, {n_params / 1e6:.1f}M"}
        try:
            opt = make()
            if setup.cuda:  # creates the state outside the timing (measure_ms warms up too)
                opt.step()
            row["ms"] = measure_ms(opt.step, setup)
            del opt
        except Exception as exc:
            row["error"] = error_text(exc)
        finally:
            free_memory(setup)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting


def progress(items, desc: str):
    """A tqdm bar on a terminal; the items themselves otherwise (tqdm may be absent on a GPU box)."""
    items = list(items)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, leave=False)
        except ImportError:
            pass
    return items


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, list):
        return "/".join(fmt(v) for v in value)
    return str(value)


def table(title: str, rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) if c in r or "error" not in r else "-" for c in columns] for r in rows]
    for r, line in zip(rows, cells):
        if "error" in r:
            line[-1] = r["error"][:60]
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    lines = [f"\n== {title}", "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


TABLES = {
    "attention": ["case", "impl", "fwd_tflops", "bwd_tflops", "fwd_bwd_tflops", "max_err", "ok"],
    "adamw": ["impl", "dtype", "step_ms", "step_clip_ms", "bytes_per_param", "gbps", "of_copy", "max_err", "ok"],
    "linear_cross_entropy": ["impl", "tokens", "vocab", "hidden", "fwd_ms", "fwd_bwd_ms", "peak_mib", "ok"],
    "pointwise": ["op", "shape", "impl", "fwd_gbps", "fwd_bwd_gbps", "max_err", "ok"],
    "decode_attention": ["impl", "B", "context", "Hq", "Hkv", "D", "ms", "kv_gbps", "max_err", "ok"],
    "muon": ["impl", "shape", "ms", "tflops", "max_rel_err", "ok"],
}  # fmt: skip
RUNNERS = {
    "attention": bench_attention,
    "adamw": bench_adamw,
    "linear_cross_entropy": bench_linear_cross_entropy,
    "pointwise": bench_pointwise,
    "decode_attention": bench_decode_attention,
    "muon": bench_muon,
}


def failures(report: dict) -> list[str]:
    """Rows of ours that were wrong or failed to run."""
    bad = []
    for section in SECTIONS:
        for row in report.get(section, []):
            if str(row.get("impl", "")).startswith("ours") and (
                row.get("ok") is False or "error" in row
            ):
                bad.append(f"{section}: {row}")
    return bad


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer attention lengths")
    parser.add_argument("--smoke", action="store_true",
                        help="run every code path on CPU with tiny shapes (numbers meaningless)")  # fmt: skip
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to benchmark (the benchmarks need an NVIDIA "
              "GPU; --smoke runs the script's code paths on CPU)")  # fmt: skip
        return 0
    setup = Setup(
        device=torch.device("cpu" if args.smoke else "cuda"),
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        smoke=args.smoke,
        quick=args.quick,
        compile_backend="eager" if args.smoke else "inductor",
    )
    torch.manual_seed(0)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if setup.cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "smoke": setup.smoke,
    }
    for section in sections:
        start = time.perf_counter()
        report[section] = RUNNERS[section](setup)
        report[f"{section}_s"] = round(time.perf_counter() - start, 1)
        print(table(section, report[section], TABLES[section]), flush=True)
    bad = failures(report)
    report["ok"] = not bad
    if args.json:
        write_json(args.json, report)
    for line in bad:
        print(f"FAIL {line}")
    print(f"\nbench_kernels: {'all kernels correct' if not bad else f'{len(bad)} failures'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
