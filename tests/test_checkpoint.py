"""Checkpoints: the on-disk format, exact resume, kill -9 mid-save, SIGTERM, weights-only init and
bad checkpoints. Every run is a real `pretrain train` process on a real prepared dataset."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
from train_helpers import (
    ROOT,
    TINY,
    assert_bitwise_equal,
    env,
    load_checkpoint,
    losses,
    records,
    run_train,
    train_cmd,
)

from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.model import Transformer
from pretrain.train import train


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """8 steps straight through (saving asynchronously), and 4 steps + a resume to 8."""
    base = tmp_path_factory.mktemp("ckpt-runs")
    straight, split = base / "straight", base / "split"
    run_train(tiny_dataset, straight, "--checkpoint.async_save", "true")
    run_train(tiny_dataset, split, "--train.stop_at", "4")
    first_half = losses(split)
    shutil.copytree(split, base / "split-at-4")
    resumed = run_train(tiny_dataset, split, "--checkpoint.resume", "auto")
    return {
        "straight": straight,
        "split": split,
        "split_at_4": base / "split-at-4",
        "first_half": first_half,
        "resume_stdout": resumed.stdout,
    }


def test_checkpoint_layout_is_the_documented_format(runs):
    ckpts = runs["straight"] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000008"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004", "step-000008"]
    step = ckpts / "step-000008"
    assert (step / ".metadata").is_file() and (step / "tokenizer.json").is_file()
    cfg = load_config(step / "config.toml")
    assert cfg.model.d_model == 32 and cfg.checkpoint.async_save
    state = load_checkpoint(step)
    model_keys = {k.removeprefix("model.") for k in state if k.startswith("model.")}
    assert model_keys == set(Transformer(cfg.model).state_dict())
    assert any(k.startswith("optimizer.state.layers.0.") for k in state)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from pretrain.checkpoint import read_metadata

    entries = read_metadata(step).state_dict_metadata
    # No pickled trainer entry: the only non-tensor entries are the optimizer's hyperparameters.
    pickled = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
    assert pickled and all(k.startswith("optimizer.param_groups.") for k in pickled)
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["step"] == 8 and trainer["world_size"] == 1 and len(trainer["ranks"]) == 1
    assert set(trainer["ranks"][0]["rng"]) == {"python", "numpy", "torch"}


def test_resume_gives_identical_losses_and_bitwise_identical_weights(runs):
    assert "resumed from" in runs["resume_stdout"]
    straight, split = losses(runs["straight"]), losses(runs["split"])
    assert sorted(split) == list(range(1, 9))  # the resumed run appended steps 5..8
    assert runs["first_half"] == {s: straight[s] for s in range(1, 5)}
    assert split == straight
    assert [r["val_loss"] for r in records(runs["split"], "eval")] == [
        r["val_loss"] for r in records(runs["straight"], "eval")
    ]
    assert_bitwise_equal(
        load_checkpoint(runs["straight"] / "checkpoints" / "step-000008"),
        load_checkpoint(runs["split"] / "checkpoints" / "step-000008"),
    )


# --------------------------------------------------------------------------- bad checkpoints


def _snapshot(directory):
    """Size and mtime of every file but the run lock, which each start rewrites."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
            if p.name != ".run.lock"}  # fmt: skip


def _cfg(tiny_dataset, **overrides):
    """The TINY test config for in-process runs; keyword names use ``__`` for the dot."""
    pairs = [(k[2:], v) for k, v in zip(TINY[::2], TINY[1::2])]
    pairs.append(("data.path", str(tiny_dataset)))
    pairs += [(k.replace("__", "."), str(v)) for k, v in overrides.items()]
    return load_config(None, pairs)


def _copy(runs, tmp_path, name="split_at_4"):
    dst = tmp_path / "run"
    shutil.copytree(runs[name], dst)
    return dst


def test_missing_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, checkpoint__resume=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="checkpoint not found: .*nowhere"):
        train(cfg, tmp_path / "run")


def test_checkpoint_of_another_shape_names_the_parameter_and_both_shapes(
    runs, tiny_dataset, tmp_path
):
    run = _copy(runs, tmp_path)
    before = _snapshot(run)
    cfg = _cfg(tiny_dataset, model__d_model=64, checkpoint__resume="auto")
    with pytest.raises(UserError, match=r"'embed_tokens.weight' has shape \[512, 32\] in the "
                       r"checkpoint but \[512, 64\] in the model"):  # fmt: skip
        train(cfg, run)
    assert _snapshot(run) == before


def test_half_written_checkpoint_is_refused_and_cleaned_on_start(runs, tiny_dataset, tmp_path):
    run = _copy(runs, tmp_path)
    half = run / "checkpoints" / ".tmp-step-000006"
    shutil.copytree(run / "checkpoints" / "step-000004", half)
    (half / ".metadata").unlink()
    cfg = _cfg(tiny_dataset, checkpoint__resume=str(half))
    with pytest.raises(UserError, match="half-written checkpoint"):
        train(cfg, tmp_path / "other")
    # Resuming the run itself removes the leftover and continues from the complete one.
    result = train(_cfg(tiny_dataset, checkpoint__resume="auto", train__stop_at=5), run)
    assert result.step == 5 and not half.exists()


@pytest.mark.parametrize("damage", ["truncated shard", "garbled metadata"])
def test_damaged_checkpoint_is_a_clear_error_and_nothing_is_overwritten(
    runs, tiny_dataset, tmp_path, damage
):
    run = _copy(runs, tmp_path)
    step = run / "checkpoints" / "step-000004"
    if damage == "truncated shard":
        shard = next(step.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (step / ".metadata").write_bytes(b"not a pickle")
    before = _snapshot(run)
    with pytest.raises(UserError, match=f"checkpoint {step}"):
        train(_cfg(tiny_dataset, checkpoint__resume="auto"), run)
    assert _snapshot(run) == before


def test_fresh_run_refuses_to_overwrite_an_earlier_runs_checkpoints(runs, tiny_dataset, tmp_path):
    run = _copy(runs, tmp_path)
    with pytest.raises(UserError, match="already holds checkpoints.*--checkpoint.resume auto"):
        train(_cfg(tiny_dataset), run)


# --------------------------------------------------------------------------- weights only


def test_init_from_loads_weights_only_with_fresh_optimizer_and_data(runs, tiny_dataset, tmp_path):
    source = runs["straight"] / "checkpoints" / "step-000008"
    result = train(_cfg(tiny_dataset, checkpoint__init_from=str(source), train__steps=1,
                        eval__every=1), tmp_path / "ft")  # fmt: skip
    first_eval = records(tmp_path / "ft", "eval")[0]
    assert first_eval["step"] == 0
    assert first_eval["val_loss"] == records(runs["straight"], "eval")[-1]["val_loss"]
    assert result.step == 1  # a fresh schedule: step counting starts again
    state = load_checkpoint(tmp_path / "ft" / "checkpoints" / "step-000001")
    assert state["optimizer.state.embed_tokens.weight.step"].item() == 1.0


def test_init_from_an_export(runs, tiny_dataset, tmp_path):
    export = pytest.importorskip("pretrain.export")
    source = runs["straight"] / "checkpoints" / "step-000008"
    cfg = load_config(source / "config.toml")
    model = Transformer(cfg.model)
    sd = {k.removeprefix("model."): v for k, v in load_checkpoint(source).items()
          if k.startswith("model.")}  # fmt: skip
    model.load_state_dict(sd)
    export.save_export(model, source / "tokenizer.json", tmp_path / "export")
    train(_cfg(tiny_dataset, checkpoint__init_from=str(tmp_path / "export"), train__steps=1,
               eval__every=1), tmp_path / "ft")  # fmt: skip
    assert records(tmp_path / "ft", "eval")[0]["val_loss"] == pytest.approx(
        records(runs["straight"], "eval")[-1]["val_loss"], rel=1e-6
    )


def test_keep_last_and_keep_steps_prune_old_checkpoints(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, checkpoint__every=1, checkpoint__keep_last=2,
               checkpoint__keep_steps="[3]", train__steps=6, eval__every=0)  # fmt: skip
    train(cfg, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step-000003", "step-000005", "step-000006"]


# --------------------------------------------------------------------------- killed processes


def _wait_for(predicate, proc, timeout=240.0, poll=0.0005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the trainer")


# A wider model, so that writing a checkpoint takes long enough to be interrupted.
WIDE = ("--model.d_model", "256", "--model.n_heads", "8", "--model.n_kv_heads", "4",
        "--train.steps", "4", "--checkpoint.every", "2", "--eval.every", "0")  # fmt: skip


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_latest(tiny_dataset, tmp_path):
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        tmp_dir = run / "checkpoints" / ".tmp-step-000004"
        proc = subprocess.Popen(train_cmd(tiny_dataset, run, *WIDE), cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        caught = _wait_for(tmp_dir.exists, proc)
        proc.kill()
        proc.wait()
        latest = (run / "checkpoints" / "latest").read_text().strip()
        if caught and latest == "step-000002":
            break
    else:
        pytest.fail("the save finished before the kill could land, three times")
    killed_losses = losses(run)
    assert sorted(killed_losses) == [1, 2, 3, 4]  # step 4 was logged, its save interrupted
    resumed = run_train(tiny_dataset, run, *WIDE, "--checkpoint.resume", "auto")
    assert "removing half-written checkpoint" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step-000002" in resumed.stdout
    assert losses(run) == killed_losses
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not tmp_dir.exists()


def test_sigterm_saves_exits_zero_and_resume_continues(tiny_dataset, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    long = ("--train.steps", "500", "--checkpoint.every", "0", "--eval.every", "0")
    proc = subprocess.Popen(train_cmd(tiny_dataset, run, *long), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = run / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted by SIGTERM" in out
    stopped = max(losses(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:06d}"
    assert stopped < 500
    stop = str(stopped + 3)
    run_train(tiny_dataset, run, *long, "--checkpoint.resume", "auto", "--train.stop_at", stop)
    run_train(tiny_dataset, ref, *long, "--train.stop_at", stop)
    assert losses(run) == losses(ref)


def test_resume_accepts_a_run_directory_and_survives_a_dangling_latest(
    runs, tiny_dataset, tmp_path
):
    # A run directory resolves through its checkpoints/latest: the straight run is complete.
    done = train(_cfg(tiny_dataset, checkpoint__resume=str(runs["straight"])), tmp_path / "a")
    assert done.step == 8 and done.checkpoint is None
    # latest naming a directory that is gone falls back to the newest complete checkpoint.
    run = _copy(runs, tmp_path)
    (run / "checkpoints" / "latest").write_text("step-000006\n")
    result = train(_cfg(tiny_dataset, checkpoint__resume="auto", train__stop_at=5), run)
    assert result.step == 5 and sorted(losses(run)) == [1, 2, 3, 4, 5]
