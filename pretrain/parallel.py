"""Distributed setup and the one function that turns a plain model into a trainable one.

The model in :mod:`pretrain.model` is single-device PyTorch. Everything about scale is applied
from outside, here, with PyTorch's own engine (``DeviceMesh``, DTensor tensor parallel, FSDP2),
in a fixed order, so that each piece wraps the one before it:

- the device mesh (:func:`build_mesh`): ``parallel.dp_replicate`` x ``parallel.dp_shard`` x
  ``parallel.tp`` ranks, dims named ``dp_replicate``, ``dp_shard`` and ``tp``; rank ``r`` is
  data-parallel rank ``r // tp`` (:func:`data_parallel_rank`), and the ``tp`` ranks of one group
  read the same rows;
- tensor parallel (:func:`apply_tensor_parallel`) over ``tp``: Megatron's column splits of q/k/v
  and gate/up and row splits of o and down, so attention runs on each rank's own heads and
  SwiGLU on its own columns, as plain local tensors; between the blocks the residual stream is
  split along the sequence (sequence parallel), so the norms run on local rows (``kernels``'
  RMSNorm takes the DTensors the norms get and computes on their local shards). The embedding
  is split by vocabulary rows (its output reduce-scattered to sequence shards); the head stays
  whole on every ``tp`` rank and the final hidden states are gathered for it, so the fused
  linear cross-entropy sees plain tensors (gathered hidden states rather than loss parallel);
- activation checkpointing per transformer block: ``full`` recomputes the whole block in the
  backward pass; ``selective`` keeps the outputs of the matrix multiplications and of attention
  (aten's SDPA and our own ``kernels::flash_attention*`` custom ops) and recomputes only the
  cheap elementwise ops (norms, RoPE, SwiGLU). Under tensor parallel it keeps the
  reduce-scattered outputs of o and down rather than their whole-sequence partial sums (so no
  reduce-scatter is rerun, and o's product is), and reruns the two all-gathers into q/k/v and
  gate/up: keeping their outputs would cost more memory than they save traffic
  (:func:`_saved_ops` has the numbers);
- ``torch.compile`` per block (``nn.Module.compile``, so parameter names stay clean);
- FSDP2 (``fully_shard``) per block and at the root over the data-parallel dims when the world
  has more than one rank, or whenever the device is CUDA: a 1-D ``dp_shard`` mesh, or the 2-D
  ``(dp_replicate, dp_shard)`` mesh (HSDP: sharded within a group, replicated across groups).
  ``parallel.reshard_after_forward`` and ``parallel.reduce_dtype`` are its policy knobs.

:func:`parallelize` never reads or writes a parameter's values and runs no collective on them
(``src_data_rank=None``: each rank keeps its own slice), so it works on a meta-device model and
under a fake process group. :func:`clip_grad_norm` is the gradient norm over the whole mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

import kernels.attention  # noqa: F401  (registers the kernels:: attention ops SAC keeps)
import kernels.attention_hopper  # noqa: F401
from pretrain import devices
from pretrain.config import ConfigError, ModelConfig, ParallelConfig
from pretrain.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DistInfo:
    """Where this process sits: its global and local rank, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> str:
    """The device type ``train.device`` names: training runs on a whole device type, no index."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return devices.resolve_device(name, option="train.device").type


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (NCCL on GPU, gloo on CPU).

    Without torchrun (no ``WORLD_SIZE`` in the environment) this is a world of one: on a CPU no
    process group is created; on a GPU an in-process one (``HashStore``), which FSDP2 needs.
    Neither needs a rendezvous.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # A GPU gets a process group even alone: FSDP2 applies mixed precision there too.
    if (world_size > 1 or device_type == "cuda") and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs: dict = {"device_id": device} if device_type == "cuda" else {}
        if "MASTER_ADDR" not in os.environ:  # a single process without torchrun
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        if os.environ.get(DIST_TIMEOUT_ENV):  # python -m pretrain.launch --dist-timeout
            kwargs["timeout"] = dist_timeout(os.environ[DIST_TIMEOUT_ENV])
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


DIST_TIMEOUT_ENV = "PRETRAIN_DIST_TIMEOUT"


def dist_timeout(value: str) -> timedelta:
    """The collectives' timeout from ``PRETRAIN_DIST_TIMEOUT`` (seconds); torch's own default
    (10 minutes for NCCL) is too short for a slow checkpoint save on some ranks."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(
            f"{DIST_TIMEOUT_ENV} (--dist-timeout) must be a positive number of seconds, "
            f"got {value!r}"
        )
    return timedelta(seconds=seconds)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the mesh


def check_tensor_parallel(model: ModelConfig, tp: int, seq_len: int | None = None) -> None:
    """Refuse, in one line with the numbers, a model that ``tp`` ranks cannot split evenly.

    Each rank holds whole heads (query and key/value), a slice of the MLP's columns and, between
    the blocks, an equal slice of the sequence.
    """
    if tp == 1:
        return
    for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads),
                        ("ffn_dim", model.ffn_dim)):  # fmt: skip
        if value % tp:
            raise ConfigError(
                f"model.{name}={value} is not divisible by parallel.tp={tp}: tensor parallel "
                f"gives every rank whole heads and equal slices; choose a tp that divides it"
            )
    if seq_len is not None and seq_len % tp:
        raise ConfigError(
            f"data.seq_len={seq_len} is not divisible by parallel.tp={tp}: sequence parallel "
            "gives every rank an equal slice of the sequence"
        )


def mesh_shape(dist_info: DistInfo, parallel_cfg: ParallelConfig) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for this world; a wrong product is one line."""
    return parallel_cfg.mesh_shape(dist_info.world_size)


def data_parallel_rank(dist_info: DistInfo, parallel_cfg: ParallelConfig) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): whose rows of the global batch a rank reads.

    The mesh is laid out row-major over (dp_replicate, dp_shard, tp), so the ``tp`` consecutive
    ranks of a tensor-parallel group share one data-parallel rank.
    """
    replicate, shard, tp = mesh_shape(dist_info, parallel_cfg)
    return dist_info.rank // tp, replicate * shard


def build_mesh(dist_info: DistInfo, parallel_cfg: ParallelConfig) -> DeviceMesh | None:
    """The 3-D device mesh (dims :data:`MESH_DIMS`), or None for a single CPU process.

    A single GPU gets a mesh of one, for FSDP2's mixed precision. Building the mesh creates the
    process groups of its dims (no collective on data), so a fake backend serves as well.
    """
    shape = mesh_shape(dist_info, parallel_cfg)
    if not (dist_info.distributed or dist_info.device.type == "cuda"):
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist_info.device.type, shape, mesh_dim_names=MESH_DIMS)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


# --------------------------------------------------------------------------- tensor parallel


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallel with sequence-parallel norms, in place (see the module doc).

    Activations between the blocks are (B, T / tp, d) local tensors; inside a block the norm's
    output is all-gathered along the sequence once for attention and once for the MLP, and the
    column-split products take that gathered input as one replicated DTensor. Their outputs are
    each rank's heads (or MLP columns) as plain tensors; the row-split products reduce-scatter
    back to sequence shards. In the backward pass the input gradients of q/k/v (and of gate/up)
    are partial sums of one DTensor that add up before they are reduced, so each module's input
    gradient is one reduce-scatter, not one all-reduce per product: a plain tensor input would
    be re-wrapped by each product on its own and all-reduced by each.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = partial(parallelize_module, device_mesh=tp_mesh, src_data_rank=None)
    tied = model.lm_head.weight is model.embed_tokens.weight
    if tied:  # one weight for both: keep it whole, and split the embedding's output instead
        tp(model.embed_tokens, parallelize_plan=PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1)))  # fmt: skip
    else:
        tp(model.embed_tokens, parallelize_plan=RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1)))  # fmt: skip
    for block in model.layers:
        n_attn_args = 5  # x, cos, sin, doc_ids, cache: only x is split
        tp(block, parallelize_plan={
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_layouts=(Shard(1),) + (None,) * (n_attn_args - 1),
                desired_input_layouts=(Replicate(),) + (None,) * (n_attn_args - 1),
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
            ),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })  # fmt: skip
    # The final norm on sequence shards; its output gathered whole for the (unsplit) head.
    tp(model.norm, parallelize_plan=SequenceParallel())
    tp(model.norm, parallelize_plan=PrepareModuleOutput(
        output_layouts=Shard(1), desired_output_layouts=Replicate()))  # fmt: skip


# --------------------------------------------------------------------------- checkpointing


def _selective_policy(ctx, op, *args, **kwargs):
    """Keep what the backward needs and is costly to redo: matmul and attention outputs, and
    tensor parallel's reduce-scattered block outputs; recompute everything else.

    A row-parallel product's output (a ``Partial`` DTensor: o and down under tensor parallel) is
    the one matmul not kept: its only consumer is the reduce-scatter whose (t times smaller)
    output is kept instead, so its full-sequence partial sums never stay in memory and its
    reduce-scatter is never rerun. The all-gathers into the column-parallel products are rerun
    (see :func:`_saved_ops`)."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _saved_ops() and not _is_partial_sum(ctx, op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _is_partial_sum(ctx, op, args: tuple) -> bool:
    """Whether an op's output is a DTensor of unreduced partial sums. Read from the output where
    the context carries it; a PyTorch whose context has no ``op_output`` asks the policy before
    running the op, and there a matmul's output is partial when both operands are split along
    the contracted dimension."""
    from torch.distributed.tensor import DTensor, Shard

    out = getattr(ctx, "op_output", None)
    if out is not None:
        return isinstance(out, DTensor) and any(p.is_partial() for p in out.placements)
    if op not in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        return False
    a, b = args[0], args[1]
    if not (isinstance(a, DTensor) and isinstance(b, DTensor)):
        return False
    contracted = (Shard(a.ndim - 1), Shard(b.ndim - 2))
    return any((pa, pb) == contracted for pa, pb in zip(a.placements, b.placements, strict=True))


@lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls, aten's SDPA variants, the
    attention forwards of ``kernels`` (custom ops, so the policy sees them like aten ops) and
    the functional reduce-scatter tensor parallel sends each attention's and MLP's output
    through (as torchtitan does).

    The all-gathers into q/k/v and gate/up are not kept: each output is a whole-sequence
    activation (``d`` per token, ``t`` times the norm output it gathers), which would more
    than double what a block keeps (llama-8b, tp 8, sequence 8192: 97 -> 231 MB a block, vs
    260 MB for no checkpointing) to save two of its six all-gathers per micro-batch. Their
    ``wait_tensor`` stays a recomputed op: it waits on the rerun all-gather, and on a kept
    reduce-scatter output (whose collective ran in the forward) it is a no-op."""
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )  # fmt: skip
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    ours = ("flash_attention_forward", "flash_attention_hopper_forward")
    ops |= {getattr(torch.ops.kernels, n).default for n in ours if hasattr(torch.ops.kernels, n)}
    ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return frozenset(ops)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each transformer block so that its activations are recomputed in the backward pass."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise UserError(
            f"train.activation_checkpointing must be none, full or selective, got {mode!r}"
        )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {"preserve_rng_state": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, **kwargs)


# --------------------------------------------------------------------------- FSDP2


def _reshard_after_forward(policy: str, last: bool) -> bool:
    """``default``: every block but the last (whose parameters the backward needs at once)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    return not last


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    parallel_cfg: ParallelConfig,
    param_dtype: torch.dtype,
) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head), over ``dp_mesh``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reduce_dtype = REDUCE_DTYPES[parallel_cfg.reduce_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    policy = parallel_cfg.reshard_after_forward
    for i, block in enumerate(model.layers):
        reshard = _reshard_after_forward(policy, last=i == len(model.layers) - 1)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    root_reshard = {"always": True, "never": False}.get(policy)  # default: FSDP2's own (keep)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=root_reshard)


def parallelize(
    model: nn.Module,
    dist_info: DistInfo,
    parallel_cfg: ParallelConfig | None = None,
    *,
    param_dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
    compile: bool = False,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Apply tensor parallel, activation checkpointing, torch.compile and FSDP2, in place.

    ``mesh`` is :func:`build_mesh`'s (built here when not given). FSDP2 shards each block and the
    root over the data-parallel dims when the world is larger than one, and also on a single GPU,
    where it is how bf16 parameters with fp32 gradient reduction are applied. A single CPU
    process keeps the plain module (``param_dtype`` then goes to autocast in the trainer).
    Parameter values are never read, so ``model`` may live on the meta device.
    """
    parallel_cfg = parallel_cfg or ParallelConfig()
    _, _, tp = mesh_shape(dist_info, parallel_cfg)
    check_tensor_parallel(model.config, tp)
    if mesh is None:
        mesh = build_mesh(dist_info, parallel_cfg)
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers:
            block.compile()
    if mesh is not None:
        apply_fsdp(model, data_parallel_mesh(mesh), parallel_cfg, param_dtype)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether FSDP2 reduces gradients after this backward (off: they accumulate unsharded)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 was applied (parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# --------------------------------------------------------------------------- gradient norm


def _sum_placements(placements) -> list:
    """How a per-rank sum of squares combines over each mesh dim: summed where the tensor is
    split, taken once where it is replicated."""
    from torch.distributed.tensor import Partial, Replicate

    out = []
    for p in placements:
        if p.is_partial():
            raise RuntimeError(f"a gradient is still a partial sum ({placements}); reduce it first")
        out.append(Replicate() if p.is_replicate() else Partial())  # Shard, _StridedShard
    return out


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to ``max_norm`` (0: no clipping); return their norm over the whole mesh.

    Gradients may be DTensors on different meshes and placements (FSDP2 shards, tensor-parallel
    splits, HSDP replicas, a head kept whole across ``tp``): each (mesh, placements) group sums
    its local squares and reduces them once over the dims that split it, so every element of
    the model counts exactly once. Clipping multiplies the local shards by
    ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    for key, members in groups.items():
        squares = sum(_local(g).float().square().sum() for g in members)
        if key is not None:
            mesh, placements = members[0].device_mesh, members[0].placements
            squares = DTensor.from_local(
                squares.reshape(()), mesh, _sum_placements(placements), run_check=False
            ).full_tensor()
        total = total + squares
    norm = float(total.sqrt())
    if max_norm > 0 and math.isfinite(norm):
        coefficient = min(1.0, max_norm / (norm + 1e-6))
        if coefficient < 1.0:
            torch._foreach_mul_([_local(g) for g in grads], coefficient)
    return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (identity in a world of one)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
