"""Muon for the hidden matrices and AdamW for the rest, in one optimizer object.

Muon (momentum, then the Newton–Schulz orthogonalization of :mod:`kernels.newton_schulz`) is for
2-D weight matrices inside the network; embeddings, the output head, norms and biases are trained
with AdamW. One :class:`Muon` holds both kinds of parameter groups — a group with
``use_muon=False`` is an AdamW group, stepped by the fused multi-tensor kernel of
:mod:`kernels.adamw` — so a trainer keeps one optimizer, one learning-rate loop over
``param_groups`` and one ``state_dict``.

The Muon update is that of ``torch.optim.Muon`` (same argument names, defaults and meanings)::

    B ← μ B + (1 − μ) g            (as B.lerp_(g, 1 − μ))
    U ← g + μ (B − g) if nesterov else B
    O ← NS(U)                      (normalized by its Frobenius norm, then ns_steps iterations)
    θ ← θ (1 − lr · λ) − lr · adjust(shape) · O

with ``adjust_lr_fn`` ``"original"`` (``max(1, rows / cols) ** 0.5``, the default) or
``"match_rms_adamw"`` (``0.2 * max(rows, cols) ** 0.5``, which lets Muon reuse AdamW's learning rate
and weight decay). The momentum buffer is fp32 whatever the parameter dtype; the iteration runs in
``ns_dtype`` (bf16 by default, as ``torch.optim.Muon`` does).

Matrices are batched by shape: every matrix whose shape, rows ≤ cols after transposing tall ones,
is the same goes through the iteration in one batched launch per kernel.

Under FSDP2 a parameter is a DTensor sharded by rows (``Shard(0)``) and the iteration needs whole
matrices. Each rank orthogonalizes a disjoint subset: matrix ``i`` (in parameter order) belongs to
rank ``i % world``. One ``all_to_all`` sends every rank's rows of each matrix, cast to
``ns_dtype``, to its owner; the owner runs the iteration on its whole matrices (batched by shape),
and a second ``all_to_all`` sends each rank back its rows of the result. A step thus moves each
local shard twice in ``ns_dtype``, holds about 1/world of the matrices whole on each rank and
spreads the iteration's FLOPs over the ranks, instead of every rank gathering and orthogonalizing
everything. A DTensor of any other placement (HSDP's replicated shards, tensor-parallel splits on
a 2-D mesh) is gathered whole on every rank, orthogonalized there, and each rank keeps its part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kernels._backend import use_triton
from kernels.adamw import _fits_kernel as _fits_adamw_kernel
from kernels.adamw import _launch, _local, _scale_tensor, _step_scalars, _torch_update, _Update
from kernels.newton_schulz import DEFAULT_COEFFICIENTS, DEFAULT_EPS, DEFAULT_STEPS, newton_schulz

_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
_ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """The learning rate a Muon matrix of ``shape`` (rows, cols) is stepped with."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; choose original or match_rms_adamw")


class _Matrix:
    """One Muon parameter of this step: its local tensors, the update and its owner's result."""

    __slots__ = ("param", "group", "update", "result", "placement")

    def __init__(self, param, group, update, placement):
        self.param, self.group, self.update, self.placement = param, group, update, placement
        self.result = None  # this rank's rows of the orthogonalized update


def _placement(p: torch.Tensor) -> tuple[str, Any]:
    """("local", None) for a whole matrix on this rank, ("rows", mesh) for a row-sharded DTensor
    on a 1-D mesh (FSDP2), ("gather", None) for any other placement (HSDP, tensor parallel)."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return "local", None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return "local", None
    if mesh.ndim == 1 and placements == (Shard(0),):
        return "rows", mesh
    return "gather", None


def _whole(p, local_update: torch.Tensor) -> torch.Tensor:
    """The whole update of DTensor ``p`` from every rank's local part (an all-gather over its
    mesh; each rank then orthogonalizes the matrix itself)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_update, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    ).full_tensor()


def _own_part(p, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole matrix laid out like DTensor ``p`` (a local slice, no
    communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(whole, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return replicated.redistribute(p.device_mesh, p.placements).to_local()


def _row_counts(rows: int, world: int) -> list[int]:
    """Rows of each rank under Shard(0) (torch.chunk's split: ceil(rows / world) per rank)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices and fused AdamW for groups with ``use_muon=False``.

    Muon groups take ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``,
    ``eps``, ``ns_steps`` and ``adjust_lr_fn`` (torch.optim.Muon's meanings); AdamW groups take
    ``lr``, ``betas``, ``eps`` and ``weight_decay`` (torch.optim.AdamW's). Constructor arguments
    are the defaults of Muon groups; ``betas`` and ``adamw_eps`` those of AdamW groups, whose
    ``lr`` and ``weight_decay`` default to ``adamw_lr`` / ``adamw_weight_decay`` when given and to
    the Muon ones otherwise.

    ``ns_dtype``: the dtype of the iteration (bf16, or fp32 for an exact-as-fp32 step).
    ``backend``: ``None`` runs the Triton kernels for CUDA parameters and PyTorch ops otherwise;
    ``"triton"`` / ``"torch"`` force one (see :mod:`kernels._backend`).

    State per parameter: ``momentum_buffer`` (fp32) for Muon parameters, as torch.optim.Muon
    keeps it; ``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW ones, as torch.optim.AdamW does.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
        eps: float = DEFAULT_EPS,
        ns_steps: int = DEFAULT_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if adjust_lr_fn not in _ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if len(ns_coefficients) != 3:
            raise ValueError("ns_coefficients must be three numbers (a, b, c)")
        if ns_dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"ns_dtype must be bf16, fp32 or fp64, got {ns_dtype}")
        if backend not in (None, "auto", "triton", "torch"):
            raise ValueError(f"unknown kernel backend {backend!r}; choose auto, triton or torch")
        self.backend, self.ns_dtype = backend, ns_dtype
        self._adamw_defaults = {
            "lr": lr if adamw_lr is None else adamw_lr,
            "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            "eps": adamw_eps,
            "betas": betas,
        }
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "betas": betas,
            "use_muon": True,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """AdamW groups get AdamW's defaults (``eps`` above all); Muon groups must be 2-D."""
        if not param_group.get("use_muon", True):
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon only supports 2D parameters; got one of shape {tuple(p.shape)} "
                        "(put it in a group with use_muon=False)"
                    )
            if group["adjust_lr_fn"] not in _ADJUST_LR_FNS:
                raise ValueError(f"unknown adjust_lr_fn {group['adjust_lr_fn']!r}")
        else:
            for i, beta in enumerate(group["betas"]):
                if not 0.0 <= beta < 1.0:
                    raise ValueError(f"Invalid beta parameter at index {i}: {beta}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class; fp32 states stay fp32 whatever the parameter dtype.

        Saved groups lacking a key of ours (a state of ``torch.optim.Muon`` has no ``use_muon``
        or ``betas``) keep the value of the group they replace.
        """
        current = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, current):
            for key, value in before.items():
                group.setdefault(key, value)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in ("momentum_buffer", *_ADAMW_STATE_KEYS):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32)
            if "step" in state:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: torch.Tensor | float | None = None,
    ) -> float | None:
        """One step of every group; ``grad_scale`` multiplies every gradient first (the clip
        coefficient of :func:`kernels.clip_grad_scale`), without modifying ``p.grad``."""
        grad_scale = _scale_tensor(grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices: list[_Matrix] = []
        for group in self.param_groups:
            if group["use_muon"]:
                matrices += self._momentum(group, grad_scale)
            else:
                self._adamw_step(group, grad_scale)
        if matrices:
            self._orthogonalize(matrices)
            for m in matrices:
                self._apply(m)
        return loss

    # ------------------------------------------------------------------ AdamW groups

    def _adamw_step(self, group: dict[str, Any], grad_scale: torch.Tensor | None) -> None:
        kernel_groups: dict[tuple, list[_Update]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("kernels.Muon does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key in _ADAMW_STATE_KEYS:
                    state[key] = torch.zeros_like(
                        p, dtype=torch.float32, memory_format=torch.preserve_format
                    )
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
            if use_triton(u.param, self.backend) and _fits_adamw_kernel(u):
                key = (u.param.device, u.param.dtype, u.grad.dtype)
                kernel_groups.setdefault(key, []).append(u)
            else:
                _torch_update(u, float(group["weight_decay"]), grad_scale)
        for updates in kernel_groups.values():
            _launch(updates, grad_scale)

    # ------------------------------------------------------------------ Muon groups

    def _momentum(self, group: dict[str, Any], grad_scale: torch.Tensor | None) -> list[_Matrix]:
        """Momentum and Nesterov on the local rows; the updates to orthogonalize, in ns_dtype."""
        momentum, nesterov = float(group["momentum"]), bool(group["nesterov"])
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("kernels.Muon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("kernels.Muon does not support complex parameters")
            placement = _placement(p)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=torch.float32, memory_format=torch.preserve_format
                )
            buf = _local(state["momentum_buffer"])
            grad = _local(p.grad)
            grad = grad if grad.dtype == torch.float32 else grad.float()
            if grad_scale is not None:
                grad = grad * grad_scale.to(grad.device)
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if nesterov else buf
            out.append(_Matrix(p, group, update.to(self.ns_dtype), placement))
        return out

    def _orthogonalize(self, matrices: list[_Matrix]) -> None:
        """Fill ``m.result`` (this rank's rows of NS(update)) for every matrix."""
        gathered_whole = [m for m in matrices if m.placement[0] == "gather"]
        for m in gathered_whole:
            m.update = _whole(m.param, m.update)
        whole = [m for m in matrices if m.placement[0] in ("local", "gather")]
        by_mesh: dict[int, list[_Matrix]] = {}
        for m in matrices:
            if m.placement[0] == "rows":
                by_mesh.setdefault(id(m.placement[1]), []).append(m)
        gathered = [self._gather_owned(ms) for ms in by_mesh.values()]
        jobs = [(m.update, m.group) for m in whole]
        jobs += [(full, ms[i].group) for ms, owned in zip(by_mesh.values(), gathered)
                 for i, full in owned]  # fmt: skip
        results = self._batched_newton_schulz(jobs)
        for m, r in zip(whole, results):
            m.result = _own_part(m.param, r) if m.placement[0] == "gather" else r
        results = results[len(whole) :]
        for ms, owned in zip(by_mesh.values(), gathered):
            mine, results = results[: len(owned)], results[len(owned) :]
            self._scatter_rows(ms, [(i, r) for (i, _), r in zip(owned, mine)])

    def _batched_newton_schulz(
        self, jobs: list[tuple[torch.Tensor, dict[str, Any]]]
    ) -> list[torch.Tensor]:
        """NS of each whole matrix, one batch per (device, rows <= cols shape, NS settings)."""
        batches: dict[tuple, list[int]] = {}
        for i, (u, group) in enumerate(jobs):
            rows, cols = u.shape
            settings = (tuple(group["ns_coefficients"]), int(group["ns_steps"]), group["eps"])
            key = (u.device, min(rows, cols), max(rows, cols), settings)
            batches.setdefault(key, []).append(i)
        results: list[torch.Tensor] = [None] * len(jobs)  # type: ignore[list-item]
        for (_, _, _, (coefficients, steps, eps)), indices in batches.items():
            tall = [jobs[i][0].shape[0] > jobs[i][0].shape[1] for i in indices]
            stack = torch.stack([jobs[i][0].mT if t else jobs[i][0] for i, t in zip(indices, tall)])
            out = newton_schulz(
                stack, steps, coefficients, eps, self.ns_dtype, backend=self.backend
            )
            for k, (i, t) in enumerate(zip(indices, tall)):
                results[i] = out[k].mT if t else out[k]
        return results

    def _gather_owned(self, matrices: list[_Matrix]) -> list[tuple[int, torch.Tensor]]:
        """(index, whole update) of the matrices this rank owns, by one all_to_all."""
        import torch.distributed as dist

        mesh = matrices[0].placement[1]
        pg = mesh.get_group()
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        counts = [_row_counts(m.param.shape[0], world) for m in matrices]
        for m, c in zip(matrices, counts):
            if m.update.shape[0] != c[rank]:
                raise RuntimeError(
                    f"a Shard(0) parameter of shape {tuple(m.param.shape)} holds "
                    f"{m.update.shape[0]} rows on rank {rank}; expected torch.chunk's {c[rank]}"
                )
        owner = [i % world for i in range(len(matrices))]
        device, dtype = matrices[0].update.device, self.ns_dtype
        send = [[] for _ in range(world)]
        for i, m in enumerate(matrices):
            send[owner[i]].append(m.update.reshape(-1))
        in_splits = [sum(t.numel() for t in ts) for ts in send]
        owned = [i for i in range(len(matrices)) if owner[i] == rank]
        out_splits = [
            sum(counts[i][src] * matrices[i].param.shape[1] for i in owned) for src in range(world)
        ]
        flat_in = torch.cat([t for ts in send for t in ts]) if any(in_splits) else None
        if flat_in is None:
            flat_in = torch.empty(0, dtype=dtype, device=device)
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(flat_out, flat_in, out_splits, in_splits, group=pg)
        # flat_out holds, for each source rank in order, its rows of each owned matrix in order.
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in owned}
        offset = 0
        for src in range(world):
            for i in owned:
                cols = matrices[i].param.shape[1]
                n = counts[i][src] * cols
                pieces[i].append(flat_out[offset : offset + n].view(counts[i][src], cols))
                offset += n
        return [(i, torch.cat(pieces[i])) for i in owned]

    def _scatter_rows(self, matrices: list[_Matrix], owned: list[tuple[int, torch.Tensor]]):
        """Send every rank its rows of the owned results (the reverse all_to_all)."""
        import torch.distributed as dist

        mesh = matrices[0].placement[1]
        pg = mesh.get_group()
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        counts = [_row_counts(m.param.shape[0], world) for m in matrices]
        owner = [i % world for i in range(len(matrices))]
        device, dtype = matrices[0].update.device, self.ns_dtype
        send, in_splits = [], []
        for dst in range(world):
            n_dst = 0
            for i, result in owned:
                start = sum(counts[i][:dst])
                rows = result[start : start + counts[i][dst]]
                send.append(rows.reshape(-1))
                n_dst += rows.numel()
            in_splits.append(n_dst)
        out_splits = [
            sum(
                counts[i][rank] * matrices[i].param.shape[1]
                for i in range(len(matrices))
                if owner[i] == src
            )
            for src in range(world)
        ]
        flat_in = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(flat_out, flat_in.contiguous(), out_splits, in_splits, group=pg)
        offset = [0] * world
        starts = [sum(out_splits[:src]) for src in range(world)]
        for i, m in enumerate(matrices):
            src = owner[i]
            n = counts[i][rank] * m.param.shape[1]
            begin = starts[src] + offset[src]
            m.result = flat_out[begin : begin + n].view(counts[i][rank], m.param.shape[1])
            offset[src] += n

    def _apply(self, m: _Matrix) -> None:
        """Decoupled weight decay with the group's lr, then the shape-adjusted Muon step."""
        group = m.group
        lr = float(group["lr"])
        step = adjusted_lr(lr, group["adjust_lr_fn"], tuple(m.param.shape))
        p = _local(m.param)
        if p.numel() == 0:
            return
        work = p if p.dtype == torch.float32 else p.float()
        work.mul_(1 - lr * float(group["weight_decay"]))
        work.add_(m.result, alpha=-step)
        if work is not p:
            p.copy_(work)
