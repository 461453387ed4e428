"""Typed run configuration: dataclass sections, loaded from TOML, overridden from the command line.

A config is a tree: sections (``model``, ``data``, ``train``, ...) holding typed keys, and a section
may hold a sub-section of its own (``[finetune.lora]``, written ``finetune.lora.rank``). The TOML
file gives values for some keys, ``--section.key value`` overrides them, and everything else keeps
the default written here. Every mistake (an unknown section or key, a value of the
wrong type, a missing file) raises :class:`ConfigError` naming the key, so that the command line
can print one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pretrain.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be applied."""


Schedule = Literal["cosine", "linear", "wsd", "constant"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
RopeScaling = Literal["none", "linear", "llama3", "yarn"]
HFFamily = Literal["auto", "llama", "mistral", "qwen2", "qwen3"]


def _refuse(key: str, value: Any, allowed: str) -> None:
    """The one-line error for a value out of range: the key, what is allowed, what was given."""
    raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _at_least(key: str, value: int | float, low: int | float, note: str = "") -> None:
    if not value >= low:
        _refuse(key, value, f">= {low}" + (f" {note}" if note else ""))


def _positive(key: str, value: float) -> None:
    if not value > 0:
        _refuse(key, value, "> 0")


def _fraction(key: str, value: float, *, below_one: bool = False) -> None:
    """A value in [0, 1] (or [0, 1) when 1 itself makes no sense, e.g. an Adam beta)."""
    if not (0 <= value < 1 if below_one else 0 <= value <= 1):
        _refuse(key, value, "in [0, 1)" if below_one else "in [0, 1]")


def _factor_or_off(key: str, value: float) -> None:
    """A divergence factor: a bound only makes sense above 1 (0 turns the check off)."""
    if not (value == 0 or value > 1):
        _refuse(key, value, "> 1 (or 0 to turn the check off)")


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (Llama family)."""

    vocab_size: int = 8192
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int = 0  # 0: the Llama rule, 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Architecture options of the Llama family's relatives (all off: plain Llama):
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    head_dim_override: int = 0  # 0: d_model / n_heads; else the per-head width (Qwen3)
    rope_scaling: RopeScaling = "none"  # how RoPE's frequencies stretch to a longer context
    rope_factor: float = 1.0  # linear, llama3, yarn: the context stretch factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: int = 0  # llama3, yarn: the context before scaling (required)
    rope_beta_fast: float = 32.0  # yarn: rotations where the frequencies stop being interpolated
    rope_beta_slow: float = 1.0  # yarn: rotations where they start
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0: 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    # The Hugging Face architecture an export is written as; auto: the one the options need
    # (an imported checkpoint keeps its own, so a fine-tuned Mistral is exported as Mistral).
    hf_family: HFFamily = "auto"
    doc_mask: bool = False  # packed sequences attend only within their own document
    zero_init_residual: bool = False  # o_proj and down_proj start at zero (the speedrun recipe)

    @property
    def head_dim(self) -> int:
        """The width of one attention head: ``head_dim_override`` or ``d_model / n_heads``."""
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def validate(self) -> None:
        """Ranges first, then the shape rules (which divide by the counts checked first)."""
        _at_least("model.vocab_size", self.vocab_size, 2)
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "max_seq_len"):
            _at_least(f"model.{name}", getattr(self, name), 1)
        _at_least("model.ffn_hidden", self.ffn_hidden, 0, "(0: the Llama rule)")
        _at_least("model.ffn_multiple_of", self.ffn_multiple_of, 1)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _positive(f"model.{name}", getattr(self, name))
        _at_least("model.head_dim_override", self.head_dim_override, 0, "(0: d_model / n_heads)")
        self._validate_rope_scaling()
        if not self.head_dim_override and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                f"{self.n_kv_heads}: grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ConfigError(f"the head dim {self.head_dim} must be even for RoPE")

    def _validate_rope_scaling(self) -> None:
        """The parameters a scaling type reads must make sense; the others must keep defaults,
        so a value that would be ignored is never silently accepted."""
        for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("rope_beta_fast", "rope_beta_slow"):
            _positive(f"model.{name}", getattr(self, name))
        _at_least("model.rope_original_max_seq_len", self.rope_original_max_seq_len, 0)
        _at_least("model.rope_attention_factor", self.rope_attention_factor, 0, "(0: yarn's own)")
        kind = self.rope_scaling
        if kind == "none":
            if self.rope_factor != 1.0:
                _refuse("model.rope_factor", self.rope_factor, "1.0 when model.rope_scaling='none'")
            return
        _at_least("model.rope_factor", self.rope_factor, 1.0)
        if kind in ("llama3", "yarn"):
            _at_least(
                "model.rope_original_max_seq_len",
                self.rope_original_max_seq_len,
                1,
                f"(the context before {kind} scaling)",
            )
        if kind == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(
                f"model.rope_low_freq_factor={self.rope_low_freq_factor} and "
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must satisfy "
                "0 < low < high for llama3 RoPE scaling"
            )


@dataclass
class DataConfig:
    """Where the tokenized shards are and how they are cut into training sequences."""

    path: str = "data/stdlib"
    seq_len: int = 256
    num_workers: int = 0

    def validate(self) -> None:
        if not self.path:
            _refuse("data.path", self.path, "a prepared data directory (pass --data DIR)")
        _at_least("data.seq_len", self.seq_len, 1)
        _at_least("data.num_workers", self.num_workers, 0)


@dataclass
class TrainConfig:
    """The optimisation loop: steps, batch sizes, learning rate schedule, precision."""

    steps: int = 1000
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward pass per rank; accumulation follows
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Schedule = "cosine"
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    grad_clip: float = 1.0
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    # auto: Triton on CUDA, the PyTorch reference on CPU
    kernels: Literal["auto", "triton", "torch"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    skip_spikes: bool = False  # skip a step whose loss is an outlier (counted and logged)
    spike_threshold: float = 6.0  # z-score of the loss against its running statistics
    max_skipped_steps: int = 5  # this many skipped steps in a row stop the run (exit 2)
    # A divergence stops the run (exit 2) before its update and before it is checkpointed:
    diverge_loss_factor: float = 2.0  # loss above this x ln(vocab_size) (a uniform guess); 0: off
    diverge_grad_factor: float = 1000.0  # grad norm above this x its running mean; 0: off
    # stop (with a checkpoint) after this step; the schedule still spans train.steps
    stop_at: int = 0
    # run one step on fake tensors under a fake process group of WORLD_SIZE ranks, then exit
    dry_run: bool = False
    # stop (with an evaluation and a checkpoint) once the training steps have used this many
    # CPU seconds of this process (time.process_time, evaluations excluded); 0: off
    cpu_budget_s: float = 0.0

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        _positive("train.lr", self.lr)
        _fraction("train.min_lr_ratio", self.min_lr_ratio)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _fraction("train.decay_fraction", self.decay_fraction)
        _at_least("train.grad_clip", self.grad_clip, 0, "(0: no clipping)")
        if not 0 <= self.seed < 2**63:
            _refuse("train.seed", self.seed, "in [0, 2**63)")
        _positive("train.spike_threshold", self.spike_threshold)
        _at_least("train.max_skipped_steps", self.max_skipped_steps, 1)
        _factor_or_off("train.diverge_loss_factor", self.diverge_loss_factor)
        _factor_or_off("train.diverge_grad_factor", self.diverge_grad_factor)
        _at_least("train.stop_at", self.stop_at, 0, "(0: run to train.steps)")
        _at_least("train.cpu_budget_s", self.cpu_budget_s, 0, "(0: no CPU-time limit)")


@dataclass
class OptimizerConfig:
    """The optimizer: ``adamw`` (the project's fused kernel on CUDA), ``torch`` (PyTorch's AdamW)
    or ``muon`` (:class:`kernels.Muon`: Muon for the hidden matrices, AdamW for the rest).

    ``train.lr`` is the peak learning rate of the AdamW parameters and ``muon_lr`` that of the
    Muon matrices; the schedule scales both alike. The ``muon_*`` keys are those of
    ``torch.optim.Muon`` (``muon_adjust_lr`` is its ``adjust_lr_fn``).
    """

    name: Literal["adamw", "torch", "muon"] = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    # original: sqrt(max(1, rows/cols)); match_rms_adamw: 0.2 sqrt(max(rows, cols))
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"

    def validate(self) -> None:
        _at_least("optimizer.weight_decay", self.weight_decay, 0)
        _fraction("optimizer.beta1", self.beta1, below_one=True)
        _fraction("optimizer.beta2", self.beta2, below_one=True)
        _positive("optimizer.eps", self.eps)
        _positive("optimizer.muon_lr", self.muon_lr)
        _fraction("optimizer.muon_momentum", self.muon_momentum, below_one=True)
        _at_least("optimizer.muon_ns_steps", self.muon_ns_steps, 1)


@dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations on the val split (0: never)
    batches: int = 8  # batches of global_batch_size sequences per evaluation

    def validate(self) -> None:
        _at_least("eval.every", self.every, 0, "(0: never)")
        _at_least("eval.batches", self.batches, 1)


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric lines
    wandb: bool = False
    wandb_project: str = "pretrain"
    wandb_run_name: str = ""

    def validate(self) -> None:
        _at_least("logging.every", self.every, 1)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 3
    keep_steps: list[int] = field(default_factory=list)  # steps never deleted
    resume: str = ""  # "" | auto | a checkpoint path
    init_from: str = ""  # weights only, from a checkpoint or an export
    async_save: bool = False

    def validate(self) -> None:
        _at_least("checkpoint.every", self.every, 0, "(0: only at the end)")
        _at_least("checkpoint.keep_last", self.keep_last, 0, "(0: keep all)")
        for step in self.keep_steps:
            if step < 1:
                _refuse("checkpoint.keep_steps", self.keep_steps, "a list of steps >= 1")


@dataclass
class ParallelConfig:
    """The device mesh: ``dp_replicate`` x ``dp_shard`` x ``tp`` ranks (their product is the world).

    ``dp_replicate`` > 1 is HSDP: parameters are sharded over ``dp_shard`` ranks (a node) and
    replicated across the groups, so only gradients cross the slower links. ``tp`` splits each
    block's matrices Megatron-style (column q/k/v and gate/up, row o and down) with sequence
    parallel norms. ``dp_shard = -1`` takes whatever the world leaves.
    """

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: world_size / (dp_replicate * tp)
    tp: int = 1
    reshard_after_forward: Literal["default", "always", "never"] = "default"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        _at_least("parallel.dp_replicate", self.dp_replicate, 1)
        _at_least("parallel.tp", self.tp, 1)
        if not (self.dp_shard == -1 or self.dp_shard >= 1):
            _refuse("parallel.dp_shard", self.dp_shard, ">= 1 (or -1: the rest of the world)")

    def mesh_shape(self, world_size: int) -> tuple[int, int, int]:
        """(dp_replicate, dp_shard, tp) for ``world_size`` ranks; a wrong product is one line."""
        rest = self.dp_replicate * self.tp
        shard = self.dp_shard
        if shard == -1:
            if world_size % rest:
                raise ConfigError(
                    f"world size {world_size} is not divisible by parallel.dp_replicate="
                    f"{self.dp_replicate} x parallel.tp={self.tp}"
                )
            shard = world_size // rest
        if self.dp_replicate * shard * self.tp != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={self.dp_replicate} x parallel.dp_shard={shard} x "
                f"parallel.tp={self.tp} = {self.dp_replicate * shard * self.tp}, but the world "
                f"size is {world_size}: make the product equal the number of ranks"
            )
        return self.dp_replicate, shard, self.tp


LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip
LORA_HEAD = "lm_head"  # an optional target, off by default: the output head


@dataclass
class LoRAConfig:
    """Low-rank adapters (``[finetune.lora]``, :mod:`pretrain.lora`): ``rank`` > 0 freezes the
    init's weights and trains ``W + (alpha / rank) B A`` on each target projection instead.

    ``base_dtype = "bf16"`` keeps the frozen base in bf16 (half its memory); the adapters and
    their optimizer state stay in the trainer's fp32.
    """

    rank: int = 0  # 0: off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    base_dtype: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        _at_least("finetune.lora.rank", self.rank, 0, "(0: off)")
        _positive("finetune.lora.alpha", self.alpha)
        _fraction("finetune.lora.dropout", self.dropout, below_one=True)
        if not self.targets:
            _refuse("finetune.lora.targets", self.targets, "a list of " + ", ".join(LORA_TARGETS))
        known = [*LORA_TARGETS, LORA_HEAD]
        for name in self.targets:
            if name not in known:
                raise ConfigError(
                    f"finetune.lora.targets: unknown projection {name!r}; the targets are "
                    f"{', '.join(known)}{_suggest(name, known)}"
                )


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (``pretrain finetune``): the JSONL rows and how they become batches."""

    data: str = ""  # JSONL of {"prompt", "completion"} or {"messages": [...]} rows
    val_data: str = ""  # a JSONL of validation rows; empty: hold out val_fraction of data
    val_fraction: float = 0.05
    epochs: int = 0  # > 0: train.steps follows from the data (epochs over it)
    packing: bool = True  # several conversations per row, attention kept within each
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the [finetune.lora] section

    def validate(self) -> None:
        _fraction("finetune.val_fraction", self.val_fraction, below_one=True)
        _at_least("finetune.epochs", self.epochs, 0, "(0: train.steps gives the length)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every value of every section (see :func:`validate_config`)."""
        validate_config(self)


def validate_config(config: Any) -> None:
    """Refuse any value out of its range, with one line naming the key, the value and what is
    allowed: first every float must be finite and every choice key one of its ``Literal``'s
    values, then each section's own ``validate()``.

    Runs when a config is loaded, so a bad value stops the command before any work starts.
    """
    for section in _sections(type(config)):
        _validate_section(section, getattr(config, section))


def _validate_section(prefix: str, values: Any) -> None:
    """The generic checks on one section's keys, its sub-sections, then its own ``validate()``."""
    for name, tp in _keys(type(values)).items():
        value, key = getattr(values, name), f"{prefix}.{name}"
        if _is_section(tp):
            _validate_section(key, value)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            _refuse(key, value, "a finite number")
        if typing.get_origin(tp) is Literal:  # a config built or changed in code
            _coerce_choice(key, value, typing.get_args(tp))
    if hasattr(values, "validate"):
        values.validate()


def _sections(config_cls: type = Config) -> dict[str, type]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _keys(section_cls: type) -> dict[str, Any]:
    """A section's fields and their types; a sub-section is a field whose type is a dataclass."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_keys(section_cls: type, prefix: str) -> dict[str, Any]:
    """``{dotted key: type}`` of every value key of a section, its sub-sections' included."""
    keys: dict[str, Any] = {}
    for name, tp in _keys(section_cls).items():
        if _is_section(tp):
            keys.update(_leaf_keys(tp, f"{prefix}.{name}"))
        else:
            keys[f"{prefix}.{name}"] = tp
    return keys


def all_keys(config_cls: type = Config) -> list[str]:
    """Every valid key (``section.key``, ``section.sub.key``), in declaration order."""
    return [k for s, cls in _sections(config_cls).items() for k in _leaf_keys(cls, s)]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "str"
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a TOML value or a command-line string to the declared type of ``key``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(key, v, item_tp) for v in value]
    if origin is Literal:
        return _coerce_choice(key, value, typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"config fields must have plain types, not {tp}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                value = value.replace("_", "")
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float) if ("e" in value.lower() or "." in value) else int(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    raise TypeError(f"unsupported config type {tp} for {key}")


def _coerce_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """A ``Literal[...]`` key: the value must be one of the choices the annotation lists."""
    if not isinstance(value, str) or value not in choices:
        _refuse(key, value, "one of " + ", ".join(choices))
    return value


def _apply(config: Any, key: str, value: Any) -> None:
    """Set ``section.key`` on ``config`` after checking that it exists and coercing the value."""
    sections = _sections(type(config))
    every = all_keys(type(config))
    if "." not in key:
        raise ConfigError(
            f"unknown config key '{key}': keys are written section.key{_suggest(key, every)}"
        )
    section, *path, name = key.split(".")
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}' in '{key}'{_suggest(key, every)}")
    owner, prefix = getattr(config, section), section
    for part in path:  # down into a sub-section such as finetune.lora
        if not _is_section(_keys(type(owner)).get(part)):
            raise ConfigError(
                f"unknown config section '{prefix}.{part}' in '{key}'{_suggest(key, every)}"
            )
        owner, prefix = getattr(owner, part), f"{prefix}.{part}"
    keys = _keys(type(owner))
    if name not in keys:
        near = [k for k in every if k.startswith(prefix + ".")]
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, near + every)}")
    if _is_section(keys[name]):
        if isinstance(value, dict):  # a [section.sub] table of a TOML file
            for sub, sub_value in value.items():
                _apply(config, f"{key}.{sub}", sub_value)
            return
        raise ConfigError(
            f"'{key}' is a section, not a key: set its keys, e.g. "
            f"--{next(k for k in every if k.startswith(key + '.'))} VALUE"
        )
    setattr(owner, name, _coerce(key, value, keys[name]))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``['--train.lr', '3e-4', '--model.n_layers=2']`` into ``[(key, value), ...]``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides are written --section.key value"
            )
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            key, value = body, args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | list[tuple[str, str]] | None = None,
    config_cls: type = Config,
) -> Any:
    """Build a config: defaults, then the TOML file at ``path``, then command-line overrides."""
    config = config_cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{p}: top-level key '{section}' must be a [section]"
                    f"{_suggest(section, list(_sections(config_cls)))}"
                )
            for name, value in values.items():
                _apply(config, f"{section}.{name}", value)
    pairs = overrides or []
    if pairs and isinstance(pairs[0], str):
        pairs = parse_overrides(pairs)  # type: ignore[arg-type]
    for key, value in pairs:
        _apply(config, key, value)
    validate_config(config)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(config: Any) -> str:
    """The resolved config as TOML text that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []
    for section, values in dataclasses.asdict(config).items():
        _section_toml(section, values, lines)
    return "\n".join(lines)


def _section_toml(name: str, values: dict[str, Any], lines: list[str]) -> None:
    """``[name]`` with its keys, then each sub-section as its own ``[name.sub]`` table (TOML puts
    every key after a table header into that table, so sub-sections come last)."""
    lines.append(f"[{name}]")
    subs = {k: v for k, v in values.items() if isinstance(v, dict)}
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in subs)
    lines.append("")
    for sub, sub_values in subs.items():
        _section_toml(f"{name}.{sub}", sub_values, lines)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_toml(config))
    os.replace(tmp, path)


def _value_at(config: Any, key: str) -> Any:
    """The value of a dotted key (``finetune.lora.rank``) of ``config``."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def config_help(config: Any | None = None) -> str:
    """One line per key with its type and default, for ``pretrain SUB --help``."""
    config = config or Config()
    rows = []
    for key, tp in _leaf_keys(type(config), "").items():
        key = key[1:]  # the leading "." of the empty prefix
        rows.append(f"  --{key} ({_type_name(tp)}, default {_toml_value(_value_at(config, key))})")
    return "config keys (override any with --section.key VALUE):\n" + "\n".join(rows)
