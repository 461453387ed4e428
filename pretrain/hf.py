"""The Hugging Face layout: the one module that knows how an export names things.

An export is a directory that transformers loads as a ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (the Llama block; Qwen2 adds q/k/v biases, Qwen3
QK-norm and a free head width), and such a directory saved by transformers 4.x or 5.x is read
back. This module maps our side to that layout and back, and does no file I/O beyond reading
one JSON file:

* the file names of the layout (:data:`CONFIG`, :data:`GENERATION_CONFIG`, :data:`TOKENIZER`,
  :data:`TOKENIZER_CONFIG`, :data:`WEIGHTS`, :data:`WEIGHTS_INDEX`);
* ``config.json`` <-> :class:`~pretrain.config.ModelConfig` (:func:`hf_config`,
  :func:`model_config_from_hf`), and the contents of ``generation_config.json`` and
  ``tokenizer_config.json``;
* parameter names both ways (:func:`to_hf_names`, :func:`from_hf_names`). Our names are Llama's
  without the ``model.`` prefix and our RoPE has Llama's half-split layout, so weights are
  renamed, never permuted.

Writing, checksums and verification of an export directory are :mod:`pretrain.export`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
)

CONFIG = "config.json"
GENERATION_CONFIG = GENERATION_CONFIG_FILE
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = TOKENIZER_CONFIG_FILE
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
METADATA_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG)

HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an export: a ``config.json`` and its weights file or index."""
    path = Path(path)
    return (path / CONFIG).is_file() and (
        (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file()
    )


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing, unparsable or non-object file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object")
    return data


# --------------------------------------------------------------------------- config.json

# Our families: the Hugging Face architecture, by model_type. All four are the Llama block; what
# sets them apart is one of our ModelConfig options (see export_family).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = {  # rope_type -> the parameters it reads (transformers' names -> ours)
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {
        "factor": "rope_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_seq_len",
    },
    "yarn": {
        "factor": "rope_factor",
        "original_max_position_embeddings": "rope_original_max_seq_len",
    },
}
_OPTIONAL_ROPE = {  # rope_type -> the parameters it may leave out (transformers' defaults then)
    "yarn": {
        "beta_fast": "rope_beta_fast",
        "beta_slow": "rope_beta_slow",
        "attention_factor": "rope_attention_factor",
        "truncate": "rope_truncate",
    },
}
_OUR_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def export_family(cfg: ModelConfig) -> str:
    """The family an export of ``cfg`` is written as: ``cfg.hf_family``, or for ``auto`` the one
    its options need (QK-norm: Qwen3; q/k/v biases: Qwen2; neither: Llama). A combination that
    no Hugging Face architecture has is a UserError naming the option."""
    if cfg.qk_norm and cfg.attention_bias:
        raise UserError(
            "model.qk_norm with model.attention_bias has no Hugging Face architecture (Qwen3 "
            "with attention_bias also biases o_proj); train with one of them off to export"
        )
    needs = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else None
    family = cfg.hf_family
    if family == "auto":
        return needs or "llama"
    if needs is not None and family != needs:
        option = "qk_norm" if cfg.qk_norm else "attention_bias"
        raise UserError(
            f"model.hf_family={family!r} has no model.{option}: export it as {needs!r} "
            "(or hf_family 'auto')"
        )
    if needs is None and family in ("qwen2", "qwen3"):
        option = "attention_bias" if family == "qwen2" else "qk_norm"
        raise UserError(f"model.hf_family={family!r} needs model.{option} = true")
    return family


def _rope_parameters(cfg: ModelConfig) -> dict:
    """``rope_parameters`` (transformers 5's name) of ``cfg``: type, theta and scaling values."""
    kind = {ours: theirs for theirs, ours in _OUR_ROPE_TYPES.items()}[cfg.rope_scaling]
    rope: dict = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    for theirs, ours in _ROPE_TYPES[kind].items():
        rope[theirs] = getattr(cfg, ours)
    for theirs, ours in _OPTIONAL_ROPE.get(kind, {}).items():
        if theirs != "attention_factor" or cfg.rope_attention_factor > 0:  # 0: yarn's default
            rope[theirs] = getattr(cfg, ours)
    return rope


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: int) -> dict:
    """``config.json`` of the family :func:`export_family` picks, readable by transformers 4.x
    (``rope_theta``, ``rope_scaling``) and 5.x (``rope_parameters``).

    Documents are separated by end-of-text only, so it also serves as the start token.
    """
    family = export_family(cfg)
    rope = _rope_parameters(cfg)
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if family in ("llama", "qwen3"):
        config["attention_bias"] = False
    if family == "llama":
        config["mlp_bias"] = False
    if family == "mistral":
        config["sliding_window"] = None
    if family in ("qwen2", "qwen3"):
        config |= {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": cfg.n_layers,
            "layer_types": ["full_attention"] * cfg.n_layers,
        }
    return config


_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "rms_norm_eps": (int, float),
    "max_position_embeddings": int,
    "vocab_size": int,
}
_OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "head_dim": (int, type(None)),
    "tie_word_embeddings": bool,
    "initializer_range": (int, float),
    "torch_dtype": (str, type(None)),
    "dtype": (str, type(None)),
}
# Fields whose value we implement or check (below), and fields that never change the math.
_HANDLED_FIELDS = {
    *_REQUIRED_FIELDS, *_OPTIONAL_FIELDS, "architectures", "model_type", "hidden_act",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "attention_bias",
    "mlp_bias", "attention_dropout", "pretraining_tp", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types",
}  # fmt: skip
_INERT_FIELDS = {
    "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params",
    "tokenizer_class", "pruned_heads", "tf_legacy_loss", "cross_attention_hidden_size",
    "_attn_implementation_autoset", "bos_token", "eos_token",
}  # fmt: skip


def _field_error(path: str | os.PathLike, field: str, why: str) -> UserError:
    return UserError(f"{path}: field '{field}' {why}")


def _family(config: dict, path: str | os.PathLike) -> str:
    """The family of a ``config.json``: one architecture of ours and its model_type."""
    archs = config.get("architectures") or []
    known = [family for family, arch in ARCHITECTURES.items() if arch in archs]
    if len(known) != 1 or len(archs) != 1:
        raise _field_error(
            path,
            "architectures",
            f"is {config.get('architectures')!r}; expected one of {sorted(ARCHITECTURES.values())}",
        )
    family = known[0]
    if config.get("model_type") != family:
        raise _field_error(
            path, "model_type", f"is {config.get('model_type')!r}; {archs[0]} needs {family!r}"
        )
    return family


def _check_field_types(config: dict, path: str | os.PathLike) -> None:
    """Every required field is present with its type, and the optional ones have theirs."""
    for field in _REQUIRED_FIELDS:
        if field not in config:
            raise _field_error(path, field, "is missing")
    for field, tp in {**_REQUIRED_FIELDS, **_OPTIONAL_FIELDS}.items():
        if field not in config:
            continue
        value = config[field]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _field_error(path, field, f"has the wrong type: {value!r}")


def _check_unsupported(config: dict, family: str, path: str | os.PathLike) -> None:
    """Refuse, by name, every field that would change the math in a way we do not implement,
    and every field we do not know (it could): nothing is silently ignored."""
    unknown = sorted(set(config) - _HANDLED_FIELDS - _INERT_FIELDS)
    if unknown:
        raise _field_error(
            path, unknown[0], "is not supported (it may change the model); remove it if it does not"
        )

    def need(field: str, ok: bool, want: str) -> None:
        if field in config and not ok:
            raise _field_error(path, field, f"is {config[field]!r}; this model needs {want}")

    need("hidden_act", config.get("hidden_act") == "silu", "'silu'")
    need("mlp_bias", not config.get("mlp_bias"), "false (no MLP biases)")
    if family != "qwen2":  # Qwen2's q/k/v biases are fixed by its architecture, not this field
        need("attention_bias", not config.get("attention_bias"), "false (no attention biases)")
    need("attention_dropout", not config.get("attention_dropout"), "0.0 (no attention dropout)")
    need("pretraining_tp", config.get("pretraining_tp") in (None, 1), "1")
    need("partial_rotary_factor", config.get("partial_rotary_factor") in (None, 1, 1.0), "1.0")
    if "torch_dtype" in config or "dtype" in config:
        dtype = config.get("torch_dtype") or config.get("dtype")
        need(
            "torch_dtype" if "torch_dtype" in config else "dtype",
            dtype is None or dtype in HF_DTYPE_NAMES.values(),
            f"one of {sorted(HF_DTYPE_NAMES.values())}",
        )
    _check_full_attention(config, family, path)


def _check_full_attention(config: dict, family: str, path: str | os.PathLike) -> None:
    """A sliding window narrower than the context is refused by its field's name; a window at
    least the context long is full attention and accepted."""
    window, context = config.get("sliding_window"), config["max_position_embeddings"]
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise _field_error(path, "sliding_window", f"has the wrong type: {window!r}")
    narrow = window is not None and window < context
    why = f"is set: layers attend to a sliding window of {window} < {context} positions"
    if family == "mistral":
        if narrow:
            raise _field_error(path, "sliding_window", f"{why}; sliding windows are not supported")
        return
    layer_types = config.get("layer_types") or []
    if not isinstance(layer_types, list) or set(layer_types) - {
        "full_attention",
        "sliding_attention",
    }:
        raise _field_error(path, "layer_types", f"is {layer_types!r}; expected attention types")
    # transformers slides only with use_sliding_window, over the layers layer_types marks (4.x
    # configs have none: the layers from max_window_layers on).
    sliding = bool(config.get("use_sliding_window")) and (
        "sliding_attention" in layer_types
        if layer_types
        else config.get("max_window_layers", 0) < config["num_hidden_layers"]
    )
    if sliding and narrow:
        raise _field_error(path, "use_sliding_window", f"{why}; sliding windows are not supported")


def _rope_fields(config: dict, path: str | os.PathLike) -> dict:
    """Our RoPE keys from either config style: transformers 4.x (``rope_theta`` and
    ``rope_scaling``) or 5.x (``rope_parameters``); where both are given they must agree."""
    given: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise _field_error(path, key, f"should be an object, got {value!r}")
        for name, v in value.items():
            name = "rope_type" if name == "type" else name  # the older spelling
            if name in given and given[name] != v:
                raise _field_error(path, f"{key}.{name}", f"({v!r}) disagrees with {given[name]!r}")
            given[name] = v
    if "rope_theta" in config:
        if "rope_theta" in given and given["rope_theta"] != config["rope_theta"]:
            raise _field_error(
                path,
                "rope_theta",
                f"({config['rope_theta']}) disagrees with rope_parameters.rope_theta",
            )
        given["rope_theta"] = config["rope_theta"]
    if "rope_theta" not in given:
        raise _field_error(path, "rope_theta", "is missing (and so is rope_parameters.rope_theta)")
    theta = given.pop("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise _field_error(path, "rope_theta", f"has the wrong type: {theta!r}")
    kind = given.pop("rope_type", "default")
    if kind not in _ROPE_TYPES:
        raise _field_error(
            path,
            "rope_parameters.rope_type",
            f"is {kind!r}; supported RoPE types: {', '.join(_ROPE_TYPES)}",
        )
    if given.get("partial_rotary_factor", 1.0) == 1.0:
        given.pop("partial_rotary_factor", None)
    given = {k: v for k, v in given.items() if v is not None}  # null: transformers' default
    fields = {"rope_theta": float(theta), "rope_scaling": _OUR_ROPE_TYPES[kind]}
    optional = _OPTIONAL_ROPE.get(kind, {})
    for name, value in given.items():
        if name not in _ROPE_TYPES[kind] and name not in optional:
            raise _field_error(
                path, f"rope_parameters.{name}", f"is not supported with rope_type {kind!r}"
            )
        want_bool = name == "truncate"
        if isinstance(value, bool) != want_bool or not isinstance(value, (int, float)):
            raise _field_error(path, f"rope_parameters.{name}", f"has the wrong type: {value!r}")
    for theirs, ours in _ROPE_TYPES[kind].items():
        if theirs not in given:
            raise _field_error(path, f"rope_parameters.{theirs}", f"is missing ({kind} RoPE)")
        fields[ours] = given[theirs]
    fields |= {ours: given[theirs] for theirs, ours in optional.items() if theirs in given}
    return fields


def model_config_from_hf(config: dict, path: str | os.PathLike = CONFIG) -> ModelConfig:
    """Our ``ModelConfig`` from a ``config.json`` of Llama, Mistral, Qwen2 or Qwen3 (either
    transformers style); a missing, inconsistent or unsupported field is named."""
    family = _family(config, path)
    _check_field_types(config, path)
    _check_unsupported(config, family, path)
    rope = _rope_fields(config, path)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    implied = hidden // heads if heads > 0 and hidden % heads == 0 else None
    cfg = ModelConfig(
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        d_model=hidden,
        n_heads=heads,
        n_kv_heads=config["num_key_value_heads"],
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"],
        norm_eps=float(config["rms_norm_eps"]),
        tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=float(config.get("initializer_range", ModelConfig.init_std)),
        qk_norm=family == "qwen3",
        attention_bias=family == "qwen2",
        head_dim_override=0 if head_dim is None or head_dim == implied else head_dim,
        # The options imply every family but Mistral (which is Llama's math under its own name).
        hf_family="mistral" if family == "mistral" else "auto",
        **rope,
    )
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{path}: inconsistent fields: {e}") from None
    return cfg


def read_export_config(export_dir: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` described by an export's ``config.json``."""
    path = Path(export_dir) / CONFIG
    return model_config_from_hf(read_json(path), path)


# --------------------------------------------------------------------------- the other JSON files


def generation_config(eos_id: int, end_of_turn_id: int | None) -> dict:
    """``generation_config.json``: stop at end of text, and at end of turn for chat models, as
    our server does."""
    stop = [eos_id] if end_of_turn_id is None else [eos_id, end_of_turn_id]
    return {
        "bos_token_id": eos_id,
        "eos_token_id": stop if len(stop) > 1 else eos_id,
        "pad_token_id": eos_id,
    }


def tokenizer_config(cfg: ModelConfig) -> dict:
    """``tokenizer_config.json``: the special tokens, context length and chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": cfg.max_seq_len,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }


# --------------------------------------------------------------------------- parameter names


def to_hf_names(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our names -> Llama's: ``model.`` + ours, ``lm_head.weight`` as is (absent when tied)."""
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("lm_head."):
            if not tied:
                out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    return out


def from_hf_names(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Llama's names -> ours; when tied, ``lm_head.weight`` is the embedding tensor itself."""
    out = {name.removeprefix("model."): t for name, t in tensors.items()}
    if tied:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
