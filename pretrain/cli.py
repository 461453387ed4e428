"""The ``pretrain`` command: one subcommand per stage of the pipeline.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so ``pretrain --help`` is
fast and ``pretrain serve`` never imports the trainer. Subcommands that take config overrides
(``--section.key value``) set ``ACCEPTS_OVERRIDES = True``; the leftover arguments reach them as
``args.overrides``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pretrain.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("pretrain.data.cli", "tokenize raw text into checksummed token shards"),
    "train": ("pretrain.train", "pretrain a model (also under torchrun)"),
    "finetune": ("pretrain.finetune", "supervised fine-tuning from a checkpoint or an export"),
    "export": ("pretrain.export", "freeze a checkpoint into a Hugging Face Llama directory"),
    "serve": ("pretrain.serve.server", "serve an export over an OpenAI-compatible HTTP API"),
    "generate": ("pretrain.generate", "print a continuation of a prompt from an export"),
    "eval": ("pretrain.evaluate", "perplexity and multiple-choice accuracy on local task files"),
    "plot": ("pretrain.plot", "plot loss curves and throughput of a run"),
    "plan": ("pretrain.plan", "per-GPU memory, collectives and FLOPs of a config on N GPUs"),
}


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="LLM pretraining: prepare -> train -> export -> serve (and finetune).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, sub = _parser()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("pretrain"):
                    parser.exit(2, f"pretrain: error: '{name}' is not available in this version\n")
                raise
            module.add_arguments(p)
    if chosen is not None and chosen not in COMMANDS:
        parser.exit(
            2,
            f"pretrain: error: unknown command '{chosen}'; choose from {', '.join(COMMANDS)}\n",
        )
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.exit(
            2, f"pretrain {args.command}: error: unrecognized arguments: {' '.join(extra)}\n"
        )
    args.overrides = extra
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
