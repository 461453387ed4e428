"""Distributed setup and the one function that turns a plain model into a trainable one.

The model in :mod:`pretrain.model` is single-device PyTorch. Everything about scale is applied
from outside, here, in a fixed order (activation checkpointing, then torch.compile, then FSDP2),
so that each piece wraps the one before it:

- activation checkpointing per transformer block: ``full`` recomputes the whole block in the
  backward pass; ``selective`` keeps the outputs of the matrix multiplications and attention and
  recomputes only the cheap elementwise ops (norms, RoPE, SwiGLU);
- ``torch.compile`` per block (``nn.Module.compile``, so parameter names stay clean);
- FSDP2 (``fully_shard``) per block and at the root when the world has more than one rank, or
  whenever the device is CUDA, with bf16 parameters and fp32 gradient reduction when asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache, partial

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain import devices
from pretrain.errors import UserError


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


def _selective_policy(ctx, op, *args, **kwargs):
    """Keep matmul and attention outputs for the backward pass; recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


@lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )  # fmt: skip
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


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


def parallelize(
    model: nn.Module,
    dist_info: DistInfo,
    *,
    param_dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
    compile: bool = False,
) -> nn.Module:
    """Apply activation checkpointing, torch.compile and FSDP2 to ``model``, in place.

    FSDP2 shards each block and the root over all ranks when the world is larger than one, and
    also on a single GPU, where it is how bf16 parameters with fp32 gradient reduction are
    applied. A single CPU process keeps the plain module (``param_dtype`` then goes to autocast
    in the trainer).
    """
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers:
            block.compile()
    if dist_info.distributed or dist_info.device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for i, block in enumerate(model.layers):
            # The last block's parameters are needed again at once by the backward pass.
            last = i == len(model.layers) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not last)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 was applied (parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


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
