"""torchrun for clusters: ``python -m pretrain.launch [launch options] [torchrun args]``.

The arguments are torchrun's own (``--nnodes 4 --nproc_per_node 8 --max-restarts 3
--rdzv-backend c10d --rdzv-endpoint HOST -m pretrain.train ...``), with these additions:

Signals. Run plainly, the torchrun agent answers a SIGTERM by stopping its workers and then dying
with a ``SignalException`` traceback, and a SIGUSR1 (Slurm's usual warning signal) kills the agent
at once and leaves the workers training unsupervised. Here the agent handles SIGUSR1 like SIGTERM:
it passes the signal to every worker, which finishes its step, saves a checkpoint, writes
``status.json`` ("preempted") and exits; then this process prints one line and exits with
128 + the signal number. Workers get ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default here
300, torchrun's own is 30) to save before the agent kills them; set it above the time one
checkpoint takes.

Restarts. With torchrun's ``--max-restarts N`` a failed worker (a crash, a lost GPU, an NCCL
timeout) makes the agent stop the others and start them all again, up to N times (counted per
agent). A restarted trainer sees ``TORCHELASTIC_RESTART_COUNT`` > 0 and resumes from the latest
checkpoint of its ``--out`` as if given ``--checkpoint.resume auto`` (pretrain/train.py); a
first start is unchanged. A worker that was preempted exits 0 and is not restarted. Each
attempt gets a fresh process-group store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``; see
:func:`apply_worker_env`).

The rendezvous port. ``--rdzv-endpoint HOST`` without a port gets the job's own port,
:func:`rendezvous_port` of the job id: ``--job-id`` if given, else ``$SLURM_JOB_ID``, else the
``--rdzv-id``. Numeric ids map to 20000 + id mod 9000, others to 20000 + crc32(id) mod 9000, so
every node of a job computes the same port and two jobs sharing a node get different ones
unless their ids differ by a multiple of 9000 (ports 20000-28999 lie below Linux's ephemeral
range, where an outgoing connection could hold them, and below torchrun's 29400/29500). A port
in the endpoint (``HOST:PORT``) is used as given. ``--standalone`` needs none: torchrun picks a
free one itself. ``python -m pretrain.launch --print-port [--job-id ID]`` prints the port.

The environment. Each variable of :data:`WORKER_ENV` is set for the workers unless already set
(a value exported before the launch wins); ``--dist-timeout SECONDS`` sets
``PRETRAIN_DIST_TIMEOUT``, the timeout of every collective of the trainer's process group
(``init_process_group(timeout=...)``; torch's default is 10 minutes for NCCL, 30 for gloo):
raise it when a checkpoint save or the first step's compilation keeps some ranks away longer.
The network interfaces are the cluster's own (:data:`INTERFACE_HINTS`: ``NCCL_SOCKET_IFNAME``,
``NCCL_IB_HCA``, ``GLOO_SOCKET_IFNAME``) and get no default. ``--print-env`` prints all of these
as the workers would see them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import zlib

from pretrain.errors import UserError
from pretrain.parallel import DIST_TIMEOUT_ENV, dist_timeout

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = "300"
PORT_BASE, PORT_SPAN = 20000, 9000

# Set for the workers unless the environment already has them.
WORKER_ENV = {
    # A failed or timed-out collective tears the process down (3: without aborting the
    # communicator first, torch's own default, pinned here against a cluster's 0, with which
    # a lost rank leaves the others hanging): the agent sees the failure and can restart.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # On a collective timeout each rank dumps its last collectives (the flight recorder) to
    # TORCH_NCCL_DEBUG_INFO_TEMP_FILE, naming the rank that did not arrive.
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    # Less memory fragmentation for the allocator under FSDP2's all-gathers.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    # One thread per rank for CPU ops: eight ranks with one OpenMP pool per core would thrash.
    "OMP_NUM_THREADS": "1",
}

# The cluster's own names, with no default here: export them before the launch when NCCL or gloo
# picks the wrong network interface (NCCL_DEBUG=INFO prints the one it took).
INTERFACE_HINTS = {
    "NCCL_SOCKET_IFNAME": "NCCL's bootstrap and socket traffic, e.g. ib0, or ^lo,docker to exclude",
    "NCCL_IB_HCA": "the InfiniBand adapters NCCL may use, e.g. mlx5 (a prefix)",
    "GLOO_SOCKET_IFNAME": "the interface of gloo's CPU collectives, e.g. ib0 or eth0",
}


def rendezvous_port(job_id: str) -> int:
    """The job's rendezvous port: the same on every node of the job, different between jobs.

    Numeric ids (Slurm's; PBS's ``1234.server`` is read as 1234) map to consecutive ports;
    any other id (``12345_7`` of a Slurm array task too) to a CRC-32 of it, which unlike
    ``hash()`` is the same in every Python process, so every node computes the same port.
    """
    job_id = job_id.strip()
    if not job_id:
        raise UserError("the job id is empty; give --job-id ID or a port in --rdzv-endpoint")
    head = job_id.split(".")[0]
    offset = int(head) if head.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + offset % PORT_SPAN


def _launch_options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.launch", add_help=False,
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("--job-id", default=None)
    p.add_argument("--dist-timeout", default=None)
    p.add_argument("--print-port", action="store_true")
    p.add_argument("--print-env", action="store_true")
    return p


def _program_start(argv: list[str]) -> int:
    """Where the training program (``-m MODULE`` or ``script.py``) and its arguments begin."""
    for i, a in enumerate(argv):
        if a in ("-m", "--module", "--no-python", "--no_python") or a.endswith(".py"):
            return i
    return len(argv)


def _option_value(argv: list[str], *names: str) -> tuple[int, str] | None:
    """(index, value) of the last ``--name value`` / ``--name=value`` among ``argv``."""
    found = None
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in names:
            if eq:
                found = (i, value)
            elif i + 1 < len(argv):
                found = (i + 1, argv[i + 1])
    return found


def _job_id(explicit: str | None, torchrun_args: list[str]) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    rdzv_id = _option_value(torchrun_args, "--rdzv-id", "--rdzv_id")
    return rdzv_id[1] if rdzv_id and rdzv_id[1] != "none" else None


def _with_job_port(torchrun_args: list[str], job_id: str | None) -> list[str]:
    """The arguments with the job's port added to an ``--rdzv-endpoint`` that names none."""
    endpoint = _option_value(torchrun_args, "--rdzv-endpoint", "--rdzv_endpoint")
    if endpoint is None or job_id is None:
        return torchrun_args
    i, value = endpoint
    if not value or re.fullmatch(r".*:\d+", value):  # "HOST:PORT", "[v6::1]:PORT"
        return torchrun_args
    args = list(torchrun_args)
    port = rendezvous_port(job_id)
    args[i] = f"{args[i]}:{port}" if args[i] == value else f"{args[i].split('=')[0]}={value}:{port}"
    return args


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


def torchrun_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's own options and the arguments left for torchrun (job port filled in).

    Only the part before the training program is read: everything after ``-m MODULE`` belongs
    to the program.
    """
    start = _program_start(argv)
    own, rest = _launch_options_parser().parse_known_args(argv[:start])
    rest = _with_job_port(rest, _job_id(own.job_id, rest))
    return own, rest + argv[start:]


def _max_restarts(torchrun_args: list[str]) -> int:
    found = _option_value(torchrun_args, "--max-restarts", "--max_restarts")
    return int(found[1]) if found and found[1].isdigit() else 0


def apply_worker_env(timeout: str | None, max_restarts: int = 0) -> None:
    """Set :data:`WORKER_ENV` (where unset) and the collective timeout for the workers.

    With restarts, every attempt gets a store of its own: torchrun's default shares the
    agent's rendezvous store across attempts, where a restarted rank can read the address its
    dead predecessor published and fail to connect (pytorch/pytorch#135712).
    """
    if timeout is not None:
        dist_timeout(timeout)  # refused here, before any process starts
        os.environ[DIST_TIMEOUT_ENV] = timeout
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    if max_restarts > 0:
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)


def worker_env_lines() -> list[str]:
    """``NAME=value`` of every variable this launcher sets or hints at, as the workers would
    see them now (``--print-env``): what to check first when ranks cannot find each other."""
    lines = [f"{n}={os.environ.get(n, v)}" for n, v in WORKER_ENV.items()]
    lines.append(
        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', SHUTDOWN_TIMEOUT_S)}"
    )
    lines.append(
        f"{DIST_TIMEOUT_ENV}={os.environ.get(DIST_TIMEOUT_ENV, '')}  # --dist-timeout; empty: torch's"
    )
    for name, what in INTERFACE_HINTS.items():
        lines.append(f"{name}={os.environ.get(name, '')}  # {what}")
    return lines


OWN_OPTIONS_HELP = """\
python -m pretrain.launch [launch options] [torchrun options] -m pretrain.train [trainer args]

launch options (before the training program; torchrun's own follow):
  --job-id ID           the job's id (default: $SLURM_JOB_ID, else --rdzv-id): an --rdzv-endpoint
                        without a port gets port 20000 + id mod 9000 (a hash for non-numbers)
  --dist-timeout S      seconds any collective may wait (PRETRAIN_DIST_TIMEOUT; torch's default
                        otherwise)
  --print-port          print the job's rendezvous port and exit
  --print-env           print the environment the training processes get and exit
with torchrun's --max-restarts N, a restarted process resumes from the run's latest checkpoint.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv[: _program_start(argv)]):
        print(OWN_OPTIONS_HELP + "\ntorchrun's options:")  # torchrun's help follows
    try:
        own, args = torchrun_argv(argv)
        if own.print_port:
            job_id = _job_id(own.job_id, args)
            if job_id is None:
                raise UserError("--print-port needs a job id: --job-id ID or $SLURM_JOB_ID")
            print(rendezvous_port(job_id))
            return 0
        if own.print_env:
            print("\n".join(worker_env_lines()))
            return 0
        apply_worker_env(own.dist_timeout, _max_restarts(args[: _program_start(args)]))
    except UserError as e:
        print(f"pretrain.launch: error: {e}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(_with_signals_handled(args))
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
