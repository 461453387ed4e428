"""Two torchrun ranks (gloo, FSDP2) on CPU: the same losses as one process, and checkpoints that
resume at the same or another world size. Real torchrun processes on a real prepared dataset."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from train_helpers import (
    ROOT,
    assert_bitwise_equal,
    assert_losses_close,
    env,
    free_port,
    load_checkpoint,
    losses,
    records,
    run_train,
    train_cmd,
)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """Straight 8-step runs at world 1 and 2; runs stopped at step 4 and resumed at either size."""
    base = tmp_path_factory.mktemp("dist-runs")
    r = {name: base / name for name in ("w1", "w2", "w2_w2", "w2_w1", "w1_w2")}
    run_train(tiny_dataset, r["w1"])
    run_train(tiny_dataset, r["w2"], nproc=2)
    run_train(tiny_dataset, r["w2_w2"], "--train.stop_at", "4", nproc=2)
    shutil.copytree(r["w2_w2"], r["w2_w1"])
    run_train(tiny_dataset, r["w2_w2"], "--checkpoint.resume", "auto", nproc=2)
    run_train(tiny_dataset, r["w2_w1"], "--checkpoint.resume", "auto")
    run_train(tiny_dataset, r["w1_w2"], "--train.stop_at", "4")
    run_train(tiny_dataset, r["w1_w2"], "--checkpoint.resume", "auto", nproc=2)
    return r


def test_two_ranks_match_one_process(runs):
    assert_losses_close(losses(runs["w1"]), losses(runs["w2"]), rtol=1e-4)
    grad_norm = {r["step"]: r["grad_norm"] for r in records(runs["w2"])}
    reference = {r["step"]: r["grad_norm"] for r in records(runs["w1"])}
    assert_losses_close(reference, grad_norm, rtol=1e-4)  # clipping sees the global norm
    val = [r["val_loss"] for r in records(runs["w2"], "eval")]
    val_ref = [r["val_loss"] for r in records(runs["w1"], "eval")]
    assert val == pytest.approx(val_ref, rel=1e-4)


def test_two_ranks_resume_exactly(runs):
    assert losses(runs["w2_w2"]) == losses(runs["w2"])
    assert_bitwise_equal(
        load_checkpoint(runs["w2"] / "checkpoints" / "step-000008"),
        load_checkpoint(runs["w2_w2"] / "checkpoints" / "step-000008"),
    )


@pytest.mark.parametrize("name", ["w2_w1", "w1_w2"])
def test_resume_at_another_world_size_continues_the_same_run(runs, name):
    resumed = losses(runs[name])
    assert sorted(resumed) == list(range(1, 9))
    assert_losses_close(losses(runs["w1"]), resumed, rtol=1e-4)


@pytest.mark.slow
def test_two_node_launch_on_one_machine_agrees_with_one_process(tiny_dataset, tmp_path):
    """Two torchrun agents (--nnodes=2, one rank each) meeting through c10d on 127.0.0.1."""
    port = free_port()
    launch = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
        "-m", "pretrain.train",
    ]  # fmt: skip
    args = train_cmd(tiny_dataset, tmp_path / "run", nproc=1)[
        4:
    ]  # drop "python -m pretrain.cli train"
    nodes = [
        subprocess.Popen(
            [*launch, *args],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "world size 2" in "".join(outputs)
    run_train(tiny_dataset, tmp_path / "one-process")
    assert_losses_close(losses(tmp_path / "one-process"), losses(tmp_path / "run"), rtol=1e-4)
