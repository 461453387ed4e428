"""``pretrain finetune``: supervised fine-tuning with the pretraining loop and a chat data path.

    pretrain finetune --init-from runs/tiny --data rows.jsonl --out runs/tiny-sft
    torchrun --nproc_per_node=8 -m pretrain.finetune --init-from models/tiny --data rows.jsonl ...

The run is an ordinary training run of :func:`pretrain.train.train` -- torchrun, FSDP2,
checkpoints, resume (``--checkpoint.resume auto``), metrics and wandb are the trainer's -- with
three differences:

- the weights start from ``--init-from``, a checkpoint (step directory or run directory) or an
  export, and so does the model shape: it is read from the checkpoint's ``config.toml`` or the
  export's ``config.json``, and a ``[model]`` key of the config or a ``--model.*`` override that
  disagrees with it is an error;
- the batches come from a JSONL file of prompt/completion or chat rows (:mod:`pretrain.sft`):
  rendered with the chat template, loss on the assistant's tokens only, packed into rows with
  per-conversation attention, a held-out validation split;
- the length is ``finetune.epochs`` passes over the data, unless that is 0 (then ``train.steps``).

``--finetune.lora.rank R`` trains low-rank adapters on a frozen base instead of every weight
(:mod:`pretrain.lora`); its checkpoints hold the adapters and a pointer to the init.

The result is a normal checkpoint, with the init's tokenizer: ``pretrain export`` and
``pretrain serve`` take it as they take a pretraining run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain import lora
from pretrain.checkpoint import find_checkpoint
from pretrain.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_help,
    load_config,
    parse_overrides,
)
from pretrain.errors import UserError
from pretrain.export import tokenizer_file
from pretrain.hf import CONFIG, read_export_config
from pretrain.parallel import DistInfo
from pretrain.sft import (
    ChatTemplate,
    Document,
    SFTLoader,
    describe_read,
    fit_to_context,
    read_jsonl,
    split_train_val,
    tokenize_conversations,
)
from pretrain.tokenizer import SpecialTokens, load_tokenizer, read_special_tokens
from pretrain.train import TrainData, TrainResult, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ACCEPTS_OVERRIDES = True
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sft-tiny.toml"
# Keys that describe behaviour, not the weights: they may differ from the init's.
NOT_SHAPE = ("doc_mask", "init_std", "zero_init_residual")


# --------------------------------------------------------------------------- the init model


@dataclass
class InitSource:
    """What fine-tuning starts from: the weights' location, their shape, tokenizer and template."""

    path: Path  # as given; the trainer loads the weights from it
    kind: str  # "checkpoint" | "export"
    model: ModelConfig
    tokenizer_path: Path
    chat_template: str
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)


def read_init(path: str | os.PathLike) -> InitSource:
    """Read the shape, tokenizer and chat template of a checkpoint, an export or a Hugging Face
    directory (Llama, Mistral, Qwen2, Qwen3: see :mod:`pretrain.hf`)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--init-from {p} does not exist: give a checkpoint, a run or an export")
    if (p / CONFIG).is_file():
        model = read_export_config(p)
        tokenizer = tokenizer_file(p)
        tokens = _special_tokens(tokenizer)
        return InitSource(p, "export", model, tokenizer, tokens.chat_template, tokens)
    step_dir = find_checkpoint(p)
    config_path = step_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"checkpoint {step_dir} has no config.toml: its model shape is unknown")
    model = load_config(config_path).model
    tok_path = step_dir / "tokenizer.json"
    tokens = _special_tokens(tok_path) if tok_path.is_file() else SpecialTokens()
    return InitSource(p, "checkpoint", model, tok_path, tokens.chat_template, tokens)


def _special_tokens(tokenizer_path: Path) -> SpecialTokens:
    """The special tokens and template named beside a tokenizer (the project's when none are)."""
    return read_special_tokens(tokenizer_path.parent, load_tokenizer(tokenizer_path))


def explicit_model_keys(config_path: Path | None, overrides: list[tuple[str, str]]) -> list[str]:
    """The ``model.*`` keys that the config file or the command line set."""
    keys: list[str] = []
    if config_path is not None and config_path.is_file():
        data = tomllib.loads(config_path.read_text())
        keys += [f"model.{k}" for k in data.get("model", {})]
    keys += [k for k, _ in overrides if k.startswith("model.")]
    return keys


def adopt_init_shape(config: Config, init: InitSource, explicit: list[str]) -> None:
    """Give ``config`` the init's model shape; an explicit key that disagrees is an error."""
    given, wanted = asdict(config.model), asdict(init.model)
    for key in dict.fromkeys(explicit):
        name = key.split(".", 1)[1]
        if name in NOT_SHAPE:
            continue
        if name in ("ffn_hidden", "ffn_multiple_of"):
            same = config.model.ffn_dim == init.model.ffn_dim
            shown = (f"gives an MLP width of {config.model.ffn_dim}", init.model.ffn_dim)
        else:
            same = given[name] == wanted[name]
            shown = (f"= {given[name]!r}", wanted[name])
        if not same:
            raise ConfigError(
                f"{key} {shown[0]} but the init {init.kind} {init.path} has {shown[1]!r}: the "
                "model shape comes from --init-from; drop the key or make it agree"
            )
    config.model = ModelConfig(**wanted)


# --------------------------------------------------------------------------- the data


@dataclass
class SFTData:
    train_docs: list[Document]
    val_docs: list[Document]
    pad_id: int
    summary: dict[str, Any]


def prepare_data(config: Config, init: InitSource) -> SFTData:
    """Read, render, tokenize, split and fit the fine-tuning rows; count what was cut or skipped."""
    ft = config.finetune
    tokenizer = load_tokenizer(init.tokenizer_path)
    if tokenizer.get_vocab_size() > config.model.vocab_size:
        raise UserError(
            f"the tokenizer of {init.path} has {tokenizer.get_vocab_size()} tokens but the model "
            f"only {config.model.vocab_size}: they do not belong together"
        )
    template = ChatTemplate(init.chat_template, variables=init.special_tokens.template_variables())
    convs, read = read_jsonl(ft.data, skip_bad_rows=ft.skip_bad_rows)
    summary: dict[str, Any] = {"data": ft.data, "rows": read.rows, "skipped": dict(read.skipped)}
    lines = [describe_read(ft.data, read)]
    for where in read.first_skipped:
        lines.append(f"  skipped {where}")
    if ft.val_data:
        val_convs, val_read = read_jsonl(ft.val_data, skip_bad_rows=ft.skip_bad_rows)
        lines.append(describe_read(ft.val_data, val_read))
        summary["val_skipped"] = dict(val_read.skipped)
    else:
        train_idx, val_idx = split_train_val(len(convs), ft.val_fraction, config.train.seed)
        val_convs = [convs[i] for i in val_idx]
        convs = [convs[i] for i in train_idx]
    seq_len = config.data.seq_len
    train_docs, train_fit = fit_to_context(
        tokenize_conversations(convs, tokenizer, template), seq_len
    )
    val_docs, val_fit = fit_to_context(
        tokenize_conversations(val_convs, tokenizer, template), seq_len
    )
    lines.append(f"train: {train_fit.describe(seq_len)}")
    lines.append(f"val: {val_fit.describe(seq_len)}" if val_convs else "val: none")
    if not train_docs:
        raise UserError(f"{ft.data}: no training example is left (see the counts above)")
    summary.update(
        train=asdict(train_fit), val=asdict(val_fit), seq_len=seq_len, report="\n".join(lines)
    )
    return SFTData(train_docs, val_docs, init.special_tokens.pad_id(tokenizer), summary)


def loader_factory(config: Config, docs: list[Document], pad_id: int, *, train: bool):
    """A ``make_*_loader(rank, world_size)`` for the trainer; validation is unshuffled."""

    def make(rank: int, world_size: int) -> SFTLoader:
        return SFTLoader(
            docs,
            seq_len=config.data.seq_len,
            global_batch_size=config.train.global_batch_size,
            rank=rank,
            world_size=world_size,
            seed=config.train.seed,
            shuffle=train,
            packing=config.finetune.packing,
            pad_id=pad_id,
        )

    return make


# --------------------------------------------------------------------------- the run


def build_config(
    config_path: str | None, overrides: list[tuple[str, str]], init: InitSource
) -> tuple[Config, SFTData]:
    """The resolved config of a fine-tuning run, with its data: the model shape of the init,
    then the length, which follows from the data (see :func:`fit_length_to_data`)."""
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    if config_path is None and not path.is_file():
        path = None  # an installed package without the repo's configs/: built-in defaults
    config = load_config(path, overrides)
    adopt_init_shape(config, init, explicit_model_keys(path, overrides))
    config.model.doc_mask = config.finetune.packing
    if any(key == "train.steps" for key, _ in overrides):
        config.finetune.epochs = 0  # a length given on the command line wins over the recipe's
    config.checkpoint.init_from = str(init.path)
    if config.data.seq_len > config.model.max_seq_len:
        config.data.seq_len = config.model.max_seq_len
    if not config.finetune.data:
        raise UserError("no fine-tuning data: pass --data FILE.jsonl")
    data = prepare_data(config, init)
    fit_length_to_data(config, data)
    return config, data


def fit_length_to_data(config: Config, data: SFTData) -> None:
    """``train.steps`` from ``finetune.epochs`` passes over the packed rows (unless epochs is 0),
    and no more evaluation batches than the val split holds; the counts go into the summary."""
    batch = config.train.global_batch_size
    rows = loader_factory(config, data.train_docs, data.pad_id, train=True)(0, 1).rows_per_epoch()
    if config.finetune.epochs > 0:
        config.train.steps = max(1, math.ceil(config.finetune.epochs * rows / batch))
    if data.val_docs:
        val = loader_factory(config, data.val_docs, data.pad_id, train=False)
        config.eval.batches = min(
            config.eval.batches, math.ceil(val(0, 1).rows_per_epoch() / batch)
        )
    data.summary.update(rows_per_epoch=rows, steps=config.train.steps)


def sft_train_data(config: Config, data: SFTData, init: InitSource, out_dir: Path) -> TrainData:
    """The trainer's data source for fine-tuning: SFT loaders, no bits per byte (rows are
    conversations, not text), the init's tokenizer, and the data report written by the main
    rank into the locked run directory."""

    def report(dist_info: DistInfo) -> None:
        if dist_info.is_main:
            print(data.summary["report"], flush=True)
            print(_length_line(config, data.summary["rows_per_epoch"]), flush=True)
            if config.finetune.lora.rank > 0:
                print(lora.describe(config.model, config.finetune.lora), flush=True)
            _write_summary(out_dir, data.summary)

    return TrainData(
        make_train=loader_factory(config, data.train_docs, data.pad_id, train=True),
        make_val=(
            loader_factory(config, data.val_docs, data.pad_id, train=False)
            if data.val_docs
            else None
        ),
        bytes_per_token=None,
        tokenizer_path=init.tokenizer_path,
        on_start=report,
    )


def _length_line(config: Config, rows: int) -> str:
    t = config.train
    if not config.finetune.packing:
        return f"{rows} rows per epoch: {t.steps} steps"
    return (
        f"{rows} packed rows per epoch of {t.global_batch_size} per step: "
        f"{t.steps} steps ({t.steps * t.global_batch_size / rows:.2f} epochs)"
    )


def finetune(
    config: Config,
    out_dir: str | Path,
    init: InitSource | None = None,
    data: SFTData | None = None,
) -> TrainResult:
    """Fine-tune as ``config`` says (``finetune.data``, ``checkpoint.init_from``) into ``out_dir``.

    ``config`` and ``data`` are :func:`build_config`'s; a config built otherwise has its data
    read and its length fitted to it here.
    """
    init = init or read_init(config.checkpoint.init_from)
    if data is None:
        if not config.finetune.data:
            raise UserError("no fine-tuning data: pass --data FILE.jsonl")
        data = prepare_data(config, init)
        fit_length_to_data(config, data)
    return train(config, out_dir, sft_train_data(config, data, init, Path(out_dir)))


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """``finetune_data.json``: what was read, skipped, cut and dropped (written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "finetune_data.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init-from",
        required=True,
        metavar="DIR",
        help="checkpoint (step or run directory) or export to start from; gives the model shape",
    )
    parser.add_argument(
        "--data", default=None, metavar="FILE", help="JSONL rows (sets finetune.data)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory")
    parser.add_argument(
        "--config",
        default=None,
        help=f"TOML recipe (default: {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name})",
    )
    parser.add_argument(
        "--val-data", default=None, metavar="FILE", help="JSONL validation rows (finetune.val_data)"
    )
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip and count malformed rows instead of stopping at the first",
    )
    parser.epilog = (
        'rows: {"prompt": ..., "completion": ...} or {"messages": [{"role": '
        '"system"|"user"|"assistant", "content": ...}, ...]}\n\n' + config_help()
    )


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(list(args.overrides or []))
    if args.data is not None:
        overrides.append(("finetune.data", args.data))
    if args.val_data is not None:
        overrides.append(("finetune.val_data", args.val_data))
    if args.skip_bad_rows:
        overrides.append(("finetune.skip_bad_rows", "true"))
    init = read_init(args.init_from)
    config, data = build_config(args.config, overrides, init)
    finetune(config, args.out, init, data)
    return 0


if __name__ == "__main__":
    # ``torchrun -m pretrain.finetune ...`` enters here: the ``pretrain finetune`` command.
    from pretrain.cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
