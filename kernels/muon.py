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

A sharded parameter is a DTensor, and the iteration needs whole matrices. Whatever the
placement — FSDP2's ``Shard(0)`` rows, HSDP's ``(Replicate, Shard(0))``, tensor parallel's row or
column splits on a 2-D mesh, FSDP's ``_StridedShard`` over tensor-parallel rows — the matrices that
share one group of ranks (the mesh dims on which they are split, flattened) are divided among its
ranks: sorted by shape, then taken round-robin, so each rank owns a near-equal share of every
shape. One ``all_to_all`` sends every rank's part of each matrix, cast to ``ns_dtype``, to its
owner, which writes the parts into whole matrices (each rank's rows and columns come from
DTensor's own split of an index vector, exchanged once per layout); the owner runs the iteration
on its whole matrices (batched by shape), and a second ``all_to_all`` sends each rank back its
part of the result. A step thus moves each local shard twice in ``ns_dtype``, holds about 1/group
of the matrices whole on each rank and spreads the iteration's FLOPs over the group, instead of
every rank gathering and orthogonalizing everything.

Replicate dims (HSDP's ``dp_replicate``) are not part of the group: every replica holds the same
data, so each replica group runs the same split independently and no byte crosses the replicate
dim. Splitting over the replicas too would cut the iteration's FLOPs by another factor of
``dp_replicate`` but needs a broadcast of every result across that dim — the slow, inter-node one
under HSDP — every step, a bf16 copy of each rank's shard. ``matrices_orthogonalized`` counts the matrices this rank ran the iteration on. A DTensor of any other placement (a partial
sum, or a split over several dims of a mesh that lacks some ranks, whose flattened group not every
rank could create alike) is gathered whole on every rank, orthogonalized there, and each rank keeps
its part.
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
        self.result = None  # this rank's part of the orthogonalized update


def _is_matrix_shard(placement) -> bool:
    """A Shard or FSDP's _StridedShard of the rows or columns (what the split path lays out)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, (Shard, _StridedShard)) and placement.dim in (0, 1, -1, -2)


def _placement(p: torch.Tensor) -> tuple[str, Any]:
    """("local", None) for a matrix whole on this rank (a plain tensor, or replicated on every
    mesh dim); ("split", (mesh, shard_dims)) for a DTensor whose rows and/or columns are split
    over the mesh dims ``shard_dims`` (FSDP2, HSDP, tensor parallel, FSDP's _StridedShard);
    ("gather", None) for anything else (a partial sum, or a split over several dims of a mesh
    that lacks some ranks), which every rank gathers whole."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return "local", None
    placements = tuple(p.placements)
    shard_dims = tuple(
        d for d, pl in enumerate(placements) if not pl.is_replicate() and mesh.size(d) > 1
    )
    if not shard_dims:
        return "local", None  # replicated, or split over dims of one rank (a single GPU's mesh)
    if not all(_is_matrix_shard(placements[d]) for d in shard_dims):
        return "gather", None
    if len(shard_dims) > 1 and not _covers_the_world(mesh):
        return "gather", None  # its groups could not be created by every rank alike
    return "split", (mesh, shard_dims)


def _covers_the_world(mesh) -> bool:
    """Whether ``mesh`` holds every rank (then every rank builds its flattened groups alike)."""
    import torch.distributed as dist

    return mesh.mesh.numel() == dist.get_world_size()


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


def _axis_placements(placements, axis: int) -> list:
    """The placements of one axis (0: rows, 1: columns) of a matrix as those of a 1-D tensor:
    the other axis's splits become Replicate, this axis's are moved to dim 0."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for pl in placements:
        if pl.is_replicate() or pl.dim % 2 != axis:
            out.append(Replicate())
        elif isinstance(pl, _StridedShard):
            out.append(_StridedShard(0, split_factor=pl.split_factor))
        else:
            out.append(Shard(0))
    return out


def _as_index(indices: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the indices are one contiguous run (every plain Shard), else the indices."""
    n = indices.numel()
    if n == 0:
        return slice(0, 0)
    start = int(indices[0])
    if torch.equal(indices, torch.arange(start, start + n)):
        return slice(start, start + n)
    return indices


def _on(index: slice | torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    """The index on ``device``: moved once when a layout is cached, not at every step."""
    return index if isinstance(index, slice) else index.to(device)


def _extent(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def _take(whole: torch.Tensor, rows, cols) -> torch.Tensor:
    """The part of ``whole`` at (rows, cols), contiguous."""
    return whole[rows][:, cols].contiguous()


def _put(whole: torch.Tensor, rows, cols, part: torch.Tensor) -> None:
    """Write ``part`` at (rows, cols) of ``whole``."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        whole[rows, cols] = part
        return
    device = whole.device
    r = torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
    c = torch.arange(cols.start, cols.stop, device=device) if isinstance(cols, slice) else cols
    whole[r.to(device)[:, None], c.to(device)[None, :]] = part


class _Split:
    """The matrices of one step that share a group of ranks: the group, each matrix's
    (rows, columns) on every rank of it and each matrix's owner (a group rank)."""

    __slots__ = ("matrices", "pg", "world", "rank", "layouts", "owner")

    def __init__(self, matrices, pg, world, rank, layouts, owner):
        self.matrices, self.pg, self.world, self.rank = matrices, pg, world, rank
        self.layouts, self.owner = layouts, owner

    def numel(self, i: int, rank: int) -> int:
        """Elements of matrix ``i`` held by group rank ``rank``."""
        rows, cols = self.layouts[i][rank]
        return _extent(rows) * _extent(cols)


def _mesh_key(mesh) -> tuple:
    """A mesh by value: its ranks and shape (tensor parallel and FSDP2 make separate but equal
    mesh objects for one set of ranks)."""
    return tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist())


def _group_key(mesh, shard_dims: tuple[int, ...]) -> tuple:
    """Matrices with equal keys share one group of ranks and one pair of all_to_alls."""
    return _mesh_key(mesh), shard_dims


def _owners(matrices: list[_Matrix], world: int) -> list[int]:
    """Group rank that orthogonalizes each matrix: round-robin over the matrices sorted by shape
    (then parameter order), so each rank gets a near-equal share of every shape's batch."""
    order = sorted(range(len(matrices)),
                   key=lambda i: (sorted(matrices[i].param.shape), i))  # fmt: skip
    owner = [0] * len(matrices)
    for k, i in enumerate(order):
        owner[i] = k % world
    return owner


def _shard_group(mesh, shard_dims: tuple[int, ...]):
    """The process group of the ranks that hold different parts of a matrix split over the mesh
    dims ``shard_dims``: those sharing this rank's coordinates on the other (Replicate) dims.
    For several dims every rank creates every such group, in the same order, as new_group
    requires (once per optimizer and mesh)."""
    if len(shard_dims) == 1:
        return mesh.get_group(shard_dims[0])
    import torch.distributed as dist

    others = [d for d in range(mesh.ndim) if d not in shard_dims]
    size = math.prod(mesh.size(d) for d in shard_dims)
    rows = mesh.mesh.permute(*others, *shard_dims).reshape(-1, size).tolist()
    me, mine = dist.get_rank(), None
    for ranks in rows:
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def _local_indices(p, axis: int) -> list[int]:
    """The global row (``axis`` 0) or column (1) indices of ``p``'s local part on this rank, by
    DTensor's own split of an index vector (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    mesh = p.device_mesh
    index = torch.arange(p.shape[axis], device=mesh.device_type)
    placements = _axis_placements(p.placements, axis)
    return distribute_tensor(index, mesh, placements, src_data_rank=None).to_local().tolist()


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
        self.matrices_orthogonalized = 0  # matrices this rank ran the iteration on, all steps
        self._groups: dict[tuple, tuple] = {}  # (mesh, shard dims) -> (mesh, process group)
        self._layouts: dict[tuple, tuple] = {}  # (mesh, placements, shape) -> (mesh, layout)
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
        """Fill ``m.result`` (this rank's part of NS(update)) for every matrix."""
        for m in matrices:
            if m.placement[0] == "gather":
                m.update = _whole(m.param, m.update)
        whole = [m for m in matrices if m.placement[0] in ("local", "gather")]
        by_group: dict[tuple, list[_Matrix]] = {}
        for m in matrices:
            if m.placement[0] == "split":
                by_group.setdefault(_group_key(*m.placement[1]), []).append(m)
        splits = [self._split(ms) for ms in by_group.values()]
        gathered = [self._gather_owned(split) for split in splits]
        jobs = [(m.update, m.group) for m in whole]
        jobs += [(full, split.matrices[i].group) for split, owned in zip(splits, gathered)
                 for i, full in owned]  # fmt: skip
        results = self._batched_newton_schulz(jobs)
        for m, r in zip(whole, results):
            m.result = _own_part(m.param, r) if m.placement[0] == "gather" else r
        results = results[len(whole) :]
        for split, owned in zip(splits, gathered):
            mine, results = results[: len(owned)], results[len(owned) :]
            self._scatter_owned(split, [(i, r) for (i, _), r in zip(owned, mine)])

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
        self.matrices_orthogonalized += len(jobs)
        return results

    # ------------------------------------------------------------------ split matrices

    def _split(self, matrices: list[_Matrix]) -> _Split:
        """The group sharing ``matrices`` (one mesh and shard dims), their layouts and owners."""
        import torch.distributed as dist

        mesh, shard_dims = matrices[0].placement[1]
        key = _group_key(mesh, shard_dims)
        if key not in self._groups:
            self._groups[key] = (mesh, _shard_group(mesh, shard_dims))
        pg = self._groups[key][1]
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        layouts = [self._layout(m.param, pg) for m in matrices]
        for m, layout in zip(matrices, layouts):
            expected = tuple(_extent(index) for index in layout[rank])
            if tuple(m.update.shape) != expected:
                raise RuntimeError(
                    f"a parameter of shape {tuple(m.param.shape)} with placements "
                    f"{tuple(m.param.placements)} holds a {tuple(m.update.shape)} shard on "
                    f"rank {rank}; its DTensor layout says {expected}"
                )
        return _Split(matrices, pg, world, rank, layouts, _owners(matrices, world))

    def _layout(self, p, pg) -> list[tuple[slice | torch.Tensor, slice | torch.Tensor]]:
        """(rows, columns) of ``p`` held by each rank of ``pg``, in group-rank order: computed
        from DTensor's own split of this rank's part and exchanged once per layout (cached)."""
        import torch.distributed as dist

        key = (_mesh_key(p.device_mesh), tuple(p.placements), tuple(p.shape))
        if key not in self._layouts:
            mine = tuple(_local_indices(p, axis) for axis in (0, 1))
            every: list = [None] * dist.get_world_size(pg)
            dist.all_gather_object(every, mine, group=pg)
            layout = [tuple(_on(_as_index(torch.tensor(ix, dtype=torch.long)), p.device)
                            for ix in rc) for rc in every]  # fmt: skip
            self._layouts[key] = (p.device_mesh, layout)
        return self._layouts[key][1]

    def _gather_owned(self, split: _Split) -> list[tuple[int, torch.Tensor]]:
        """(index, whole update) of the matrices this rank owns, by one all_to_all in which
        every rank sends its part of each matrix to the matrix's owner."""
        import torch.distributed as dist

        ms, world, owner = split.matrices, split.world, split.owner
        device, dtype = ms[0].update.device, self.ns_dtype
        send: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for i, m in enumerate(ms):
            send[owner[i]].append(m.update.reshape(-1))
        in_splits = [sum(t.numel() for t in ts) for ts in send]
        owned = [i for i in range(len(ms)) if owner[i] == split.rank]
        out_splits = [sum(split.numel(i, src) for i in owned) for src in range(world)]
        flat_in = torch.cat([t for ts in send for t in ts]) if any(in_splits) else None
        if flat_in is None:
            flat_in = torch.empty(0, dtype=dtype, device=device)
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(flat_out, flat_in, out_splits, in_splits, group=split.pg)
        # flat_out holds, for each source rank in order, its part of each owned matrix in order.
        wholes = {i: torch.empty(ms[i].param.shape, dtype=dtype, device=device) for i in owned}
        offset = 0
        for src in range(world):
            for i in owned:
                rows, cols = split.layouts[i][src]
                n = split.numel(i, src)
                part = flat_out[offset : offset + n].view(_extent(rows), _extent(cols))
                _put(wholes[i], rows, cols, part)
                offset += n
        return [(i, wholes[i]) for i in owned]

    def _scatter_owned(self, split: _Split, owned: list[tuple[int, torch.Tensor]]) -> None:
        """Send every rank its part of the owned results (the reverse all_to_all)."""
        import torch.distributed as dist

        ms, world, owner, rank = split.matrices, split.world, split.owner, split.rank
        device, dtype = ms[0].update.device, self.ns_dtype
        send, in_splits = [], []
        for dst in range(world):
            parts = [_take(result, *split.layouts[i][dst]).reshape(-1) for i, result in owned]
            send += parts
            in_splits.append(sum(t.numel() for t in parts))
        out_splits = [
            sum(split.numel(i, rank) for i in range(len(ms)) if owner[i] == src)
            for src in range(world)
        ]
        flat_in = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(
            flat_out, flat_in.contiguous(), out_splits, in_splits, group=split.pg
        )
        offset = [0] * world
        starts = [sum(out_splits[:src]) for src in range(world)]
        for i, m in enumerate(ms):
            src = owner[i]
            rows, cols = split.layouts[i][rank]
            n = split.numel(i, rank)
            begin = starts[src] + offset[src]
            m.result = flat_out[begin : begin + n].view(_extent(rows), _extent(cols))
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
