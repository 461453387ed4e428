"""LoRA: low-rank adapters on the projections of the one model, applied from outside it.

``finetune.lora.rank`` > 0 replaces each target ``nn.Linear`` of every block (``q_proj`` ...
``down_proj``, ``finetune.lora.targets``) by a :class:`LoRALinear`: the layer's weight (and bias)
frozen, plus ``lora_B @ lora_A`` scaled by ``alpha / rank`` with dropout on the adapter's input.
``lora_A`` starts Kaiming-uniform and ``lora_B`` at zero, so the adapted model starts equal to
its base. Every other parameter (embeddings, norms, head) is frozen too; the optimizer steps
only what requires a gradient, and :func:`pretrain.parallel.parallelize` shards the frozen and
trainable parameters of a block in one FSDP2 unit as it does any other.

The model file stays the architecture: the wrapper keeps the base weight's name
(``layers.0.self_attn.q_proj.weight``), so the base loads into the adapted model by name, and
the adapters add ``...q_proj.lora_A.weight`` / ``lora_B.weight``, PEFT's names without its
``base_model.model.model.`` prefix. A checkpoint holds only the adapters and a pointer to the
base (:data:`pretrain.checkpoint.BASE_POINTER`). ``pretrain export`` merges them into plain
weights (:func:`merged_weights`, a plain :class:`~pretrain.model.Transformer` whose
``fuse_projections`` works as always); ``--lora-only`` writes the adapters in PEFT's format
(:func:`write_peft_adapter`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pretrain.checkpoint import (
    BASE_POINTER,
    checkpoint_base,
    dcp_load,
    find_checkpoint,
    read_metadata,
)
from pretrain.config import LORA_HEAD, Config, ConfigError, LoRAConfig, ModelConfig, load_config
from pretrain.errors import UserError
from pretrain.model import ParamInit, Transformer

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel
_BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoRALinear(nn.Module):
    """``x W^T + b + (alpha / rank) * dropout(x) A^T B^T`` with ``W`` and ``b`` frozen.

    ``weight`` and ``bias`` keep the names of the ``nn.Linear`` they come from. The frozen
    weight may be stored in bf16; it is used in the input's dtype.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        base_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        out_dim, in_dim = base.weight.shape
        dtype = base_dtype or base.weight.dtype
        self.weight = nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)
        self.bias = (
            None
            if base.bias is None
            else nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        )
        device, adapter_dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(in_dim, rank, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(rank, out_dim, bias=False, device=device, dtype=adapter_dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling = rank, alpha / rank
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """A Kaiming-uniform (as ``nn.Linear`` and PEFT), B zero: the product starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def param_init(self, name: str, param: torch.Tensor) -> ParamInit | None:
        """The adapters' rule for a model initialized after sharding (``pretrain.initialize``):
        the distribution of :meth:`reset_adapters`; None for the base weights (the model's)."""
        if name == "lora_A.weight":  # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in)
            return ParamInit(bound=1.0 / math.sqrt(param.shape[1]))
        if name == "lora_B.weight":
            return ParamInit(fill=0.0)
        return None

    def effective_weight(self) -> torch.Tensor:
        """``W + scaling * B A``, differentiable in the adapters: the weight a fused
        ``linear_cross_entropy`` needs when this layer is the model's head."""
        delta = self.lora_B.weight @ self.lora_A.weight
        return self.weight.to(delta.dtype) + self.scaling * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The plain layer with ``W + scaling * B A`` (computed in fp32), trainable again."""
        w = self.weight.detach()
        delta = self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()
        dtype = self.lora_A.weight.dtype
        linear = nn.Linear(
            w.shape[1], w.shape[0], bias=self.bias is not None, device=w.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(w.float() + self.scaling * delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every target projection of every block, in the model's order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, (nn.Linear, LoRALinear)):
                found.append((parent, name))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and put adapters on its target projections, in place (before
    :func:`~pretrain.parallel.parallelize`, as activation checkpointing and FSDP2 wrap it)."""
    if cfg.rank <= 0:
        raise ConfigError("finetune.lora.rank must be >= 1 to apply LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    if LORA_HEAD in cfg.targets and model.lm_head.weight is model.embed_tokens.weight:
        raise ConfigError(
            f"finetune.lora.targets names {LORA_HEAD}, but this model's head is its embedding "
            "(model.tie_embeddings = true), which LoRA keeps frozen: drop lm_head from the targets"
        )
    sites = _targets(model, cfg.targets)
    if not sites:
        raise ConfigError(
            f"finetune.lora.targets = {cfg.targets} names no projection of this model"
        )
    for parent, name in sites:
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise UserError("the model already has LoRA adapters: apply_lora once")
        adapter = LoRALinear(
            base, cfg.rank, cfg.alpha, cfg.dropout, base_dtype=_BASE_DTYPES[cfg.base_dtype]
        )
        setattr(parent, name, adapter)
    return model


def apply_lora_from_config(model: nn.Module, config: Config) -> nn.Module:
    """The trainer's hook: LoRA when ``finetune.lora.rank`` > 0, which needs a base to adapt."""
    cfg = config.finetune.lora
    if cfg.rank == 0:
        return model
    if not config.checkpoint.init_from:
        raise ConfigError(
            "finetune.lora.rank > 0 adapts a trained model: give it with --init-from "
            "(pretrain finetune) or --checkpoint.init_from"
        )
    if config.parallel.tp > 1:
        raise ConfigError(
            "finetune.lora with parallel.tp > 1 is not supported: the tensor-parallel plan "
            "splits plain projections; use parallel.tp = 1 (FSDP2 shards the adapters)"
        )
    return apply_lora(model, cfg)


def adapter_count(model_cfg: ModelConfig, cfg: LoRAConfig) -> int:
    """How many parameters the adapters of ``cfg`` add to a model of ``model_cfg``."""
    with torch.device("meta"):
        model = apply_lora(Transformer(model_cfg), cfg)
    return sum(p.numel() for p in adapter_parameters(model).values())


def describe(model_cfg: ModelConfig, cfg: LoRAConfig) -> str:
    """One line for a run's report: what is trained, and how much of the model that is."""
    with torch.device("meta"):
        total = Transformer(model_cfg).num_params()
    n = adapter_count(model_cfg, cfg)
    return (
        f"LoRA rank {cfg.rank} (alpha {cfg.alpha:g}) on {','.join(cfg.targets)}: {n:,} trainable "
        f"parameters ({100 * n / total:.2f}% of {total:,}), base frozen in {cfg.base_dtype}"
    )


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters under their state-dict names (``...q_proj.lora_A.weight``)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged plain ``nn.Linear``, in place; every
    parameter is trainable again, so the result is the plain model of ``model.py``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- checkpoints


def is_adapter_checkpoint(step_dir: str | os.PathLike) -> bool:
    """Whether a checkpoint holds LoRA adapters (and a base pointer) rather than full weights."""
    return (Path(step_dir) / BASE_POINTER).is_file()


def read_adapters(step_dir: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and the adapter tensors of a LoRA checkpoint, read in one process."""
    step_dir = find_checkpoint(step_dir)
    config = load_config(step_dir / "config.toml")
    stored = read_metadata(step_dir).state_dict_metadata
    template = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    if not template or any(".lora_" not in name for name in template):
        raise UserError(f"checkpoint {step_dir} does not hold LoRA adapters only")
    dcp_load({"model": template}, step_dir, no_dist=True)
    return config, template


def _load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor], source: Path) -> None:
    expected = adapter_parameters(model)
    if set(expected) != set(adapters):
        missing = sorted(set(expected) - set(adapters))[:3]
        raise UserError(
            f"checkpoint {source}: its adapters do not fit its config "
            f"(missing {missing or 'none'}; {len(adapters)} stored, {len(expected)} expected)"
        )
    with torch.no_grad():
        for name, p in expected.items():
            if tuple(adapters[name].shape) != tuple(p.shape):
                raise UserError(
                    f"checkpoint {source}: {name} has shape {tuple(adapters[name].shape)}"
                )
            p.copy_(adapters[name])


def adapted_model(
    step_dir: str | os.PathLike, init_base: Callable[[Path, nn.Module], None]
) -> nn.Module:
    """The model of a LoRA checkpoint, unmerged: its base (read by ``init_base``, e.g.
    :func:`pretrain.export.init_from`, from the checked pointer) in fp32, plus its adapters."""
    step_dir = find_checkpoint(step_dir)
    base = checkpoint_base(step_dir)
    if base is None:
        raise UserError(f"checkpoint {step_dir} names no base (its {BASE_POINTER} is missing)")
    config, adapters = read_adapters(step_dir)
    cfg = config.finetune.lora
    cfg.base_dtype, cfg.dropout = "fp32", 0.0
    model = apply_lora(Transformer(config.model), cfg)
    init_base(base, model)
    _load_adapters(model, adapters, step_dir)
    return model.eval()


def merged_weights(
    step_dir: str | os.PathLike, init_base: Callable[[Path, nn.Module], None]
) -> tuple[Config, dict[str, torch.Tensor]]:
    """The full weights of a LoRA checkpoint with the adapters merged into its base: what
    ``pretrain export`` writes, a plain model's state dict."""
    step_dir = find_checkpoint(step_dir)
    model = merge_lora(adapted_model(step_dir, init_base))
    config = load_config(step_dir / "config.toml")
    return config, {k: v.detach() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- PEFT format


def peft_names(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter names as PEFT saves them for a ``LlamaForCausalLM`` (whose head sits beside
    its ``model``, not in it)."""
    head_prefix = PEFT_PREFIX.removesuffix("model.")
    return {
        (head_prefix if name.startswith(f"{LORA_HEAD}.") else PEFT_PREFIX) + name: t.contiguous()
        for name, t in adapters.items()
    }


def peft_config(cfg: LoRAConfig, base: str) -> dict:
    """``adapter_config.json``: what PEFT needs to rebuild the same adapters on ``base``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft_adapter(
    step_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a LoRA checkpoint's adapters as a PEFT adapter directory (``adapter_model.
    safetensors`` + ``adapter_config.json``), atomically: a temporary directory renamed into
    place (an existing ``out`` is replaced; the caller checks that it may be)."""
    step_dir, out = find_checkpoint(step_dir), Path(out)
    base = checkpoint_base(step_dir)
    config, adapters = read_adapters(step_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = peft_names({k: v.to(dtype) for k, v in adapters.items()})
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    text = json.dumps(peft_config(config.finetune.lora, str(base)), indent=2) + "\n"
    (tmp / PEFT_CONFIG).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
