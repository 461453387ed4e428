"""Checkpoints under attack and under careless use: crafted pickles, two trainers in one run
directory, resuming from an older step, a full disk, a model config that changed, and a kill
between the two renames of a same-step save. Every run is a real `pretrain` process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from train_helpers import ROOT, env, load_checkpoint, losses, run_train, train_cmd

from pretrain.checkpoint import dcp_load, lock_run_dir, read_metadata

STEPS_4_AND_8 = ("--train.steps", "8", "--checkpoint.every", "4", "--eval.every", "0")


@pytest.fixture(scope="module")
def base(tiny_dataset, tmp_path_factory):
    """A run with checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("safety") / "base"
    run_train(tiny_dataset, run, *STEPS_4_AND_8)
    return run


def _copy(base, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(base, dst)
    (dst / ".run.lock").unlink(missing_ok=True)
    return dst


def _pretrain(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout, **kw)  # fmt: skip


def _one_line_error(proc, *needles):
    """The process exited 2 with one stderr line holding every needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- no unpickling


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["init_from", "resume", "export"])
def test_crafted_metadata_is_refused_and_its_payload_never_runs(base, tiny_dataset, tmp_path, how):
    evil = tmp_path / "evil" / "step-000004"
    shutil.copytree(base / "checkpoints" / "step-000004", evil)
    marker = tmp_path / "PWNED"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    if how == "export":
        proc = _pretrain("export", evil, "--out", tmp_path / "export")
    else:
        proc = subprocess.run(train_cmd(tiny_dataset, tmp_path / "run", f"--checkpoint.{how}",
                                        str(evil)), cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert not marker.exists()  # the payload never ran
    line = _one_line_error(proc, str(evil), "refused", "posix.system")
    assert "not part of DCP checkpoint metadata" in line


def _resave(step_dir, dest, **entries):
    """Copy checkpoint ``step_dir`` to ``dest`` through DCP, with extra or replaced entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        if isinstance(m, TensorStorageMetadata)
        else None
        for k, m in read_metadata(step_dir).state_dict_metadata.items()
    }
    dcp_load(state, step_dir)
    state.update(entries)
    dcp.save(state, checkpoint_id=str(dest))
    for name in ("config.toml", "tokenizer.json"):
        shutil.copyfile(step_dir / name, dest / name)


def _legacy_trainer_blob(step_dir):
    """The trainer state as older checkpoints stored it: torch.save of a dict of plain data
    with the RNG states as a tuple and a tensor."""
    import numpy as np

    state = json.loads((step_dir / "trainer.json").read_text())
    state.pop("format")
    for rank in state["ranks"]:
        rng = rank["rng"]
        version, internal, gauss = rng["python"]
        kind, keys, *rest = rng["numpy"]
        rank["rng"] = {
            "python": (version, tuple(internal), gauss),
            "numpy": (kind, np.array(keys, dtype=np.uint32).tolist(), *rest),
            "torch": torch.frombuffer(bytearray(__import__("base64").b64decode(rng["torch"])),
                                      dtype=torch.uint8),
        }  # fmt: skip
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_pickled_entry_that_would_run_code_is_refused(base, tiny_dataset, tmp_path):
    marker = tmp_path / "PWNED"
    evil_run = tmp_path / "evil"
    evil = evil_run / "checkpoints" / "step-000004"
    _resave(base / "checkpoints" / "step-000004", evil, trainer=_Payload(marker))
    (evil / "trainer.json").unlink(missing_ok=True)  # an older checkpoint's layout
    (evil_run / "checkpoints" / "latest").write_text("step-000004\n")
    proc = run_train(tiny_dataset, evil_run, *STEPS_4_AND_8, "--checkpoint.resume", "auto",
                     check=False)  # fmt: skip
    assert not marker.exists()  # the payload never ran
    _one_line_error(proc, str(evil), "not plain data", "refused")


def test_an_older_checkpoint_with_a_pickled_trainer_entry_still_resumes_exactly(
    base, tiny_dataset, tmp_path
):
    step = base / "checkpoints" / "step-000004"
    old_run = tmp_path / "old"
    _resave(step, old_run / "checkpoints" / "step-000004", trainer=_legacy_trainer_blob(step))
    (old_run / "checkpoints" / "latest").write_text("step-000004\n")
    run_train(tiny_dataset, old_run, *STEPS_4_AND_8, "--checkpoint.resume", "auto")
    assert losses(old_run) == {s: v for s, v in losses(base).items() if s > 4}


# --------------------------------------------------------------------------- the run lock


LONG = ("--train.steps", "100000", "--checkpoint.every", "0", "--eval.every", "0")


def _wait_for_metrics(proc, run, lines=1, timeout=240):
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the trainer did not start")


def test_second_trainer_is_refused_and_a_dead_holders_lock_is_taken_over(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(tiny_dataset, run, *LONG), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_metrics(first, run, lines=2)
        second = run_train(tiny_dataset, run, *LONG, "--train.seed", "7", "--train.steps", "3",
                           check=False)  # fmt: skip
        _one_line_error(second, str(run), "in use by another trainer",
                        f"host {socket.gethostname()}", f"pid {first.pid}")  # fmt: skip
        assert first.poll() is None  # the first trainer goes on undisturbed
        trained = len((run / "metrics.jsonl").read_text().splitlines())
    finally:
        first.kill()
        first.wait()
    assert trained >= 2
    # The kernel released the dead trainer's lock; the next start says whose lock it takes over.
    third = run_train(tiny_dataset, run, "--train.steps", "2", "--eval.every", "0")
    assert f"previous holder (host {socket.gethostname()}, pid {first.pid}" in third.stdout
    assert (run / ".run.lock").read_text() == ""  # released on a normal exit


def test_torchrun_ranks_all_stop_when_the_run_directory_is_locked(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        proc = subprocess.run(train_cmd(tiny_dataset, run, "--train.steps", "2", nproc=2),
                              cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=240)  # fmt: skip
    assert proc.returncode != 0
    assert f"pid {os.getpid()}" in proc.stderr and "in use by another trainer" in proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_finetune_into_a_locked_out_is_refused_before_writing(base, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                            for i in range(40)))  # fmt: skip
    out = tmp_path / "sft"
    with lock_run_dir(out):
        proc = _pretrain("finetune", "--init-from", base, "--data", rows, "--out", out,
                         "--train.device", "cpu", "--train.steps", "1")  # fmt: skip
    _one_line_error(proc, "in use by another trainer", f"pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]


# --------------------------------------------------------------------------- timelines


def test_resume_from_an_older_step_sets_the_later_ones_aside_and_keeps_latest(
    base, tiny_dataset, tmp_path
):
    run = _copy(base, tmp_path)
    ckpts = run / "checkpoints"
    proc = run_train(tiny_dataset, run, "--train.steps", "8", "--eval.every", "0",
                     "--checkpoint.every", "0", "--checkpoint.keep_last", "1",
                     "--checkpoint.resume", str(ckpts / "step-000004"),
                     "--train.stop_at", "6")  # fmt: skip
    assert (ckpts / "latest").read_text().strip() == "step-000006"
    assert (ckpts / "step-000006" / ".metadata").is_file()
    assert "abandoned timeline" in proc.stdout and "step-000008" in proc.stdout
    (aside,) = ckpts.glob("abandoned-*")
    assert (aside / "step-000008" / ".metadata").is_file()  # kept, not deleted
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-000006"]
    again = run_train(tiny_dataset, run, "--train.steps", "8", "--eval.every", "0",
                      "--checkpoint.every", "0", "--checkpoint.resume", "auto",
                      "--train.stop_at", "7")  # fmt: skip
    assert f"resumed from {ckpts / 'step-000006'} at step 6" in again.stdout


def test_resume_with_another_model_config_names_the_keys(base, tiny_dataset, tmp_path):
    run = _copy(base, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".run.lock")
    proc = run_train(tiny_dataset, run, *STEPS_4_AND_8, "--checkpoint.resume", "auto",
                     "--model.n_heads", "2", "--model.n_kv_heads", "1",
                     "--model.rope_theta", "500", check=False)  # fmt: skip
    _one_line_error(proc, "model.n_heads = 4 in the checkpoint, 2 now",
                    "model.n_kv_heads = 2 in the checkpoint, 1 now",
                    "model.rope_theta = 10000.0 in the checkpoint, 500.0 now",
                    "--checkpoint.init_from")  # fmt: skip
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".run.lock") == before


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _small_disk(tmp_path, size_kb):
    """A directory on a tmpfs of ``size_kb`` (when mounting is allowed), else a directory with a
    file size limit of ``size_kb`` for the trainer; yields (directory, preexec_fn for phase 2)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                              str(where)], capture_output=True).returncode == 0  # fmt: skip
    limit = None if mounted else size_kb * 1024

    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        yield where, preexec
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_disk_full_is_one_line_and_the_previous_checkpoint_is_intact(
    tiny_dataset, tmp_path, async_save
):
    args = ("--train.steps", "20", "--checkpoint.every", "10", "--eval.every", "0",
            "--checkpoint.async_save", async_save)  # fmt: skip
    # One checkpoint (~1 MB, step 3) fits, a second (step 10) does not.
    with _small_disk(tmp_path, 1600) as (where, preexec):
        run = where / "run"
        run_train(tiny_dataset, run, *args, "--train.stop_at", "3")
        proc = subprocess.run(train_cmd(tiny_dataset, run, *args, "--checkpoint.resume",
                                        "auto"), cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=300, preexec_fn=preexec)  # fmt: skip
        line = _one_line_error(proc, str(run / "checkpoints" / "step-000010"),
                               "no space left on device", "needed", "free",
                               f"previous checkpoint {run / 'checkpoints' / 'step-000003'} is "
                               "intact")  # fmt: skip
        assert re.search(r"about [\d.]+ MB needed, [\d.]+ MB free", line), line
        # Reported within a step or two of the failed write, not at the next save (step 20).
        assert max(losses(run)) < 20
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step-000003"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000003"]
        assert load_checkpoint(ckpts / "step-000003")  # complete and readable


# --------------------------------------------------------------------------- same step twice


KILL_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    import torch
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import load_config
    from pretrain.parallel import DistInfo

    run = Path(sys.argv[1])
    final = run / "checkpoints" / "step-000004"
    tmp = run / "checkpoints" / ".tmp-step-000004"
    ckpt = Checkpointer(run, dist_info=DistInfo(0, 0, 1, torch.device("cpu")),
                        config=load_config(final / "config.toml"), tokenizer_path=None)
    shutil.copytree(final, tmp)  # a second, complete save of step 4, ready to publish
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == tmp:  # the new copy is about to take the name: die here
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    ckpt._publish(tmp, final)
    """
)


def test_a_kill_between_the_renames_of_a_same_step_save_keeps_a_complete_step(
    base, tiny_dataset, tmp_path
):
    run = _copy(base, tmp_path)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step-000008")
    (ckpts / "latest").write_text("step-000004\n")
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(run)], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (ckpts / "step-000004").exists()  # the crash point: no step-4 under its name
    proc = run_train(tiny_dataset, run, *STEPS_4_AND_8, "--checkpoint.resume", "auto",
                     "--train.stop_at", "5")  # fmt: skip
    assert f"resumed from {ckpts / 'step-000004'} at step 4" in proc.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004", "step-000005"]
    assert losses(run) == {s: v for s, v in losses(base).items() if s <= 5}
