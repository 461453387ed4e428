"""Initial weights for a model built on the meta device: each rank fills only its own shards.

A run builds :class:`pretrain.model.Transformer` on ``torch.device("meta")`` (no memory, no
values), lets :func:`pretrain.parallel.parallelize` shard it, and then calls
:func:`materialize`: the parameters get storage on the target device (``to_empty``) and every
rank writes the values of the slice it holds. Peak host memory is the rank's shard plus one
noise block, not the whole model.

The values do not depend on the world size or the mesh. The init rule (which parameter gets
which distribution) is the model's (:meth:`Transformer.param_init`), and its noise comes in
blocks of whole rows, each from a generator seeded by (seed, parameter name, block index)
(:func:`pretrain.model.init_block`). A rank generates the blocks that its rows fall in and keeps
its rows and columns of them, so 1 process, FSDP, HSDP and tensor-parallel meshes start from
bitwise the same weights. (Drawing from one generator per rank, as ``DTensor`` random ops on
the CPU do, gives every rank the same numbers instead: pytorch/pytorch#138329.)

:func:`copy_into_local` is the same mechanism for weights read from files: it asks a reader for
the rows and columns a rank holds, so loading an export reads only the local shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from pretrain.model import ParamInit, Transformer, init_block, init_block_rows

# Module names that activation checkpointing, torch.compile and FSDP insert into parameter
# names; the canonical name (the one the init seeds and state dicts use) has none of them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

# One read of rows from a file holds at most about this many values.
_READ_ELEMENTS = 1 << 24

RowReader = Callable[[slice, slice | None], torch.Tensor]


def canonical_name(name: str) -> str:
    """``name`` without the wrapper modules that parallelizing adds (e.g.
    ``layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj.weight``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters under their canonical names, each shared one once."""
    for name, p in model.named_parameters():
        yield canonical_name(name), p


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process stores (the whole tensor when it is not a DTensor)."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param.data


def local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """For each dimension of ``param``, the global indices this process's local tensor covers.

    The indices come from splitting an ``arange`` with the DTensor's own placements
    (``distribute_tensor`` with ``src_data_rank=None`` only splits, it sends nothing), so every
    placement DTensor has, ``Shard``, the strided shard of FSDP over tensor parallel, uneven
    sizes, gives exactly the rows and columns of ``to_local()``.
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(param, DTensor):
        return [torch.arange(n) for n in param.shape]
    indices = []
    for dim, size in enumerate(param.shape):
        # Shard and _StridedShard have a ``dim`` (the latter is no Shard subclass in torch 2.13).
        placements = [
            _on_dim_zero(p) if getattr(p, "dim", None) == dim else Replicate()
            for p in param.placements
        ]
        index = torch.arange(size, device=param.device_mesh.device_type)
        local = distribute_tensor(index, param.device_mesh, placements, src_data_rank=None)
        indices.append(local.to_local().cpu())
    return indices


def _on_dim_zero(placement):
    """The same shard placement of a 1-D tensor (its ``dim`` 0), strided ones included."""
    from torch.distributed.tensor import Shard

    split_factor = getattr(placement, "split_factor", None)
    if split_factor is None:
        return Shard(0)
    return type(placement)(0, split_factor=split_factor)


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """``index`` cut into runs of consecutive values: (position in index, first value, length)."""
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, index.numel()]
    return [(a, int(index[a]), b - a) for a, b in zip(starts, ends)]


@torch.no_grad()
def init_parameter(
    model: Transformer, name: str, param: torch.Tensor, seed: int, rule: ParamInit | None = None
) -> None:
    """Write this process's slice of parameter ``name``'s initial values, by ``rule`` (None:
    the model's)."""
    init = model.param_init(name, param) if rule is None else rule
    local = local_tensor(param)
    if init.is_constant:
        local.fill_(init.fill)
        return
    if local.numel() == 0:
        return
    rows_index, *rest = local_indices(param)
    cols = _flat_columns(param.shape, rest)
    local_rows = local.view(local.shape[0], -1)
    per_block = init_block_rows(param.shape)
    blocks = rows_index // per_block
    order = torch.argsort(blocks, stable=True)  # local rows grouped by the block they fall in
    ids, counts = torch.unique_consecutive(blocks[order], return_counts=True)
    for block, where in zip(ids.tolist(), order.split(counts.tolist())):
        values = init_block(init, seed, name, param.shape, block)
        values = values[rows_index[where] - block * per_block]
        if cols is not None:
            values = values[:, cols]
        local_rows.index_copy_(0, where.to(local.device), values.to(local.device, local.dtype))


def _flat_columns(shape: torch.Size, rest: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat indices of a row's values that the local tensor keeps (None: all of them)."""
    if all(index.numel() == n for index, n in zip(rest, shape[1:])):
        return None
    if len(rest) != 1:
        raise NotImplementedError(
            f"a parameter of {len(shape)} dimensions sharded beyond its first is not supported"
        )
    return rest[0]


@torch.no_grad()
def copy_into_local(param: torch.Tensor, read: RowReader) -> None:
    """Fill this process's slice of ``param`` from ``read(rows, cols)``, which returns the
    global tensor's ``[rows, cols]`` (``rows`` a slice of the first dimension, ``cols`` one of
    the second, None for a 1-D tensor). Only the local rows and columns are read, at most about
    16M values at a time."""
    if param.dim() > 2:
        raise NotImplementedError("copy_into_local reads 1-D and 2-D parameters")
    local = local_tensor(param)
    if local.numel() == 0:
        return
    indices = local_indices(param)
    cols = [None] if param.dim() == 1 else [slice(c, c + n) for _, c, n in _runs(indices[1])]
    step = max(1, _READ_ELEMENTS // (local.numel() // local.shape[0]))
    for at, first, length in _runs(indices[0]):
        for offset in range(0, length, step):
            n = min(step, length - offset)
            rows = slice(first + offset, first + offset + n)
            values = torch.cat([read(rows, c) for c in cols], dim=-1)
            local[at + offset : at + offset + n].copy_(values)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of each parameter registered under more than one name (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Register the first name's parameter under the others again (``to_empty`` may give each
    name its own new tensor)."""
    for first, *others in groups:
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if module._parameters[attr] is not shared:
                module._parameters[attr] = shared


def param_rule(model: Transformer, name: str, param: torch.Tensor) -> ParamInit:
    """The init rule of parameter ``name`` (as ``named_parameters`` spells it): that of the
    innermost module on its path with a ``param_init`` that answers for it (a module added from
    outside the architecture, such as a LoRA adapter, knows its own), else the model's."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if hasattr(module, "param_init"):
            rule = module.param_init(canonical_name(".".join(parts[depth:])), param)
            if rule is not None:
                return rule
    return model.param_init(canonical_name(name), param)


@torch.no_grad()
def init_parameters(model: Transformer, seed: int) -> None:
    """Every parameter's local slice by its init rule, its noise from ``seed``."""
    for name, param in model.named_parameters():
        init_parameter(model, canonical_name(name), param, seed, param_rule(model, name, param))


def materialize(model: Transformer, device: torch.device | str, seed: int) -> Transformer:
    """Give a meta-device model (sharded or not) storage on ``device`` and its initial weights:
    those of ``Transformer(cfg, init_seed=seed)`` on one process, whatever the sharding."""
    groups = tied_groups(model)
    model.to_empty(device=device)
    retie(model, groups)
    init_parameters(model, seed)
    return model
