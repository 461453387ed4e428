"""Freeze a training checkpoint into a Hugging Face directory, and read one back safely.

``pretrain export runs/NAME --out models/NAME`` keeps the model weights of a checkpoint (however
many ranks wrote it) and writes the layout that transformers, and servers built on it, load as a
``LlamaForCausalLM`` (or the Mistral, Qwen2 or Qwen3 class, as :func:`pretrain.hf.export_family`
picks from the model's options)::

    config.json                   architecture and shapes (LlamaConfig fields)
    generation_config.json        bos/eos/pad token ids
    model.safetensors             weights under Llama's names (or model-0000i-of-0000n.safetensors
                                  shards and model.safetensors.index.json)
    tokenizer.json                the training tokenizer
    tokenizer_config.json         special tokens and the chat template
    checksums.sha256              SHA-256 of every file above (``sha256sum -c`` reads it)

What the layout is (file names, ``config.json`` fields, parameter names) is
:mod:`pretrain.hf`'s; reading the checkpoint is :mod:`pretrain.checkpoint`'s. This module does the
directory I/O: sharding, checksums, writing under a temporary name and renaming when complete,
and reading back through safetensors and JSON only (no pickle): :func:`load_export` refuses files
whose checksums disagree, naming them. :func:`load_model` gives a ready ``Transformer`` and
:func:`init_from` loads an export's or a checkpoint's weights into a model being trained.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from pretrain import lora
from pretrain.checkpoint import (
    check_fits_model,
    find_checkpoint,
    load_weights,
    meta_state_dict,
    read_checkpoint_config,
    read_model_weights,
    weights_to_load,
)
from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.hf import (
    CONFIG,
    GENERATION_CONFIG,
    METADATA_FILES,
    TOKENIZER,
    TOKENIZER_CONFIG,
    WEIGHTS,
    WEIGHTS_INDEX,
    export_family,
    from_hf_names,
    generation_config,
    hf_config,
    is_export_dir,
    read_export_config,
    read_json,
    to_hf_names,
    tokenizer_config,
)
from pretrain.initialize import copy_into_local, named_parameters
from pretrain.model import Transformer
from pretrain.tokenizer import (
    END_OF_TURN,
    EOS_TOKEN,
    SpecialTokens,
    load_tokenizer,
    read_special_tokens,
)

__all__ = [  # with the layout names of pretrain.hf that callers may still import from here
    "CONFIG",
    "GENERATION_CONFIG",
    "METADATA_FILES",
    "TOKENIZER",
    "TOKENIZER_CONFIG",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "from_hf_names",
    "hf_config",
    "init_from",
    "load_export",
    "load_model",
    "read_checkpoint_config",
    "read_export_config",
    "resolve_checkpoint",
    "save_export",
    "to_hf_names",
    "verify_export",
    "write_export",
]

CHECKSUMS = "checksums.sha256"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "2GB"


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory meant by ``path`` (a step dir, a run's ``checkpoints/`` or the run dir,
    the last two through ``latest``), after checking that it holds what an export needs."""
    step_dir = find_checkpoint(path)
    missing = [name for name in ("config.toml", TOKENIZER) if not (step_dir / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {step_dir} is incomplete: missing {', '.join(missing)}")
    return step_dir


# --------------------------------------------------------------------------- tokens


def _special_token_ids(tokenizer) -> tuple[int, int | None]:
    """(end-of-text id, end-of-turn id or None) of a ``tokenizers.Tokenizer`` of ours."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise UserError(
            f"the tokenizer has no {EOS_TOKEN} token and no tokenizer_config.json beside it "
            'names its end-of-text token: add "eos_token" there, or train it with pretrain prepare'
        )
    return eos, tokenizer.token_to_id(END_OF_TURN)


def _special_tokens(tokenizer, source_dir: Path | None) -> SpecialTokens:
    """The special tokens to export: those of the tokenizer's directory (a checkpoint, export or
    Hugging Face directory), or the project's own for a bare tokenizer."""
    if source_dir is not None:
        return read_special_tokens(source_dir, tokenizer)
    _special_token_ids(tokenizer)
    return SpecialTokens()


def _token_metadata(
    cfg: ModelConfig, torch_dtype: torch.dtype, tokenizer, special: SpecialTokens
) -> tuple[dict, dict, dict]:
    """``config.json``, ``generation_config.json`` and ``tokenizer_config.json`` with the
    model's own special tokens and template (the project's layout for the project's tokens)."""
    eos_id = special.eos_id(tokenizer)
    config = hf_config(cfg, torch_dtype, eos_id)
    tok_config = tokenizer_config(cfg)
    if special.is_own:
        return config, generation_config(eos_id, tokenizer.token_to_id(END_OF_TURN)), tok_config
    bos_id, stops = special.bos_id(tokenizer), special.all_stop_ids(tokenizer)
    config["bos_token_id"] = bos_id
    gen = {
        "bos_token_id": bos_id,
        "eos_token_id": stops if len(stops) > 1 else eos_id,
        "pad_token_id": special.pad_id(tokenizer),
    }
    for key, token in (("bos_token", special.bos), ("eos_token", special.eos)):
        tok_config[key] = token
    tok_config["pad_token"] = special.pad
    tok_config["add_bos_token"] = special.add_bos
    tok_config["chat_template"] = special.chat_template
    return config, {k: v for k, v in gen.items() if v is not None}, tok_config


# --------------------------------------------------------------------------- weights


def parse_size(text: str) -> int:
    """Bytes in ``'2GB'``, ``'500MB'``, ``'1.5GiB'`` or a plain number (decimal units as HF's)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise UserError(f"cannot read the size {text!r}: write it like 2GB, 500MB or 1GiB")
    number, unit = float(m.group(1)), m.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = int(number * scale[unit])
    if size < 1:
        raise UserError(f"the shard size {text!r} must be positive")
    return size


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most ``max_bytes`` each (a bigger tensor goes alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    """``model.safetensors``, or numbered shards and their index when over ``max_bytes``."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / WEIGHTS_INDEX, index)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (with a progress bar for big files on a tty)."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    show = sys.stderr.isatty() and size > 256 * 2**20
    with (
        open(path, "rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not show
        ) as bar,
    ):
        while block := f.read(4 * 2**20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _write_checksums(out: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(out.iterdir()) if p.name != CHECKSUMS]
    (out / CHECKSUMS).write_text("".join(lines))


def _read_checksums(export_dir: Path) -> dict[str, str]:
    path = export_dir / CHECKSUMS
    if not path.is_file():
        raise UserError(
            f"{path} is missing: {export_dir} is not a complete export (write one with pretrain export)"
        )
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line.strip())
        if not m or m.group(2) in (".", ".."):
            raise UserError(f"{path}: line {n} is not '<sha256>  <file name>': {line!r}")
        sums[m.group(2)] = m.group(1)
    return sums


def _weight_files(export_dir: Path) -> list[str]:
    """The safetensors files of an export: those of the index, or the single file."""
    index = export_dir / WEIGHTS_INDEX
    if not index.is_file():
        return [WEIGHTS]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: 'weight_map' is missing or empty")
    return sorted(set(weight_map.values()))


def is_foreign_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face directory written elsewhere (``save_pretrained``, the
    hub): a ``config.json`` and weights but no ``checksums.sha256``, so nothing to verify against."""
    return is_export_dir(path) and not (Path(path) / CHECKSUMS).exists()


def verify_export(export_dir: str | os.PathLike) -> None:
    """Check every file of an export against ``checksums.sha256``; name each bad or missing one.

    A foreign Hugging Face directory (:func:`is_foreign_dir`) has no checksums: it is accepted
    with a note on stderr saying that its files are read unverified.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"export not found: {export_dir}")
    if is_foreign_dir(export_dir):
        print(
            f"{export_dir}: a Hugging Face directory without {CHECKSUMS}; its files are read "
            "unverified",
            file=sys.stderr,
            flush=True,
        )
        return
    sums = _read_checksums(export_dir)
    problems = []
    for name in METADATA_FILES + (
        WEIGHTS_INDEX if (export_dir / WEIGHTS_INDEX).exists() else WEIGHTS,
    ):
        if name not in sums:
            problems.append(f"{name} is not listed in {CHECKSUMS}")
    for name, want in sums.items():
        path = export_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != want:
            problems.append(f"{name} fails its checksum (damaged or modified)")
    if not problems and (export_dir / WEIGHTS_INDEX).exists():
        problems += [
            f"{n} is not listed in {CHECKSUMS}" for n in _weight_files(export_dir) if n not in sums
        ]
    if problems:
        raise UserError(
            f"export {export_dir} is damaged: {'; '.join(problems)}. Export it again from its checkpoint"
        )


# --------------------------------------------------------------------------- writing


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``, replacing a previous export only when allowed."""
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse early to replace anything but an earlier export (never an arbitrary directory)."""
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if any(out.iterdir()) and not (out / CHECKSUMS).is_file():
        raise UserError(f"refusing to replace {out}: it is not an export (no {CHECKSUMS})")


def write_export(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    special_tokens: SpecialTokens | None = None,
) -> Path:
    """Write an export of weights in our names; ``tokenizer`` is a path or a ``Tokenizer``.

    The special tokens and chat template are ``special_tokens``, else those named beside a
    tokenizer path (:func:`pretrain.tokenizer.read_special_tokens`), else the project's own.
    """
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    export_family(cfg)  # a combination of options no Hugging Face architecture has stops here
    torch_dtype = DTYPES[dtype]
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if not isinstance(tokenizer, (str, os.PathLike)):
        tok_obj, source_dir = tokenizer, None
    else:
        tok_obj, source_dir = load_tokenizer(tokenizer), Path(tokenizer).parent
    special = special_tokens or _special_tokens(tok_obj, source_dir)
    config, gen_config, tok_config = _token_metadata(cfg, DTYPES[dtype], tok_obj, special)
    if tok_obj.get_vocab_size() > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok_obj.get_vocab_size()} tokens but the model only "
            f"{cfg.vocab_size} embeddings"
        )
    _check_out_dir(out, overwrite)
    tensors = {
        name: t.detach().to(device="cpu", dtype=torch_dtype).contiguous()
        for name, t in to_hf_names(state_dict, cfg.tie_embeddings).items()
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(tensors, tmp, max_bytes)
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / GENERATION_CONFIG, gen_config)
        _write_json(tmp / TOKENIZER_CONFIG, tok_config)
        tok_obj.save(str(tmp / TOKENIZER))
        _write_checksums(tmp)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_export(
    model,
    tokenizer_path_or_obj,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export an (unsharded) ``Transformer`` with its tokenizer; returns the export directory."""
    return write_export(
        model.config,
        model.state_dict(),
        tokenizer_path_or_obj,
        out_dir,
        dtype=dtype,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )


# --------------------------------------------------------------------------- reading


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is damaged and cannot be read ({e}); export it again") from None


def load_export(
    export_dir: str | os.PathLike, *, verify: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """``(ModelConfig, state dict in our names, tokenizers.Tokenizer)`` of an export.

    With ``verify`` (the default) every file is first checked against its checksum (a foreign
    Hugging Face directory has none: see :func:`verify_export`). The tensors keep the export's
    dtype; their names and shapes are checked against ``config.json``.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"export not found: {export_dir}")
    if verify:
        verify_export(export_dir)
    cfg = read_export_config(export_dir)
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name in _weight_files(export_dir):
        for key, t in _load_safetensors(export_dir / name).items():
            tensors[key] = t
            source[key] = name
    expected = to_hf_names(meta_state_dict(cfg), cfg.tie_embeddings)
    problems = [f"{k} is missing" for k in expected if k not in tensors]
    problems += [
        f"{k} (in {source[k]}) is not a weight of this model" for k in tensors if k not in expected
    ]
    problems += [
        f"{k} (in {source[k]}) has shape {tuple(tensors[k].shape)}, {CONFIG} wants {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems and cfg.head_dim_override:
        problems.append(
            f"{CONFIG} field 'head_dim' is {cfg.head_dim} (hidden_size / num_attention_heads is "
            f"{cfg.d_model // cfg.n_heads})"
        )
    if problems:
        raise UserError(f"export {export_dir} does not match its {CONFIG}: {'; '.join(problems)}")
    return (
        cfg,
        from_hf_names(tensors, cfg.tie_embeddings),
        load_tokenizer(tokenizer_file(export_dir)),
    )


def tokenizer_file(model_dir: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` of an export or Hugging Face directory; missing, a UserError."""
    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise UserError(
            f"{model_dir} has no {TOKENIZER}: the model's tokenizer must sit beside its weights "
            "(in transformers: AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
    return path


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A ``Transformer`` in eval mode from an export directory, after checking its checksums.

    ``dtype`` None keeps the export's dtype. Only safetensors and JSON are read, no pickle.
    """
    cfg, state_dict, _ = load_export(path, verify=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    state_dict = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def init_from(path: str | os.PathLike, model) -> None:
    """Initialise ``model`` (sharded or not) from the weights of an export or a checkpoint
    (``checkpoint.init_from``): weights only, no optimizer or data state."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint.init_from: {p} does not exist")
    if not is_export_dir(p):
        load_weights(p, model)  # DCP: each rank reads its own shards
        return
    verify_export(p)
    _load_export_shards(p, model)


def _export_slices(export_dir: Path, cfg: ModelConfig) -> dict[str, tuple[Path, str, tuple]]:
    """Our parameter name -> (safetensors file, its key there, shape) of every weight of an
    export, checked against ``config.json`` as :func:`load_export` does, without reading one."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[Path, str, tuple]] = {}
    for name in _weight_files(export_dir):
        path = export_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    found[key] = (path, key, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(
                f"{path} is damaged and cannot be read ({e}); export it again"
            ) from None
    expected = to_hf_names(meta_state_dict(cfg), cfg.tie_embeddings)
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [
        f"{k} (in {found[k][0].name}) is not a weight of this model"
        for k in found
        if k not in expected
    ]
    problems += [
        f"{k} (in {found[k][0].name}) has shape {found[k][2]}, {CONFIG} wants {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k][2] != tuple(v.shape)
    ]
    if problems:
        raise UserError(f"export {export_dir} does not match its {CONFIG}: {'; '.join(problems)}")
    return from_hf_names(found, cfg.tie_embeddings)


def _load_export_shards(export_dir: Path, model) -> None:
    """The export's weights into ``model`` (sharded or not): each rank reads only the rows and
    columns of its own shards from the safetensors files (``safe_open(...).get_slice``)."""
    from safetensors import safe_open

    slices = _export_slices(export_dir, read_export_config(export_dir))
    targets = weights_to_load(model)  # under LoRA only the frozen base
    check_fits_model(f"export {export_dir}", {k: v[2] for k, v in slices.items()}, targets)
    with contextlib.ExitStack() as stack:
        files: dict[Path, object] = {}
        for name, param in named_parameters(model):  # a tied head is the embedding, read once
            if name not in targets:
                continue
            path, key, _ = slices[name]
            if path not in files:
                files[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            weight = files[path].get_slice(key)
            copy_into_local(
                param, lambda rows, cols, w=weight: w[rows] if cols is None else w[rows, cols]
            )


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a step directory, a run's checkpoints/ directory or a run directory (uses latest)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="weight dtype (default fp32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument(
        "--lora-only",
        action="store_true",
        help="a LoRA checkpoint: write its adapters in PEFT's format instead of merging them",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"split weights into safetensors shards of at most SIZE (default {DEFAULT_MAX_SHARD_SIZE})",
    )


def _describe(out: Path) -> str:
    files = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
    size = sum(p.stat().st_size for p in files)
    return f"{len(files)} safetensors file{'s' if len(files) > 1 else ''}, {size / 1e6:.1f} MB"


def _export_peft_adapter(step_dir: Path, out: Path, dtype: str) -> int:
    """``--lora-only``: the adapters as a PEFT adapter directory, for the base they were trained on."""
    if not lora.is_adapter_checkpoint(step_dir):
        raise UserError(f"--lora-only: {step_dir} is not a LoRA checkpoint (finetune.lora.rank 0)")
    lora.write_peft_adapter(step_dir, out, dtype=DTYPES[dtype])
    print(f"exported the LoRA adapters of {step_dir} in PEFT format to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    step_dir = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    _check_out_dir(out, args.overwrite)
    parse_size(args.max_shard_size)
    export_family(read_checkpoint_config(step_dir))  # before reading any weights
    print(f"reading {step_dir}", flush=True)
    if args.lora_only or lora.is_adapter_checkpoint(step_dir):
        if args.lora_only:
            return _export_peft_adapter(step_dir, out, args.dtype)
        config, state_dict = lora.merged_weights(step_dir, init_from)  # adapters into the base
        cfg = config.model
    else:
        cfg, state_dict = read_model_weights(step_dir)
    n_params = sum(
        t.numel()
        for n, t in state_dict.items()
        if not (cfg.tie_embeddings and n.startswith("lm_head."))
    )
    write_export(
        cfg,
        state_dict,
        step_dir / TOKENIZER,
        out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"exported {n_params / 1e6:.2f}M parameters ({args.dtype}) to {out}: {_describe(out)}")
    return 0
