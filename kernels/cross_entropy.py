"""Linear layer followed by cross-entropy, the language-model head's loss.

The fused path never holds the (tokens x vocab) logits: it walks the tokens in chunks, computes a
chunk's logits with one matmul, and a Triton kernel turns them in place into the gradient of the
loss with respect to those logits (softmax minus one-hot, times 1/valid-token-count for the mean)
while writing each token's loss. Two more matmuls fold that chunk's gradient into the gradients of
``hidden`` and ``weight`` before the next chunk reuses the memory; the backward pass only scales
them by the incoming gradient.

The weight gradient is kept in fp32 and each chunk's bf16/fp16 product is accumulated into it by
the matmul itself (``addmm`` with ``out_dtype=float32``, CUDA with torch >= 2.8): a separate
``grad_weight += logits.t() @ h`` would materialize a (vocab x d) half-precision temporary per
chunk (1 GiB at a 128k vocabulary and d = 4096) and move it through memory three times. Where that
form of ``addmm`` is missing, the product is formed a slab of vocabulary rows at a time, so the
temporary stays small. Default chunks are a multiple of 256 tokens so the matmuls have no ragged
tile rows.

Targets must lie in [0, vocab) or equal ``ignore_index``; anything else raises on CPU and
is a device-side assert on a GPU, as in ``F.cross_entropy`` (no host synchronization); with
``validate_targets=False`` the check is skipped and such a token's loss is NaN instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._backend import INTERPRET, use_triton

GPU_BLOCK_V, GPU_NUM_WARPS = 4096, 8
INTERPRET_BLOCK_V = 128  # small, so tests cover vocabularies spanning several blocks
CHUNK_BYTES = 256 * 1024 * 1024  # logits of one chunk of tokens
CHUNK_MULTIPLE = 256  # default chunks are whole multiples of this many tokens (GEMM tile rows)
# Without the fp32-output addmm, the half-precision product is formed this many bytes at a time.
FALLBACK_SLAB_BYTES = 64 * 1024 * 1024
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,): cross-entropy of hidden @ weight.T, in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    targets_ptr,
    losses_ptr,
    grad_scale_ptr,
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    """Loss of one row of logits; with HAS_GRAD, overwrite the row with d(loss)/d(logits)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index

    # Pass 1: running max and sum of exponentials, one block of the vocabulary at a time.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(x - new_max), axis=0
        )
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    # A target outside [0, V) that is not ignore_index gives a NaN loss rather than a plausible
    # number; the host normally rejects such targets before the launch.
    in_range = (target >= 0) & (target < V) & (~ignored)
    target_logit = tl.load(base + target, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(ignored, 0.0, lse - target_logit))

    if HAS_GRAD:
        # Pass 2: (softmax - onehot) * scale, where scale is 1/valid tokens (mean) or 1 (sum).
        scale = tl.where(ignored, 0.0, tl.load(grad_scale_ptr))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def kernel_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps)."""
    if device.type == "cpu" and INTERPRET:
        return INTERPRET_BLOCK_V, 1
    return GPU_BLOCK_V, GPU_NUM_WARPS


def default_chunk_tokens(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so one chunk's logits take about CHUNK_BYTES, a multiple of 256 tokens."""
    tokens = CHUNK_BYTES // (vocab_size * dtype.itemsize)
    return max(CHUNK_MULTIPLE, tokens // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


# Device types on which addmm(..., out_dtype=torch.float32, out=...) ran; False once it failed.
_FP32_ADDMM: dict[str, bool] = {}


def _accumulate_weight_grad(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32, V x d) += g.T @ h, without a full-size half-precision temporary."""
    if g.dtype == torch.float32:
        grad_weight.addmm_(g.t(), h)
        return
    device = grad_weight.device.type
    if _FP32_ADDMM.get(device, True):
        try:  # bf16/fp16 operands, fp32 accumulation and output, in the matmul (CUDA, torch >= 2.8)
            torch.addmm(grad_weight, g.t(), h, out_dtype=torch.float32, out=grad_weight)
            _FP32_ADDMM[device] = True
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError, RuntimeError):
            if _FP32_ADDMM.get(device):  # it worked before: this failure is a real one
                raise
            _FP32_ADDMM[device] = False
    rows = max(1, FALLBACK_SLAB_BYTES // (h.shape[1] * h.element_size()))
    for v0 in range(0, grad_weight.shape[0], rows):
        grad_weight[v0 : v0 + rows] += g[:, v0 : v0 + rows].t() @ h


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, targets, ignore_index, reduction, chunk_tokens, validate_targets
    ):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_grad = want_hidden or want_weight
        valid = targets != ignore_index
        if validate_targets:
            _check_targets(targets, valid, vocab)
        n_valid = valid.sum()
        if reduction == "mean":
            grad_scale = (1.0 / n_valid.float()).reshape(1)
        else:
            grad_scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if want_weight
            else None
        )
        block_v, num_warps = kernel_config(hidden.device)
        chunk = chunk_tokens or default_chunk_tokens(vocab, hidden.dtype)
        for start in range(0, n_tokens, chunk):
            end = min(start + chunk, n_tokens)
            h = hidden[start:end]
            logits = h @ weight.t()
            _cross_entropy_kernel[(end - start,)](
                logits,
                targets[start:end],
                losses[start:end],
                grad_scale,
                logits.stride(0),
                vocab,
                ignore_index,
                BLOCK_V=block_v,
                HAS_GRAD=has_grad,
                num_warps=num_warps,
            )
            if want_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if want_weight:
                _accumulate_weight_grad(grad_weight, logits, h)
        loss = losses.sum()
        if reduction == "mean":
            loss = loss / n_valid
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """Scale the gradients computed in the forward, in place (no second fp32 V x d buffer).

        In-place scaling bumps the saved tensors' versions, so a second backward through the same
        graph (retain_graph=True) raises instead of returning doubly scaled gradients.
        """
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            if ctx.weight_dtype == torch.float32:
                grad_weight.mul_(grad_loss)
            else:  # the product is rounded straight into the weight's dtype
                out = torch.empty(
                    grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device
                )
                grad_weight = torch.mul(grad_weight, grad_loss, out=out)
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_targets(targets: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    """Refuse a target outside [0, vocab) that is not ignore_index.

    On CPU this raises a ValueError naming the token. On a GPU it is a device-side assert, as in
    ``F.cross_entropy``: a host-side check would synchronize every training step and stall the
    launch queue, while the assert costs one tiny kernel and still stops the run.
    """
    bad = valid & ((targets < 0) | (targets >= vocab))
    if targets.device.type != "cpu":
        torch._assert_async(~bad.any(), "cross-entropy target outside the vocabulary")
        return
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(targets[first])} at token {first} is outside the vocabulary [0, {vocab}) "
            "and is not ignore_index"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    chunk_tokens: int | None = None,
    validate_targets: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``; ``reduction`` is mean or sum.

    Targets equal to ``ignore_index`` carry no loss; a mean over no valid target is NaN, as in
    ``F.cross_entropy``. Any other target outside [0, vocab) raises ``ValueError`` on CPU and is
    a device-side assert on a GPU (no host synchronization); ``validate_targets=False`` skips the check, and such a token's loss
    is then NaN. ``chunk_tokens`` sets how many tokens' logits the fused path holds at once
    (default: about 256 MiB of them, rounded down to a multiple of 256 tokens).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not use_triton(hidden, backend):
        return linear_cross_entropy_reference(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one of the dtypes "
            f"{', '.join(str(d) for d in _DTYPES)}"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, d) and weight (V, d), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropyFunction.apply(
            hidden.contiguous(),
            weight.contiguous(),
            targets.long().contiguous(),
            ignore_index,
            reduction,
            chunk_tokens,
            validate_targets,
        )


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch (logits dtype, with and without gradient)."""
    builds = []
    for dtype in _DTYPES.values():
        for has_grad in (True, False):
            builds.append(
                {
                    "name": f"cross_entropy_{dtype}{'_grad' if has_grad else ''}",
                    "fn": _cross_entropy_kernel,
                    "signature": {
                        "logits_ptr": f"*{dtype}",
                        "targets_ptr": "*i64",
                        "losses_ptr": "*fp32",
                        "grad_scale_ptr": "*fp32",
                        "stride_row": "i32",
                        "V": "i32",
                        "ignore_index": "i32",
                        "BLOCK_V": "constexpr",
                        "HAS_GRAD": "constexpr",
                    },
                    "constexprs": {"BLOCK_V": GPU_BLOCK_V, "HAS_GRAD": has_grad},
                    "num_warps": GPU_NUM_WARPS,
                    "num_stages": 1,
                    "matrix": False,
                }
            )
    return builds
