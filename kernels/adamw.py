"""AdamW whose step is one Triton kernel pass over many tensors at once.

Same constructor, update rule and ``state_dict()`` layout as ``torch.optim.AdamW`` (decoupled
weight decay, bias correction, parameter groups with their own hyperparameters), so checkpoints
move between the two in both directions. Moments are kept in fp32 whatever the parameter dtype;
a bf16 or fp16 parameter is updated in fp32 and rounded back once per step (there is no fp32
master copy: keep parameters in fp32, as FSDP2 mixed precision does, when that matters).

The kernel reads a table with one row per tensor (addresses of param, grad, exp_avg, exp_avg_sq,
its element count and its step's scalars) and a list of chunks (tensor, chunk index); each program
updates one chunk of one tensor, reading and writing every element once. One launch covers every
tensor of a (device, param dtype, grad dtype) combination instead of one launch per parameter.

Gradient clipping folds into the same pass: ``step(grad_scale=...)`` takes the clip coefficient
as a one-element device tensor (from :func:`clip_grad_scale`, the coefficient
``clip_grad_norm_`` would apply) and the kernel multiplies each gradient by it as it loads it, so the
separate read and write of every gradient that ``clip_grad_norm_`` does (8 bytes per fp32
parameter) and the host synchronization of reading the norm both go away.

FSDP2's sharded parameters are DTensors: the step runs on the local shard of each (``to_local()``)
and the states are DTensors sharded like their parameter, as ``torch.optim.AdamW`` keeps them, so
torch.distributed.checkpoint saves and reshards them the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton
import triton.language as tl

from kernels._backend import INTERPRET, use_triton

_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_KERNEL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# Elements per inner iteration and per program (a chunk); the interpreter gets small ones so that
# tests with small tensors still cross chunk and iteration boundaries.
GPU_BLOCK, GPU_CHUNK, GPU_NUM_WARPS = 1024, 32768, 4
INTERPRET_BLOCK, INTERPRET_CHUNK = 256, 1024


@triton.jit
def _adamw_update(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    offsets,
    mask,
    grad_scale,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bias_correction2_sqrt,
):
    """One block of elements; the operations and their order are those of torch.optim.AdamW.

    The gradient is first multiplied by ``grad_scale`` (1.0 when not clipping, which is exact), in
    fp32: the product ``clip_grad_norm_`` would have stored back into an fp32 gradient.
    """
    p = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(exp_avg_ptr + offsets, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + (-step_size) * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_multi_tensor_kernel(
    addresses_ptr,  # int64 (n_tensors, 4): param, grad, exp_avg, exp_avg_sq; 16-byte aligned
    numels_ptr,  # int64 (n_tensors,)
    scalars_ptr,  # fp32 (n_tensors, 7): decay, 1-beta1, beta2, 1-beta2, eps, step_size, bc2_sqrt
    chunks_ptr,  # int32 (n_chunks, 2): tensor index, chunk index within the tensor
    grad_scale_ptr,  # fp32 (1,): every gradient is multiplied by it (the clip coefficient)
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunks_ptr + 2 * pid)
    chunk = tl.load(chunks_ptr + 2 * pid + 1)
    row = tensor.to(tl.int64) * 4
    # The alignment promise (checked on the host) lets full blocks use 128-bit loads and stores.
    param_ptr = tl.multiple_of(tl.load(addresses_ptr + row).to(tl.pointer_type(PARAM_DTYPE)), 16)
    grad_ptr = tl.multiple_of(tl.load(addresses_ptr + row + 1).to(tl.pointer_type(GRAD_DTYPE)), 16)
    exp_avg_ptr = tl.multiple_of(
        tl.load(addresses_ptr + row + 2).to(tl.pointer_type(tl.float32)), 16
    )
    exp_avg_sq_ptr = tl.multiple_of(
        tl.load(addresses_ptr + row + 3).to(tl.pointer_type(tl.float32)), 16
    )
    numel = tl.load(numels_ptr + tensor)

    scalars = scalars_ptr + tensor.to(tl.int64) * 7
    decay = tl.load(scalars)
    one_minus_beta1 = tl.load(scalars + 1)
    beta2 = tl.load(scalars + 2)
    one_minus_beta2 = tl.load(scalars + 3)
    eps = tl.load(scalars + 4)
    step_size = tl.load(scalars + 5)
    bias_correction2_sqrt = tl.load(scalars + 6)
    grad_scale = tl.load(grad_scale_ptr)  # read on the device: no host sync for the clip norm

    start = chunk.to(tl.int64) * CHUNK
    end = tl.minimum(numel, start + CHUNK)
    n_full_blocks = (end - start) // BLOCK
    for i in range(0, n_full_blocks):  # unmasked, so the accesses vectorize
        offsets = start + i * BLOCK + tl.arange(0, BLOCK)
        _adamw_update(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            exp_avg_sq_ptr,
            offsets,
            None,
            grad_scale,
            decay,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            step_size,
            bias_correction2_sqrt,
        )
    tail = start + n_full_blocks * BLOCK
    if tail < end:
        offsets = tail + tl.arange(0, BLOCK)
        _adamw_update(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            exp_avg_sq_ptr,
            offsets,
            offsets < end,
            grad_scale,
            decay,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            step_size,
            bias_correction2_sqrt,
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: the local shard of a DTensor, else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class _Update:
    """One parameter's tensors (local shards) and the scalars of this step."""

    __slots__ = ("param", "grad", "exp_avg", "exp_avg_sq", "scalars")

    def __init__(self, param, grad, exp_avg, exp_avg_sq, scalars):
        self.param, self.grad, self.exp_avg, self.exp_avg_sq = param, grad, exp_avg, exp_avg_sq
        self.scalars = scalars


def _step_scalars(group: dict[str, Any], step: float) -> list[float]:
    """The kernel's per-tensor scalars, computed in double precision as torch.optim.AdamW does."""
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return [
        1 - lr * wd,
        1 - beta1,
        beta2,
        1 - beta2,
        eps,
        lr / bias_correction1,
        bias_correction2**0.5,
    ]


def _torch_update(u: _Update, weight_decay: float, grad_scale: torch.Tensor | None) -> None:
    """The reference step in PyTorch ops, in fp32 (the op sequence of torch.optim.AdamW)."""
    decay, w1, beta2, w2, eps, step_size, bc2_sqrt = u.scalars
    p = u.param if u.param.dtype == torch.float32 else u.param.float()
    g = u.grad if u.grad.dtype == torch.float32 else u.grad.float()
    if grad_scale is not None:
        g = g * grad_scale.to(g.device)
    if weight_decay != 0:
        p.mul_(decay)
    u.exp_avg.lerp_(g, w1)
    u.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=w2)
    denom = (u.exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(u.exp_avg, denom, value=-step_size)
    if p is not u.param:
        u.param.copy_(p)


def _kernel_config(device: torch.device) -> tuple[int, int, int]:
    if device.type == "cpu" and INTERPRET:
        return INTERPRET_BLOCK, INTERPRET_CHUNK, 1
    return GPU_BLOCK, GPU_CHUNK, GPU_NUM_WARPS


def _fits_kernel(u: _Update) -> bool:
    return (
        u.param.dtype in _KERNEL_DTYPES
        and u.grad.dtype in _KERNEL_DTYPES
        and u.grad.device == u.param.device
        and all(
            t.is_contiguous() and t.data_ptr() % 16 == 0
            for t in (u.param, u.grad, u.exp_avg, u.exp_avg_sq)
        )
    )


@functools.lru_cache(maxsize=16)
def _size_tables(
    numels: tuple[int, ...], chunk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element counts and the (tensor, chunk) list, kept on the device while sizes stay the same."""
    chunks = [(i, c) for i, n in enumerate(numels) for c in range(triton.cdiv(n, chunk))]
    return (
        torch.tensor(numels, dtype=torch.int64, device=device),
        torch.tensor(chunks, dtype=torch.int32, device=device).reshape(-1, 2),
    )


@functools.lru_cache(maxsize=8)
def _ones(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def _launch(updates: list[_Update], grad_scale: torch.Tensor | None = None) -> None:
    """One kernel launch for tensors sharing device, param dtype and grad dtype."""
    first = updates[0]
    device = first.param.device
    if grad_scale is None:
        grad_scale = _ones(device)
    else:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    block, chunk, num_warps = _kernel_config(device)
    addresses, scalars = [], []
    for u in updates:
        addresses += [u.param.data_ptr(), u.grad.data_ptr()]
        addresses += [u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()]
        scalars += u.scalars
    numels, chunks = _size_tables(tuple(u.param.numel() for u in updates), chunk, device)
    # Addresses change whenever gradients are reallocated and scalars with every step.
    table = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
    scalars_t = torch.tensor(scalars, dtype=torch.float32).to(device, non_blocking=True)
    _adamw_multi_tensor_kernel[(chunks.shape[0],)](
        table,
        numels,
        scalars_t,
        chunks,
        grad_scale.reshape(1),
        PARAM_DTYPE=_KERNEL_DTYPES[first.param.dtype],
        GRAD_DTYPE=_KERNEL_DTYPES[first.grad.dtype],
        BLOCK=block,
        CHUNK=chunk,
        num_warps=num_warps,
    )


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (without amsgrad/maximize) with a fused multi-tensor Triton step.

    ``backend``: ``None`` picks the kernel for CUDA parameters and PyTorch ops otherwise;
    ``"triton"`` / ``"torch"`` force one (see :mod:`kernels._backend`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str | None = None,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if backend not in (None, "auto", "triton", "torch"):
            raise ValueError(f"unknown kernel backend {backend!r}; choose auto, triton or torch")
        self.backend = backend
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class or of ``torch.optim.AdamW``; moments become fp32 again.

        ``Optimizer.load_state_dict`` casts floating state to the parameter's dtype, which would
        round fp32 moments of bf16 parameters; they are taken from ``state_dict`` once more here.
        Steps saved by a fused or capturable torch AdamW live on the GPU; they move to the CPU,
        where reading them each step costs no device synchronization.
        """
        for group in state_dict["param_groups"]:
            for unsupported in ("amsgrad", "maximize"):
                if group.get(unsupported):
                    raise ValueError(
                        f"kernels.AdamW does not implement {unsupported}=True; "
                        "load this state into torch.optim.AdamW instead"
                    )
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in _STATE_KEYS:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32)
            if "step" in state:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _STATE_KEYS:
                state[key] = torch.zeros_like(
                    p, dtype=torch.float32, memory_format=torch.preserve_format
                )
        return state

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: torch.Tensor | float | None = None,
    ) -> float | None:
        """One AdamW step; ``grad_scale`` (a one-element tensor, or a float) multiplies every
        gradient first, inside the kernel, without modifying ``p.grad``.

        Pass the coefficient from :func:`clip_grad_scale` in place of calling ``clip_grad_norm_``:
        the result is that of clipping and then stepping, and as a device tensor the coefficient
        is read by the kernel, so nothing waits for the norm on the host.
        """
        grad_scale = _scale_tensor(grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel_groups: dict[tuple, list[_Update]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("kernels.AdamW does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                u = _Update(
                    _local(p),
                    _local(p.grad),
                    _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]),
                    _step_scalars(group, float(state["step"])),
                )
                if u.param.numel() == 0:
                    continue
                if use_triton(u.param, self.backend) and _fits_kernel(u):
                    key = (u.param.device, u.param.dtype, u.grad.dtype)
                    kernel_groups.setdefault(key, []).append(u)
                else:
                    _torch_update(u, float(group["weight_decay"]), grad_scale)
        for updates in kernel_groups.values():
            _launch(updates, grad_scale)
        return loss


def _scale_tensor(grad_scale: torch.Tensor | float | None) -> torch.Tensor | None:
    """``grad_scale`` as a plain one-element fp32 tensor (a DTensor's full value), or None."""
    if grad_scale is None:
        return None
    if not torch.is_tensor(grad_scale):
        return torch.tensor([float(grad_scale)], dtype=torch.float32)
    full = getattr(grad_scale, "full_tensor", None)
    if full is not None:
        grad_scale = full()
    if grad_scale.numel() != 1:
        raise ValueError(f"grad_scale must hold one value, got shape {tuple(grad_scale.shape)}")
    return grad_scale.detach().reshape(1).float()


def clip_grad_scale(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total gradient norm, clip coefficient), the coefficient ``clip_grad_norm_`` multiplies by.

    Nothing is modified: hand the coefficient to ``AdamW.step(grad_scale=...)``. Both stay device
    tensors, so logging the norm is the only thing that needs to synchronize. The formula is
    ``clip_grad_norm_``'s: ``min(1, max_norm / (norm + 1e-6))``.
    """
    if torch.is_tensor(parameters):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, torch.ones((), dtype=torch.float32)
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        total_norm = get_total_norm(grads, norm_type, foreach=foreach)
    else:  # torch < 2.6: the same norm of per-tensor norms
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        total_norm = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    return total_norm, coefficient


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch, for the sm_90 build checker."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    builds = []
    for param_dtype in (tl.float32, tl.bfloat16, tl.float16):
        for grad_dtype in (tl.float32, tl.bfloat16, tl.float16):
            builds.append(
                {
                    "name": f"adamw_p{names[param_dtype]}_g{names[grad_dtype]}",
                    "fn": _adamw_multi_tensor_kernel,
                    "signature": {
                        "addresses_ptr": "*i64",
                        "numels_ptr": "*i64",
                        "scalars_ptr": "*fp32",
                        "chunks_ptr": "*i32",
                        "grad_scale_ptr": "*fp32",
                        "PARAM_DTYPE": "constexpr",
                        "GRAD_DTYPE": "constexpr",
                        "BLOCK": "constexpr",
                        "CHUNK": "constexpr",
                    },
                    "constexprs": {
                        "PARAM_DTYPE": param_dtype,
                        "GRAD_DTYPE": grad_dtype,
                        "BLOCK": GPU_BLOCK,
                        "CHUNK": GPU_CHUNK,
                    },
                    "num_warps": GPU_NUM_WARPS,
                    "num_stages": 1,
                    "matrix": False,
                }
            )
    return builds


__all__ = ["AdamW", "clip_grad_scale", "sm90_builds"]
