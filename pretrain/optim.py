"""The optimizer, its parameter groups and the learning-rate schedule of a training run.

``optimizer.name`` picks the optimizer: ``adamw`` (the project's fused kernel on CUDA, PyTorch's
AdamW elsewhere), ``torch`` (PyTorch's AdamW always) or ``muon`` (:class:`kernels.Muon`). The
parameter groups are, in this order (a checkpoint's optimizer state follows it):

- ``adamw`` / ``torch``: decayed matrices, then undecayed norms, other 1-D parameters and
  embeddings;
- ``muon``: the hidden matrices (every 2-D parameter but the embedding and the output head) in a
  Muon group, then the AdamW groups: the head decayed, norms, 1-D parameters and embeddings not.

One schedule drives every group: :func:`lr_at` gives the AdamW learning rate of a step
(``train.lr`` at its peak), and each group runs at that times its ``lr_scale`` (Muon's group:
``optimizer.muon_lr / train.lr``; AdamW groups carry no scale), so Muon's and AdamW's rates warm
up and decay together.

Build the optimizer after :func:`pretrain.parallel.parallelize`: under FSDP2 its parameters are
the sharded DTensors, and Muon orthogonalizes whole matrices from their row shards itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import kernels
from pretrain.config import Config, TrainConfig

MUON_GROUP_KEYS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule.

    ``cosine`` and ``linear`` decay from ``lr`` to ``lr * min_lr_ratio`` at the last step;
    ``wsd`` (warmup-stable-decay) holds ``lr`` and decays linearly over the final
    ``decay_fraction`` of the steps; ``constant`` holds it.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return peak + (floor - peak) * progress
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Put every group at the schedule's ``lr`` times the group's own ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _is_head_or_embedding(name: str) -> bool:
    return "embed_tokens" in name or "lm_head" in name


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on matrices, none on norms, other 1-D parameters and embeddings."""
    decay, no_decay = [], []
    for name, p in _trainable(model):
        if p.dim() < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_param_groups(model: torch.nn.Module, config: Config) -> list[dict]:
    """Muon for the hidden matrices, then the two AdamW groups of :func:`param_groups` over the
    rest (the head decayed; embeddings, norms and 1-D parameters not)."""
    hidden = [p for n, p in _trainable(model) if p.dim() == 2 and not _is_head_or_embedding(n)]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in _trainable(model) if id(p) not in hidden_ids]
    decay = [p for n, p in rest if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in rest if p.dim() < 2 or "embed_tokens" in n]
    settings = group_settings(config)
    return [
        {"params": params, **s}
        for params, s in zip((hidden, decay, no_decay), settings, strict=True)
    ]


def group_settings(config: Config) -> list[dict[str, Any]]:
    """The hyperparameters of each parameter group, in group order, as the config gives them."""
    opt = config.optimizer
    adamw = {"betas": (opt.beta1, opt.beta2), "eps": opt.eps}
    adamw_groups = [{"weight_decay": opt.weight_decay, **adamw}, {"weight_decay": 0.0, **adamw}]
    if opt.name != "muon":
        return adamw_groups
    muon = {
        "use_muon": True,
        "weight_decay": opt.weight_decay,
        "lr_scale": opt.muon_lr / config.train.lr,
        "momentum": opt.muon_momentum,
        "nesterov": opt.muon_nesterov,
        "ns_steps": opt.muon_ns_steps,
        "adjust_lr_fn": opt.muon_adjust_lr,
    }
    return [muon, *({"use_muon": False, **g} for g in adamw_groups)]


def build_optimizer(
    model: torch.nn.Module, config: Config, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``optimizer.name`` asks for, over the groups of this module's docstring."""
    opt = config.optimizer
    if opt.name == "muon":
        return kernels.Muon(
            muon_param_groups(model, config),
            lr=opt.muon_lr,
            weight_decay=opt.weight_decay,
            momentum=opt.muon_momentum,
            nesterov=opt.muon_nesterov,
            ns_steps=opt.muon_ns_steps,
            adjust_lr_fn=opt.muon_adjust_lr,
            betas=(opt.beta1, opt.beta2),
            adamw_eps=opt.eps,
            adamw_lr=config.train.lr,
        )
    groups = param_groups(model, opt.weight_decay)
    kwargs: dict[str, Any] = dict(lr=config.train.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if opt.name == "adamw" and device.type == "cuda":
        kernel_adamw = getattr(kernels, "AdamW", None)
        if kernel_adamw is not None:
            return kernel_adamw(groups, **kwargs)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, config: Config) -> None:
    """Make the optimizer follow the config (after a resume restored the old param groups)."""
    for group, settings in zip(optimizer.param_groups, group_settings(config)):
        group.update(settings)


# --------------------------------------------------------------------------- update size


def group_kind(group: dict[str, Any]) -> str:
    """``muon`` or ``adamw``: the name a group's update RMS is logged under."""
    return "muon" if group.get("use_muon") else "adamw"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot_params(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """A copy of this rank's part of every parameter, group by group, to measure a step by."""
    return [[_local(p).detach().clone() for p in g["params"]] for g in optimizer.param_groups]


def update_rms(
    optimizer: torch.optim.Optimizer,
    before: list[list[torch.Tensor]],
    reduce: Callable[[list[float]], list[float]] = lambda values: values,
) -> dict[str, float]:
    """Root mean square of the change since ``before``, per group kind; ``reduce`` sums the
    squared changes and element counts over the ranks (each holds its shards only).

    Muon's updates have a set RMS by design while AdamW's follow the gradients, so this is the
    number that shows what each optimizer did to the weights.
    """
    kinds = sorted({group_kind(g) for g in optimizer.param_groups})
    sums = {k: [0.0, 0.0] for k in kinds}
    for group, old in zip(optimizer.param_groups, before):
        acc = sums[group_kind(group)]
        for p, q in zip(group["params"], old):
            acc[0] += float((_local(p).detach().float() - q.float()).square().sum())
            acc[1] += q.numel()
    flat = reduce([v for k in kinds for v in sums[k]])
    return {
        f"update_rms/{k}": math.sqrt(flat[2 * i] / flat[2 * i + 1]) if flat[2 * i + 1] else 0.0
        for i, k in enumerate(kinds)
    }
