"""``pretrain plan``: what a configuration costs on a cluster, computed on a laptop.

The model is built on the meta device (no memory) inside a fake process group of the requested
world size (every collective returns at once), and :func:`pretrain.parallel.parallelize` shards
it exactly as the trainer does. The parameter, gradient and optimizer figures are then read from
the local shards of the resulting DTensors, so uneven splits and whatever stays replicated show
up as they would on the cluster. Activations, the collectives and the FLOPs follow from the model
shape with the formulas written next to each function (and in ``docs/scale.md``).

The same two pieces, the fake process group and the meta-built sharded model, carry the
trainer's dry run (``--train.dry_run``), which additionally materializes the shards as fake
tensors and runs one real step on them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.cross_entropy import CHUNK_BYTES
from pretrain.config import Config, ConfigError, config_help, load_config, parse_overrides
from pretrain.errors import UserError
from pretrain.export import DTYPES
from pretrain.initialize import retie, tied_groups
from pretrain.metrics import PEAK_BF16_FLOPS
from pretrain.model import Transformer
from pretrain.optim import build_optimizer
from pretrain.parallel import (
    MESH_DIMS,
    DistInfo,
    build_mesh,
    check_tensor_parallel,
    parallelize,
    set_gradient_sync,
)

ACCEPTS_OVERRIDES = True
GIB = 2**30
DEFAULT_RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_MFU = 0.40


# --------------------------------------------------------------------------- the fake world


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[DistInfo]:
    """Be rank 0 of ``world_size`` ranks whose collectives do nothing (PyTorch's fake backend).

    Device meshes, FSDP2 and DTensor see a real process group of that size, so they shard as on
    the cluster; no data moves. The group is destroyed on exit.
    """
    if world_size < 1:
        raise UserError(f"the world size must be >= 1, got {world_size}")
    if dist.is_initialized():
        raise UserError("a process group is already initialized; plan in a fresh process")
    try:  # importing it registers the "fake" backend (torch 2.1 and later)
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:  # pragma: no cover - a torch built without distributed tests
        raise UserError(f"this PyTorch has no fake process group backend ({e})") from None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    _clear_dtensor_cache()
    try:
        yield DistInfo(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))
    finally:
        _clear_dtensor_cache()
        dist.destroy_process_group()


def _clear_dtensor_cache() -> None:
    """Forget DTensor's cached sharding decisions: they are keyed by mesh equality, which
    ignores process groups, so a decision made in an earlier world would name its groups."""
    from torch.distributed.tensor import DTensor

    propagator = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    clear = getattr(getattr(propagator, "propagate_op_sharding", None), "cache_clear", None)
    if clear is not None:
        clear()


def fake_tensors():
    """A mode in which new tensors are fake: shapes, dtypes and devices, but no storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def gpu_param_dtype(config: Config) -> torch.dtype:
    """The compute dtype the run would use on its GPUs (``auto`` is bf16 there)."""
    return DTYPES["bf16" if config.train.dtype == "auto" else config.train.dtype]


def sharded_meta_model(config: Config, dist_info: DistInfo, mesh=None) -> nn.Module:
    """The model built on the meta device and parallelized as the trainer parallelizes it.

    ``torch.compile`` is left out: it wraps the blocks without changing any parameter.
    """
    with torch.device("meta"):
        model = Transformer(config.model)
    return parallelize(
        model,
        dist_info,
        config.parallel,
        param_dtype=gpu_param_dtype(config),
        activation_checkpointing=config.train.activation_checkpointing,
        compile=False,
        mesh=mesh if mesh is not None else build_mesh(dist_info, config.parallel),
    )


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores of ``p``: its local shard when ``p`` is a DTensor."""
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def dry_run_world_size(config: Config) -> int:
    """The world a dry run pretends to be: ``WORLD_SIZE`` as torchrun would set it, else the
    mesh's product when ``parallel.dp_shard`` is given, else one rank."""
    if "WORLD_SIZE" in os.environ:
        value = os.environ["WORLD_SIZE"]
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"WORLD_SIZE must be a number of ranks >= 1, got {value!r}")
        return int(value)
    p = config.parallel
    return p.dp_replicate * p.tp * p.dp_shard if p.dp_shard > 0 else 1


# --------------------------------------------------------------------------- the plan


@dataclass
class MemoryRow:
    name: str
    bytes: int
    note: str


@dataclass
class CollectiveRow:
    name: str
    group: str  # the mesh dimension it runs over
    calls: int  # per optimizer step
    bytes_per_call: int  # the full tensor of one call (the gathered / reduced size)
    traffic: int  # bytes each rank sends per step (ring algorithms)


@dataclass
class Plan:
    config: str
    world_size: int
    mesh: dict[str, int]
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    activation_checkpointing: str
    optimizer: str
    n_params: int
    local_params: int  # elements of rank 0's shards
    memory: list[MemoryRow]
    total_bytes: int
    gpu_memory_bytes: int
    fits: bool
    headroom_bytes: int
    collectives: list[CollectiveRow]
    model_flops_per_token: float
    flops_per_step: float
    flops_per_gpu_step: float
    hardware_flops_per_gpu_step: float  # with the recomputation of activation checkpointing
    assumed_peak_flops: float
    assumed_mfu: float
    step_time_s: float
    gpu_hours: float  # for train.steps at that step time
    notes: list[str] = field(default_factory=list)

    def memory_bytes(self, name: str) -> int:
        return next(r.bytes for r in self.memory if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Shape:
    """The sizes the formulas use (elements), from the model config and the mesh."""

    L: int
    d: int
    d_kv: int
    f: int
    heads: int
    vocab: int
    tp: int


def _shape(config: Config, tp: int) -> _Shape:
    m = config.model
    return _Shape(
        L=m.n_layers,
        d=m.d_model,
        d_kv=m.n_kv_heads * m.head_dim,
        f=m.ffn_dim,
        heads=m.n_heads,
        vocab=m.vocab_size,
        tp=tp,
    )


def layer_activation_bytes(s: _Shape, mode: str, act_bytes: int) -> float:
    """Bytes one transformer block keeps for its backward pass, per token of the sequence.

    Counted from what each op of the block saves (after Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", for our Llama block: flash attention
    keeps no T x T scores, SwiGLU has two input projections, grouped-query attention has
    ``d_kv`` wide keys and values). With tensor parallel ``t`` and sequence parallel norms, every
    tensor is split ``t`` ways except the norm outputs gathered for the column-parallel products
    (``none``):

    - ``none``: ``(4d + 2 d_kv + 3f) / t + 2d`` elements (norm inputs, attention q/k/v/output,
      gate/up/SwiGLU output; the two gathered norm outputs), plus fp32 statistics (two RMSNorm
      ``rstd`` and the attention log-sum-exp per head);
    - ``selective``: what the policy saves, the outputs of the matrix products and of
      attention (q/k/v, attention output, gate/up, o and down, the last two after their
      reduce-scatter under tensor parallel): ``(4d + 2 d_kv + 2f) / t`` elements, plus the
      attention log-sum-exp;
    - ``full``: the block input alone, ``d / t``.
    """
    t = s.tp
    if mode == "full":
        return act_bytes * s.d / t
    if mode == "selective":
        return act_bytes * (4 * s.d + 2 * s.d_kv + 2 * s.f) / t + 4 * s.heads / t
    stats = 4 * (2 + s.heads) / t
    return act_bytes * ((4 * s.d + 2 * s.d_kv + 3 * s.f) / t + 2 * s.d) + stats


def activation_bytes(s: _Shape, mode: str, tokens: int, act_bytes: int) -> tuple[int, int]:
    """(blocks, loss) activation bytes of one micro-batch of ``tokens`` tokens.

    Blocks: every block's saved tensors, plus, with checkpointing, one block's full set while it
    is recomputed in the backward pass. Loss: the embedding output, the final norm's input and
    gathered output, and the fused linear cross-entropy's saved hidden gradient (per token), its
    fp32 head gradient (vocab x d: the head is whole on every tensor-parallel rank) and one
    chunk of logits.
    """
    blocks = s.L * layer_activation_bytes(s, mode, act_bytes)
    if mode != "none":
        blocks += layer_activation_bytes(s, "none", act_bytes)
    per_token_loss = act_bytes * (2 * s.d / s.tp + 2 * s.d)
    loss = tokens * per_token_loss + 4 * s.vocab * s.d + CHUNK_BYTES
    return int(tokens * blocks), int(loss)


@dataclass
class _Units:
    """The FSDP units of the sharded model: elements of rank 0's shards per block, and the root."""

    blocks: list[int]
    root: int
    param_bytes: int  # bytes per element of the stored (sharded) parameters


def _fsdp_units(model: nn.Module) -> _Units:
    seen: set[int] = set()
    blocks = []
    for block in model.layers:
        n = 0
        for p in block.parameters():
            seen.add(id(p))
            n += local_numel(p)
        blocks.append(n)
    root_params = [p for p in model.parameters() if id(p) not in seen]
    root = sum(local_numel(p) for p in root_params)
    itemsize = next(iter(model.parameters())).dtype.itemsize
    return _Units(blocks=blocks, root=root, param_bytes=itemsize)


def optimizer_state_elements(optimizer: torch.optim.Optimizer) -> int:
    """Elements of optimizer state rank 0 keeps: two per AdamW element, one per Muon element
    (its momentum). Read from the real optimizer's parameter groups over the shards."""
    total = 0
    for group in optimizer.param_groups:
        per = 1 if group.get("use_muon", False) else 2
        total += per * sum(local_numel(p) for p in group["params"])
    return total


def _resharded_blocks(policy: str, n_blocks: int) -> int:
    """Blocks whose parameters are freed after forward and gathered again for backward.

    ``default`` is the trainer's: every block but the last, whose backward comes at once.
    """
    return {"always": n_blocks, "never": 0}.get(policy, max(0, n_blocks - 1))


_C10D_NAMESPACES = ("c10d", "c10d_functional", "_c10d_functional")
_KINDS = (
    ("all_gather", "all-gather"),
    ("allgather", "all-gather"),
    ("reduce_scatter", "reduce-scatter"),
    ("all_reduce", "all-reduce"),
    ("allreduce", "all-reduce"),
)


_WHAT = {
    ("all-gather", "dp_shard"): "FSDP params",
    ("reduce-scatter", "dp_shard"): "FSDP grads",
    ("all-reduce", "dp_replicate"): "HSDP grads",
    ("all-gather", "tp"): "TP activations",
    ("reduce-scatter", "tp"): "TP activations",
    ("all-reduce", "tp"): "TP grads of inputs, norms",
}


class CollectiveCounter(TorchDispatchMode):
    """Count the collectives a region runs, by kind and mesh dimension, with their sizes.

    Every collective, FSDP2's (``c10d`` ops on a process group) and DTensor's (functional ops
    on a group name), passes the dispatcher, so this sees what the code really issues. The size
    of a call is that of the full tensor: the gathered output of an all-gather, the input of a
    reduce-scatter, the tensor of an all-reduce.
    """

    def __init__(self, dims: dict[str, tuple[str, int]]):
        super().__init__()
        self.dims = dims  # process group name -> (mesh dimension, its size)
        self.calls: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _C10D_NAMESPACES:
            self._record(func._opname, args)
        return func(*args, **(kwargs or {}))

    def _record(self, op: str, args: tuple) -> None:
        kind = next((k for fragment, k in _KINDS if fragment in op), None)
        if kind is None:  # waits, barriers, broadcasts of the set-up
            return
        dim, size = self._group(args)
        tensors = [a for a in _flatten(args) if isinstance(a, torch.Tensor)]
        if op.startswith("_allgather_base") or op.startswith("_reduce_scatter_base"):
            full = tensors[0] if op.startswith("_allgather") else tensors[1]
            n = full.numel() * full.dtype.itemsize
        else:
            n = sum(t.numel() * t.dtype.itemsize for t in tensors)
            if kind == "all-gather" and not op.endswith("_"):  # functional: input is one shard
                n *= size
        key = (kind, dim)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.bytes[key] = self.bytes.get(key, 0) + n

    def _group(self, args: tuple) -> tuple[str, int]:
        for a in _flatten(args):
            name = None
            if isinstance(a, str):
                name = a
            elif isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a):
                name = dist.ProcessGroup.unbox(a).group_name
            if name in self.dims:
                return self.dims[name]
        return "world", dist.get_world_size()


def _flatten(args) -> Iterator[Any]:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten(a)
        else:
            yield a


def _proxy_counts(
    config: Config, dist_info: DistInfo, mesh, n_layers: int, accum: int
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(calls, bytes) per optimizer step of the model cut to ``n_layers`` blocks, measured.

    A step is what the trainer runs: ``accum - 1`` micro-batches without gradient reduction,
    the last one with it, then the optimizer's update. Two measured micro-batches stand for
    all of them (the no-reduction ones are alike).
    """
    cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, n_layers=n_layers))
    dims = {}
    if mesh is not None:
        for i, dim in enumerate(mesh.mesh_dim_names):
            dims[mesh.get_group(dim).group_name] = (dim, mesh.size(i))
    model = sharded_meta_model(cfg, dist_info, mesh=mesh)
    calls: dict[tuple[str, str], int] = {}
    sizes: dict[tuple[str, str], int] = {}
    t = cfg.train
    with fake_tensors():
        materialize_fake(model).train()
        optimizer = build_optimizer(model, cfg, dist_info.device)
        ids = torch.zeros(t.micro_batch_size, cfg.data.seq_len, dtype=torch.long)
        for sync, repeats in ((False, accum - 1), (True, 1)):
            if repeats == 0:
                continue
            counter = CollectiveCounter(dims)
            with counter:
                set_gradient_sync(model, sync)
                model(ids, ids, reduction="sum").backward()
                if sync:
                    optimizer.step()
            for key, n in counter.calls.items():
                calls[key] = calls.get(key, 0) + repeats * n
                sizes[key] = sizes.get(key, 0) + repeats * counter.bytes[key]
    return calls, sizes


def _collectives(config: Config, dist_info: DistInfo, mesh, accum: int) -> list[CollectiveRow]:
    """The collectives of one optimizer step on rank 0 and the bytes it sends.

    Measured (:class:`CollectiveCounter`) on the model cut to one and to two blocks of the real
    width, micro batch and sequence, and extrapolated to ``n_layers``: each block beyond the
    first adds what the second one added. A ring all-gather or reduce-scatter over ``n`` ranks
    sends ``(n-1)/n`` of the full tensor, an all-reduce twice that. The trainer's three scalar
    all-reduces (tokens, loss, gradient norm) are added.
    """
    one = _proxy_counts(config, dist_info, mesh, 1, accum)
    two = _proxy_counts(config, dist_info, mesh, 2, accum)
    extra = config.model.n_layers - 1
    rows = []
    for key in sorted(set(one[0]) | set(two[0])):
        kind, dim = key
        calls = one[0].get(key, 0) + extra * (two[0].get(key, 0) - one[0].get(key, 0))
        total = one[1].get(key, 0) + extra * (two[1].get(key, 0) - one[1].get(key, 0))
        n = _dim_size(config, dist_info, dim)
        ring = (n - 1) / n * (2 if kind == "all-reduce" else 1)
        if calls > 0:
            name = f"{kind} ({_WHAT.get(key, 'other')})"
            rows.append(CollectiveRow(name, dim, calls, int(total / calls), int(total * ring)))
    world = dist_info.world_size
    rows.append(
        CollectiveRow(
            "all-reduce (tokens, loss, grad norm)",
            "world",
            3,
            8,
            int(3 * 8 * 2 * (world - 1) / world),
        )
    )
    return rows


def _dim_size(config: Config, dist_info: DistInfo, dim: str) -> int:
    if dim == "world":
        return dist_info.world_size
    shape = config.parallel.mesh_shape(dist_info.world_size)
    return dict(zip(MESH_DIMS, shape, strict=True))[dim]


def make_plan(
    config: Config,
    world_size: int,
    *,
    gpu_memory_gib: float = 80.0,
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    peak_flops: float = PEAK_BF16_FLOPS["H100"],
    mfu: float = DEFAULT_MFU,
    config_name: str = "",
) -> Plan:
    """The per-GPU memory, collectives and FLOPs of ``config`` on ``world_size`` GPUs."""
    t = config.train
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    mesh = dict(zip(MESH_DIMS, config.parallel.mesh_shape(world_size), strict=True))
    check_tensor_parallel(config.model, mesh["tp"], config.data.seq_len)
    data_ranks = mesh["dp_replicate"] * mesh["dp_shard"]
    per_pass = t.micro_batch_size * data_ranks
    if t.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x data-parallel ranks = {t.micro_batch_size} x {data_ranks}"
            f" = {per_pass}; the global batch must be a whole number of micro-batches per rank"
        )
    accum = t.global_batch_size // per_pass
    seq = config.data.seq_len
    if seq > config.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq} is longer than model.max_seq_len={config.model.max_seq_len}"
        )
    with fake_process_group(world_size) as dist_info:
        device_mesh = build_mesh(dist_info, config.parallel)  # one: DTensor caches by mesh
        model = sharded_meta_model(config, dist_info, mesh=device_mesh)
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = _flops_per_token(config)
        units = _fsdp_units(model)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        state_elements = optimizer_state_elements(optimizer)
        state_bytes = max(
            (s.dtype.itemsize for g in optimizer.param_groups for s in g["params"]), default=4
        )
        del optimizer, model
        collectives = _collectives(config, dist_info, device_mesh, accum)
    local = sum(units.blocks) + units.root
    compute_bytes = gpu_param_dtype(config).itemsize
    reduce_bytes = 4 if config.parallel.reduce_dtype == "fp32" else 2
    shape = _shape(config, mesh["tp"])
    tokens = t.micro_batch_size * seq
    blocks_act, loss_act = activation_bytes(
        shape, t.activation_checkpointing, tokens, compute_bytes
    )
    max_block = max(units.blocks, default=0) * mesh["dp_shard"]
    policy = config.parallel.reshard_after_forward
    kept_gathered = len(units.blocks) - _resharded_blocks(policy, len(units.blocks))
    fsdp_buffers = (
        2 * max_block * compute_bytes  # the block being computed and the one prefetched
        + max_block * (compute_bytes + (reduce_bytes if reduce_bytes != compute_bytes else 0))
        + max(0, kept_gathered - 1) * max_block * compute_bytes
        + units.root * mesh["dp_shard"] * compute_bytes  # the root is never resharded
    )
    memory = [
        MemoryRow("parameters", local * units.param_bytes, "sharded, fp32 master copy"),
        MemoryRow("gradients", local * units.param_bytes, "sharded, after reduce-scatter"),
        MemoryRow(
            "accumulated gradients",
            local * mesh["dp_shard"] * reduce_bytes if accum > 1 else 0,
            f"unsharded {config.parallel.reduce_dtype} until the last of {accum} micro-batches",
        ),
        MemoryRow("optimizer states", state_elements * state_bytes, _optimizer_note(config)),
        MemoryRow(
            "FSDP buffers",
            int(fsdp_buffers),
            f"gathered {_dtype_name(gpu_param_dtype(config))} blocks and root, one block's grads",
        ),
        MemoryRow(
            "activations (blocks)",
            blocks_act,
            f"micro batch {t.micro_batch_size} x {seq}, checkpointing {t.activation_checkpointing}",
        ),
        MemoryRow("activations (loss)", loss_act, "embedding, final norm, fused cross-entropy"),
        MemoryRow("runtime reserve", int(reserve_gib * GIB), "CUDA context, NCCL, fragmentation"),
    ]
    total = sum(r.bytes for r in memory)
    gpu_bytes = int(gpu_memory_gib * GIB)
    per_step = flops_per_token * t.global_batch_size * seq
    per_gpu = per_step / world_size
    recompute = _recompute_flops_per_token(config, t.activation_checkpointing)
    hardware = per_gpu + recompute * t.global_batch_size * seq / world_size
    step_time = per_gpu / (peak_flops * mfu)
    return Plan(
        config=config_name,
        world_size=world_size,
        mesh=mesh,
        micro_batch_size=t.micro_batch_size,
        grad_accum=accum,
        seq_len=seq,
        activation_checkpointing=t.activation_checkpointing,
        optimizer=config.optimizer.name,
        n_params=n_params,
        local_params=local,
        memory=memory,
        total_bytes=total,
        gpu_memory_bytes=gpu_bytes,
        fits=total <= gpu_bytes,
        headroom_bytes=gpu_bytes - total,
        collectives=collectives,
        model_flops_per_token=flops_per_token,
        flops_per_step=per_step,
        flops_per_gpu_step=per_gpu,
        hardware_flops_per_gpu_step=hardware,
        assumed_peak_flops=peak_flops,
        assumed_mfu=mfu,
        step_time_s=step_time,
        gpu_hours=step_time * t.steps * world_size / 3600,
    )


def _optimizer_note(config: Config) -> str:
    if config.optimizer.name == "muon":
        return "muon: 1 momentum per hidden-matrix element, 2 AdamW states for the rest"
    return f"{config.optimizer.name}: 2 states (first and second moment) per element"


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def _flops_per_token(config: Config) -> float:
    """The model's training FLOPs per token (:meth:`Transformer.flops_per_token`), on meta."""
    with torch.device("meta"):
        return Transformer(config.model).flops_per_token(config.data.seq_len)


def _recompute_flops_per_token(config: Config, mode: str) -> float:
    """Extra FLOPs per token of checkpointing: full reruns every block's forward (a third of
    its 6N + 12 L d T); selective reruns only elementwise ops, counted as none."""
    if mode != "full":
        return 0.0
    m = config.model
    block = (
        2 * m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim  # q, k, v
        + m.n_heads * m.head_dim * m.d_model  # o
        + 3 * m.d_model * m.ffn_dim  # gate, up, down
    )
    return m.n_layers * (2 * block + 4 * m.d_model * config.data.seq_len)


# --------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_plan(plan: Plan) -> str:
    """The plan as plain text: the setup, the memory table, the collectives, the FLOPs."""
    m = plan.mesh
    head = plan.config or "config"
    lines = [
        f"plan: {head} on {plan.world_size} GPUs of {_gib(plan.gpu_memory_bytes)}",
        f"  mesh dp_replicate={m['dp_replicate']} x dp_shard={m['dp_shard']} x tp={m['tp']};"
        f" micro batch {plan.micro_batch_size} x {plan.seq_len} tokens, {plan.grad_accum}"
        f" micro-batches per step; checkpointing {plan.activation_checkpointing};"
        f" optimizer {plan.optimizer}",
        f"  parameters {_count(plan.n_params)} in all, {_count(plan.local_params)} on rank 0",
        "",
        f"  {'memory per GPU':<24}{'':>12}  note",
    ]
    for r in plan.memory:
        lines.append(f"  {r.name:<24}{_gib(r.bytes):>12}  {r.note}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  {'total':<24}{_gib(plan.total_bytes):>12}  {verdict} in {_gib(plan.gpu_memory_bytes)}"
        f" (headroom {_gib(plan.headroom_bytes)})",
        "",
        f"  {'collectives per step':<40}{'group':<14}{'calls':>7}{'size':>12}{'sent/rank':>12}",
    ]
    for c in plan.collectives:
        lines.append(
            f"  {c.name:<40}{c.group:<14}{c.calls:>7}{human_bytes(c.bytes_per_call):>12}"
            f"{human_bytes(c.traffic):>12}"
        )
    total_traffic = sum(c.traffic for c in plan.collectives)
    lines += [
        f"  {'total sent per rank per step':<73}{human_bytes(total_traffic):>12}",
        "",
        f"  model FLOPs per token   {plan.model_flops_per_token:.3e}",
        f"  FLOPs per step          {plan.flops_per_step:.3e}"
        f" ({plan.flops_per_gpu_step:.3e} per GPU,"
        f" {plan.hardware_flops_per_gpu_step:.3e} with recomputation)",
        f"  step time               {plan.step_time_s:.2f} s at {plan.assumed_mfu:.0%} MFU of"
        f" {plan.assumed_peak_flops / 1e12:.0f} TFLOP/s; {plan.gpu_hours:,.0f} GPU-hours for"
        " train.steps",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML config file (default: built-ins)")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs (ranks)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (80)")
    parser.add_argument(
        "--reserve",
        type=float,
        default=DEFAULT_RESERVE_GIB,
        help=f"GiB per GPU set aside for CUDA, NCCL and fragmentation ({DEFAULT_RESERVE_GIB:g})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_BF16_FLOPS["H100"] / 1e12,
        help="peak bf16 TFLOP/s per GPU for the step time (H100: 989)",
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help="assumed model FLOPs utilization (0.4)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.epilog = config_help()


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, parse_overrides(list(args.overrides or [])))
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    for name in ("gpu_memory", "peak_tflops"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    plan = make_plan(
        config,
        args.world_size,
        gpu_memory_gib=args.gpu_memory,
        reserve_gib=args.reserve,
        peak_flops=args.peak_tflops * 1e12,
        mfu=args.mfu,
        config_name=Path(args.config).stem if args.config else "",
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


# --------------------------------------------------------------------------- the dry run


def materialize_fake(model: nn.Module) -> nn.Module:
    """Give a meta-device model fake storage (call inside :func:`fake_tensors`), ties kept.

    ``to_empty`` replaces each module's parameters one module at a time, which would part a
    weight two modules share (tied embeddings); the tie is made again afterwards.
    """
    groups = tied_groups(model)
    model.to_empty(device="cpu")
    retie(model, groups)
    return model


def tensor_bytes(tensors) -> int:
    """Bytes this rank stores for ``tensors`` (local shards of DTensors)."""
    return sum(local_numel(t) * t.dtype.itemsize for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer keeps per parameter, as created by a step (the step
    counters, scalars, are left out)."""
    return tensor_bytes(
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
