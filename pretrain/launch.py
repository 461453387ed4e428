"""torchrun whose agent takes preemption signals calmly: ``python -m pretrain.launch [torchrun args]``.

The arguments are torchrun's own (``--standalone --nproc_per_node 8 -m pretrain.train ...``).
Run plainly, the torchrun agent answers a SIGTERM by stopping its workers and then dying with a
``SignalException`` traceback, and a SIGUSR1 (Slurm's usual warning signal) kills the agent at
once and leaves the workers training unsupervised. Here the agent handles SIGUSR1 like SIGTERM:
it passes the signal to every worker, which finishes its step, saves a checkpoint, writes
``status.json`` ("preempted") and exits; then this process prints one line and exits with
128 + the signal number. The run directory's ``status.json`` says whether the save happened.

Workers get ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default here 300, torchrun's own is 30)
to save before the agent kills them; set it above the time one checkpoint takes.
"""

from __future__ import annotations

import os
import signal
import sys

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = "300"


def _with_signals_handled(argv: list[str]) -> list[str]:
    """``argv`` with SIGUSR1 among the signals the agent handles, unless the caller chose.

    Newer torchrun takes them as ``--signals-to-handle`` (which overrides the environment);
    older ones read ``TORCHELASTIC_SIGNALS_TO_HANDLE`` only.
    """
    from torch.distributed.run import get_args_parser

    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", HANDLED_SIGNALS)
    flags = {s for a in get_args_parser()._actions for s in a.option_strings}
    chosen = any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv)
    if "--signals-to-handle" in flags and not chosen:
        return [f"--signals-to-handle={os.environ['TORCHELASTIC_SIGNALS_TO_HANDLE']}", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(_with_signals_handled(sys.argv[1:] if argv is None else argv))
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(
            f"pretrain.launch: {name}: passed to every training process, which saves a "
            "checkpoint and stops; the run directory's status.json says whether it did",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
