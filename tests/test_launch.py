"""``python -m pretrain.launch`` and the launch scripts: the job's rendezvous port, the worker
environment, restarts that resume from the latest checkpoint, signals passed to the ranks.

The restart and signal tests run real torchrun agents with two gloo ranks of the tiny model.
Run as a program, this file is the restart test's training program: ``pretrain train`` whose
rank 1 is killed (SIGKILL, like a lost node or the OOM killer) before step ``$KILL_AT_STEP`` of
its first start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from train_helpers import ROOT, TINY, env, losses, run_train

from pretrain.errors import UserError
from pretrain.launch import main as launch_main
from pretrain.launch import rendezvous_port, torchrun_argv, worker_env_lines
from pretrain.parallel import dist_timeout

KILL_ENV = "KILL_AT_STEP"


# --------------------------------------------------------------------------- the job's port


def test_the_port_follows_the_job_id_and_differs_between_jobs():
    assert rendezvous_port("4242") == rendezvous_port("4242") == 24242
    assert rendezvous_port("4242") != rendezvous_port("4243")
    consecutive = {rendezvous_port(str(job)) for job in range(700_000, 709_000)}
    assert len(consecutive) == 9000 and min(consecutive) >= 20000 and max(consecutive) < 29000
    assert rendezvous_port("1234.pbs-server") == 21234
    # Not hash(): every node's Python must compute the same port for a named job.
    assert rendezvous_port("run-a") == 27559 and rendezvous_port("run-b") == 28341
    assert rendezvous_port("12345_7") != rendezvous_port("12345_8")  # two tasks of an array job
    with pytest.raises(UserError, match="job id is empty"):
        rendezvous_port(" ")


def test_an_endpoint_without_a_port_gets_the_jobs_port(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    program = ["-m", "pretrain.train", "--job-id", "not-ours", "--out", "x.py"]
    own, args = torchrun_argv(
        ["--job-id", "77", "--nnodes=2", "--rdzv-endpoint", "node0", *program]
    )
    assert own.job_id == "77"
    assert args == ["--nnodes=2", "--rdzv-endpoint", "node0:20077", *program]
    _, args = torchrun_argv(["--rdzv-id=run-a", "--rdzv-endpoint=node0", *program])
    assert args == ["--rdzv-id=run-a", "--rdzv-endpoint=node0:27559", *program]
    monkeypatch.setenv("SLURM_JOB_ID", "5123")  # Slurm's id wins over the rendezvous id
    _, args = torchrun_argv(["--rdzv-id=run-a", "--rdzv_endpoint=node0", *program])
    assert args[1] == "--rdzv_endpoint=node0:25123"
    for given in (["--rdzv-endpoint=node0:29999"], ["--rdzv-endpoint=[::1]:29999"],
                  ["--standalone", "--nproc_per_node=2"]):  # fmt: skip
        assert torchrun_argv([*given, *program])[1] == [*given, *program]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchrun, in pytest
def test_launch_options_are_checked_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch_main(["--dist-timeout", "soon", "--standalone", "-m", "pretrain.train"]) == 2
    assert launch_main(["--print-port"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--dist-timeout" in err[0] and "'soon'" in err[0], err
    assert "--print-port needs a job id" in err[1]
    assert launch_main(["--print-port", "--job-id", "31"]) == 0
    assert capsys.readouterr().out == "20031\n"
    try:  # torchrun's help follows the launcher's own
        code = launch_main(["--help"])
    except SystemExit as e:  # argparse's exit, where torchrun does not turn it into a return
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and "--dist-timeout S" in out and "--max-restarts" in out


def test_the_collective_timeout_and_the_worker_environment(monkeypatch):
    assert dist_timeout("1800") == timedelta(seconds=1800)
    for bad in ("0", "-5", "inf", "ten"):
        with pytest.raises(UserError, match="positive number of seconds"):
            dist_timeout(bad)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # an exported value wins
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    lines = worker_env_lines()
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines
    assert any(line.startswith("NCCL_SOCKET_IFNAME=ib0  # ") for line in lines)
    assert any(line.startswith("GLOO_SOCKET_IFNAME=") for line in lines)


# --------------------------------------------------------------------------- restarts


def _launch(*launch_args: str, data, out, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "pretrain.launch", *launch_args, __file__,
            "--data", str(data), "--out", str(out), *TINY, *extra]  # fmt: skip


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_resumes_from_the_latest_checkpoint(
    tiny_dataset, tmp_path
):
    """Rank 1 dies before step 6 of 8 (checkpoints every 4): torchrun --max-restarts 1 starts
    both ranks again, they resume from step 4 without --checkpoint.resume, and the run ends
    with the losses of a run that was never interrupted."""
    out = tmp_path / "restarted"
    cmd = _launch("--dist-timeout", "120", "--standalone", "--nproc_per_node=2",
                  "--max-restarts=1", data=tiny_dataset, out=out)  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env() | {KILL_ENV: "6"}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "killing rank 1 before step 6" in output  # the first start really died
    assert output.count("starting fresh") == 1, output[-4000:]  # the first start only
    assert f"resumed from {out / 'checkpoints' / 'step-000004'} at step 4" in output
    assert json.loads((out / "status.json").read_text())["state"] == "finished"

    straight = tmp_path / "straight"
    run_train(tiny_dataset, straight, nproc=2)
    assert sorted(losses(out)) == list(range(1, 9))
    assert losses(out) == losses(straight)


# --------------------------------------------------------------------------- signals


def _processes_of(out) -> list[int]:
    """Processes (agents and ranks) still running for run directory ``out``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            args = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
            if str(out) in args and int(pid) != os.getpid():
                found.append(int(pid))
    return found


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A":  # LISTEN
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
def test_the_multi_node_script_meets_at_the_jobs_port_and_passes_sigusr1_to_the_ranks(
    tiny_dataset, tmp_path
):
    """scripts/launch_multi_node.sh as one node of a Slurm job: the rendezvous listens on the
    port of $SLURM_JOB_ID, and a SIGUSR1 to the script makes both ranks save and stop."""
    out, job_id = tmp_path / "run", str(600_000 + os.getpid() % 9000)
    overrides = [*TINY, "--train.steps", "100000", "--eval.every", "0", "--checkpoint.every", "0"]
    cmd = ["bash", "scripts/launch_multi_node.sh", "configs/tiny.toml", str(tiny_dataset),
           str(out), *overrides]  # fmt: skip
    extra = {"NNODES": "1", "NPROC": "2", "MASTER_ADDR": "127.0.0.1", "SLURM_JOB_ID": job_id,
             "VENV": sys.prefix}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env() | extra, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(re.search(r"train step= *3/", line) for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        assert rendezvous_port(job_id) in _listening_ports()
        os.kill(proc.pid, signal.SIGUSR1)
        rc = proc.wait(timeout=180)
    finally:
        for pid in [proc.pid, *_processes_of(out)]:  # the agent runs in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    output = "".join(lines)
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == "SIGUSR1", status
    assert status["checkpoint"] == str(out / "checkpoints" / f"step-{status['step']:06d}")


# --------------------------------------------------------------------------- the program


def _train_with_rank_1_killed(kill_at: int) -> None:
    """Make ``pretrain.train`` kill this process before step ``kill_at`` when it is rank 1 of
    the first start (``TORCHELASTIC_RESTART_COUNT`` 0): a restart must not die again."""
    import pretrain.train

    if os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0" or os.environ.get("RANK") != "1":
        return
    real_step = pretrain.train.train_step

    def train_step(*args, step: int, **kwargs):
        if step == kill_at:
            print(f"test: killing rank 1 before step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, step=step, **kwargs)

    pretrain.train.train_step = train_step


if __name__ == "__main__":
    from pretrain.cli import main

    if os.environ.get(KILL_ENV):
        _train_with_rank_1_killed(int(os.environ[KILL_ENV]))
    sys.exit(main(["train", *sys.argv[1:]]))
