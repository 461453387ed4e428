"""The Hugging Face Llama layout: the one module that knows how an export names things.

An export is a directory that transformers loads as a ``LlamaForCausalLM``. This module maps our
side to that layout and back, and does no file I/O beyond reading one JSON file:

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
from pretrain.tokenizer import CHAT_TEMPLATE, EOS_TOKEN

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
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


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: int) -> dict:
    """``config.json`` for transformers' ``LlamaConfig``.

    Documents are separated by end-of-text only, so it also serves as the start token.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "use_cache": True,
    }


_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "rms_norm_eps": (int, float),
    "rope_theta": (int, float),
    "max_position_embeddings": int,
    "vocab_size": int,
    "tie_word_embeddings": bool,
    "torch_dtype": str,
}
_FIXED_FIELDS = {
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}


def _field_error(path: str | os.PathLike, field: str, why: str) -> UserError:
    return UserError(f"{path}: field '{field}' {why}")


def _check_field_types(config: dict, path: str | os.PathLike) -> None:
    """Every required field is present with its type, and the fixed ones have their value."""
    for field, tp in _REQUIRED_FIELDS.items():
        if field not in config:
            raise _field_error(path, field, "is missing")
        value = config[field]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _field_error(path, field, f"has the wrong type: {value!r}")
    for field, want in _FIXED_FIELDS.items():
        if config.get(field) != want:
            raise _field_error(path, field, f"is {config.get(field)!r}; this model needs {want!r}")
    if "LlamaForCausalLM" not in (config.get("architectures") or []):
        raise _field_error(
            path, "architectures", f"is {config.get('architectures')!r}; expected LlamaForCausalLM"
        )


def _check_supported_values(config: dict, path: str | os.PathLike) -> None:
    """RoPE unscaled and consistent, a known dtype, and head_dim = hidden_size / heads."""
    if config.get("rope_scaling"):
        raise _field_error(path, "rope_scaling", "is set; scaled RoPE is not supported")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _field_error(
            path,
            "rope_parameters",
            f"has rope_type {rope['rope_type']!r}; only 'default' is supported",
        )
    if "rope_theta" in rope and rope["rope_theta"] != config["rope_theta"]:
        raise _field_error(
            path,
            "rope_theta",
            f"({config['rope_theta']}) disagrees with rope_parameters.rope_theta",
        )
    if config["torch_dtype"] not in HF_DTYPE_NAMES.values():
        raise _field_error(
            path,
            "torch_dtype",
            f"is {config['torch_dtype']!r}; expected one of {sorted(HF_DTYPE_NAMES.values())}",
        )
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if heads < 1 or hidden % heads or config["head_dim"] != hidden // heads:
        raise _field_error(
            path,
            "head_dim",
            f"is {config['head_dim']}; this model needs hidden_size / num_attention_heads",
        )


def model_config_from_hf(config: dict, path: str | os.PathLike = CONFIG) -> ModelConfig:
    """Our ``ModelConfig`` from a ``config.json`` dict; a missing or inconsistent field is named."""
    _check_field_types(config, path)
    _check_supported_values(config, path)
    cfg = ModelConfig(
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        d_model=config["hidden_size"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config["num_key_value_heads"],
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"],
        rope_theta=float(config["rope_theta"]),
        norm_eps=float(config["rms_norm_eps"]),
        tie_embeddings=config["tie_word_embeddings"],
        init_std=float(config.get("initializer_range", ModelConfig.init_std)),
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
