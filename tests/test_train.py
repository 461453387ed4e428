"""The trainer: CLI, schedules, optimizer groups, bad input, and real runs agreeing with each other.

Per-step losses must not depend on how a global batch is computed: one process with gradient
accumulation and one without give the same losses (two ranks: test_train_distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch
from train_helpers import (
    ROOT,
    assert_bitwise_equal,
    assert_losses_close,
    env,
    load_checkpoint,
    losses,
    records,
    run_train,
    train_cmd,
)

from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.optim import lr_at, param_groups
from pretrain.train import SpikeDetector, train, train_step

# --------------------------------------------------------------------------- command line


def test_help_lists_options_with_defaults():
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "--help"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "--data" in proc.stdout and "--out" in proc.stdout
    assert "--train.lr (float, default 0.001)" in proc.stdout
    assert "--checkpoint.resume" in proc.stdout


def test_misspelled_key_is_one_line_naming_it_and_the_fix():
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "--config", "configs/tiny.toml",
         "--train.lrr", "1"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.lrr" in lines[0] and "train.lr'" in lines[0]


# --------------------------------------------------------------------------- schedule, optimizer


def _train_cfg(**kw):
    cfg = load_config(None).train
    for k, v in dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, steps=110, **kw).items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_warms_up_linearly_then_follows_its_shape(schedule):
    cfg = _train_cfg(schedule=schedule, decay_fraction=0.5)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    final = 1.0 if schedule == "constant" else 0.1
    assert lrs[-1] == pytest.approx(final)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    if schedule == "cosine":
        assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    if schedule == "linear":
        assert lrs[60] == pytest.approx(1.0 - 0.9 * 50 / 99)
    if schedule == "wsd":
        assert lrs[54] == 1.0 and lrs[56] < 1.0  # decays over the last 55 steps only


def test_weight_decay_skips_norms_and_embeddings():
    from pretrain.model import Transformer

    cfg = load_config(None, [("model.n_layers", "1"), ("model.tie_embeddings", "true")]).model
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.self_attn.q_proj.weight" in decayed
    assert not any("norm" in n or "embed" in n for n in decayed)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_spike_detector_flags_an_outlier_and_the_step_is_skipped():
    from pretrain.model import Transformer

    det = SpikeDetector(threshold=6.0, warmup=20)
    for i in range(40):
        det.update(3.0 + 0.01 * math.sin(i))
    assert not det.is_spike(3.02) and det.is_spike(4.0)

    cfg = load_config(None, [("model.n_layers", "1"), ("model.d_model", "32"),
                             ("model.vocab_size", "64")]).model  # fmt: skip
    model = Transformer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = type("B", (), {})()
    batch.inputs = torch.randint(0, 64, (2, 8))
    batch.targets, batch.doc_ids = batch.inputs.roll(-1, 1), None
    det.mean, det.var = 1.0, 1e-4  # any real loss (about ln 64) is a spike now
    stats = train_step(model, opt, batch, step=1, lr=1e-2, micro_batch_size=2, world_size=1,
                       grad_clip=1.0, device=torch.device("cpu"), spikes=det)  # fmt: skip
    assert stats.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- bad input


def _cfg(data, *pairs):
    overrides = [
        ("model.vocab_size", "512"), ("model.n_layers", "1"), ("model.d_model", "32"),
        ("model.n_heads", "4"), ("model.n_kv_heads", "2"), ("model.max_seq_len", "32"),
        ("data.seq_len", "32"), ("data.path", str(data)), ("train.steps", "3"),
        ("train.global_batch_size", "4"), ("train.micro_batch_size", "2"),
        ("train.warmup_steps", "1"), ("train.device", "cpu"), ("eval.every", "0"),
        ("checkpoint.every", "0"), ("logging.every", "1"), *pairs,
    ]  # fmt: skip
    return load_config(None, overrides)


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([("data.path", "/nonexistent/data")], "data directory not found: /nonexistent/data"),
        ([("model.vocab_size", "1024")], "vocabulary of 512 tokens but model.vocab_size is 1024"),
        ([("train.global_batch_size", "6"), ("train.micro_batch_size", "4")], "not divisible"),
        ([("data.seq_len", "64")], "data.seq_len=64 is longer than model.max_seq_len=32"),
        ([("train.schedule", "exp")], "train.schedule must be one of"),
    ],
)
def test_bad_input_is_a_clear_user_error(tiny_dataset, tmp_path, pairs, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        train(_cfg(tiny_dataset, *pairs), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_so(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="no CUDA device"):
        train(_cfg(tiny_dataset, ("train.device", "cuda")), tmp_path / "run")


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_divergence_stops_naming_the_step_and_never_checkpoints_it(
    tiny_dataset, tmp_path, async_save
):
    """The first update blows the model up; its own loss was fine, so the check before saving
    it is what stops the run: nothing is written."""
    cfg = _cfg(tiny_dataset, ("train.lr", "1e30"), ("train.warmup_steps", "0"),
               ("train.grad_clip", "0"), ("checkpoint.every", "1"),
               ("checkpoint.async_save", async_save))  # fmt: skip
    with pytest.raises(UserError, match=r"diverged at step 1: after its update.*stopped before "
                       r"saving it\. No checkpoint was saved"):  # fmt: skip
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "diverged" and status["step"] == 1 and status["checkpoint"] is None


def test_guard_has_no_warm_up_and_bounds_loss_and_grad_norm():
    guard = SpikeDetector(6.0, loss_bound=2 * math.log(512), grad_factor=1000.0)
    assert guard.divergence(6.3, 1.0) is None  # a fresh model: about ln(512)
    assert "above train.diverge_loss_factor" in guard.divergence(13.0, 1.0)  # at the first step
    assert "grad norm nan" in guard.divergence(6.0, float("nan"))
    guard.update(6.3, 0.5)
    assert guard.divergence(6.0, 400.0) is None
    assert "train.diverge_grad_factor" in guard.divergence(6.0, 600.0)  # 1000 x 0.5
    assert "train.diverge_grad_factor" in guard.divergence(6.0, 0.0)  # a collapsed model
    assert not any(guard.skipped() for _ in range(4)) and guard.skipped()  # the 5th in a row
    guard.update(6.0, 0.5)
    assert guard.consecutive_skips == 0


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """One 8-step run per way of computing the global batch of 8 sequences in one process
    (two ranks: test_train_distributed.py)."""
    base = tmp_path_factory.mktemp("train-runs")
    out = {
        "accum4": base / "accum4",  # 1 process, micro-batch 2, 4 accumulation steps
        "accum1": base / "accum1",  # 1 process, micro-batch 8
    }
    run_train(tiny_dataset, out["accum4"], "--train.micro_batch_size", "2")
    run_train(tiny_dataset, out["accum1"], "--train.micro_batch_size", "8")
    return out


def test_single_process_run_writes_metrics_config_and_learns(runs):
    run = runs["accum4"]
    train_recs = records(run)
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(r[key] is not None for r in train_recs), key
    assert train_recs[-1]["tokens"] == 8 * 8 * 32
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[0]["val_bpb"] == pytest.approx(
        evals[0]["val_loss"] / math.log(2) * _tokens_per_byte(run), rel=1e-9
    )
    cfg = load_config(run / "config.toml")
    assert cfg.train.micro_batch_size == 2 and cfg.model.d_model == 32


def _tokens_per_byte(run):
    from pretrain.data import load_manifest

    m = load_manifest(load_config(run / "config.toml").data.path)
    return m.num_tokens("val") / m.num_bytes("val")


def test_gradient_accumulation_matches_one_big_micro_batch(runs):
    assert_losses_close(losses(runs["accum4"]), losses(runs["accum1"]), rtol=1e-4)


def test_plot_writes_a_png(runs):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "plot", str(runs["accum4"])],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    png = runs["accum4"] / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_leaves_the_losses_unchanged(tiny_dataset, tmp_path, mode):
    plain = train(_cfg(tiny_dataset), tmp_path / "plain")
    recomputed = train(
        _cfg(tiny_dataset, ("train.activation_checkpointing", mode)), tmp_path / mode
    )
    assert recomputed.loss == plain.loss
    assert [r["loss"] for r in records(tmp_path / mode)] == [
        r["loss"] for r in records(tmp_path / "plain")
    ]
    # The wrapper does not leak into checkpoint names.
    names = set(load_checkpoint(recomputed.checkpoint))
    assert names == set(load_checkpoint(plain.checkpoint))
    assert not any("_checkpoint_wrapped_module" in n for n in names)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tiny_dataset, tmp_path):
    eager = train(_cfg(tiny_dataset), tmp_path / "eager")
    compiled = train(_cfg(tiny_dataset, ("train.compile", "true")), tmp_path / "compiled")
    assert_losses_close(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), rtol=1e-5)
    assert compiled.step == eager.step


# --------------------------------------------------------------------------- the guard, for real


def _status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def _saved_steps(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_a_blow_up_stops_before_it_is_checkpointed_and_names_the_last_good_one(
    tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    run_train(tiny_dataset, run, "--train.stop_at", "4", "--checkpoint.every", "2")
    proc = run_train(tiny_dataset, run, "--checkpoint.resume", "auto", "--train.lr", "1e3",
                     "--checkpoint.every", "1", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    good = run / "checkpoints" / "step-000004"
    line = proc.stderr.strip().splitlines()[-1]
    assert "training diverged at step 5: after its update, loss" in line, line
    assert f"The last good checkpoint is {good}" in line and "Traceback" not in proc.stderr
    assert _saved_steps(run) == [2, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    # Every saved checkpoint is sane: the step after it trained from it with an ordinary loss.
    assert all(losses(run)[step + 1] < math.log(512) for step in _saved_steps(run))
    assert _status(run) | {"step": 5, "checkpoint": str(good)} == _status(run)
    assert _status(run)["state"] == "diverged"


def test_a_run_that_keeps_skipping_spikes_stops_after_the_bound(tiny_dataset, tmp_path):
    """A big learning rate damages the model; every later loss is a spike (below the
    divergence bound), so nothing is learned and, before, the run skipped to its end."""
    run = tmp_path / "run"
    common = ("--train.steps", "40", "--train.skip_spikes", "true", "--eval.every", "0")
    run_train(tiny_dataset, run, *common, "--train.stop_at", "24", "--checkpoint.every", "0")
    proc = run_train(tiny_dataset, run, *common, "--checkpoint.resume", "auto",
                     "--train.lr", "1", "--train.spike_threshold", "1",
                     "--checkpoint.every", "1", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "5 steps in a row were loss spikes and skipped (train.max_skipped_steps = 5)" in line
    assert proc.stdout.count("update skipped") == 5
    newest = run / "checkpoints" / f"step-{_saved_steps(run)[-1]:06d}"
    assert f"The last good checkpoint is {newest} " in line
    skipped = [r["step"] for r in records(run) if r["skipped"] > 0]
    assert skipped and _saved_steps(run)[-1] < skipped[0]  # nothing saved while skipping
    assert _status(run)["state"] == "diverged" and _status(run)["checkpoint"] == str(newest)


# --------------------------------------------------------------------------- how a run ended


def test_a_finished_run_says_so_in_status_json(runs):
    status = _status(runs["accum4"])
    assert status["state"] == "finished" and status["step"] == 8
    assert status["checkpoint"] == str(runs["accum4"] / "checkpoints" / "step-000008")


def test_resuming_a_finished_run_names_its_checkpoint(runs, tiny_dataset, tmp_path):
    import shutil

    again = tmp_path / "again"
    shutil.copytree(runs["accum4"], again)
    run_train(tiny_dataset, again, "--train.micro_batch_size", "2", "--checkpoint.resume", "auto")
    status = _status(again)
    assert status["state"] == "finished" and status["step"] == 8
    assert status["checkpoint"] == str(again / "checkpoints" / "step-000008")


def _workers_of(out) -> list[int]:
    """Trainer processes (any rank, any parent) still running for run directory ``out``."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if any("pretrain" in a for a in args) and str(out) in args and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _signal_at_step(cmd, out, sig, *, step=3, target=None, env_extra=None):
    """Start ``cmd``, send ``sig`` once step ``step`` was logged (to the process, or to the
    process ``target(pid)`` names), and return (exit code, output, pids left running)."""
    import os
    import re
    import signal as signals
    import threading
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env() | (env_extra or {}), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not any(re.search(rf"train step= *{step}/", line) for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        os.kill(target(proc.pid) if target else proc.pid, sig)
        rc = proc.wait(timeout=180)
        deadline = time.monotonic() + 60  # workers of a dead agent save, then exit on their own
        while _workers_of(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(0.5)
        return rc, "".join(lines), _workers_of(out)
    finally:
        for pid in [proc.pid, *_workers_of(out)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.SIGKILL)
        proc.wait(timeout=30)


def _endless(data, out, nproc=1):
    return train_cmd(data, out, "--train.steps", "100000", "--eval.every", "0",
                     "--checkpoint.every", "0", nproc=nproc)  # fmt: skip


def _assert_preempted(out, rc, output, left, signal_name, rc_wanted=0):
    assert rc == rc_wanted, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not left, f"trainer processes left running: {left}"
    status = _status(out)
    assert status["state"] == "preempted" and status["signal"] == signal_name, status
    assert status["step"] >= 3
    assert status["checkpoint"] == str(out / "checkpoints" / f"step-{status['step']:06d}")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{status['step']:06d}"


def test_a_preempted_run_says_so_in_status_json(tiny_dataset, tmp_path):
    import signal as signals

    out = tmp_path / "run"
    rc, output, left = _signal_at_step(_endless(tiny_dataset, out), out, signals.SIGTERM)
    _assert_preempted(out, rc, output, left, "SIGTERM")


def _launcher(data, out):
    """scripts/launch_single_node.sh with two CPU ranks and the tiny model, run endlessly."""
    args = _endless(data, out)[4:]  # drop "python -m pretrain.cli train"
    args = args[args.index("--out") + 2 :]
    return ["bash", "scripts/launch_single_node.sh", "configs/tiny.toml", str(data), str(out),
            *args]  # fmt: skip


LAUNCHER_ENV = {"NPROC": "2", "VENV": sys.prefix}


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launcher_reaches_the_workers_and_ends_cleanly(
    tiny_dataset, tmp_path, name
):
    """The launcher passes the signal to the ranks, not to the torchrun agent (which would
    print a traceback for SIGTERM and die of SIGUSR1): every rank saves, torchrun exits 0."""
    import signal as signals

    out = tmp_path / "run"
    rc, output, left = _signal_at_step(_launcher(tiny_dataset, out), out,
                                       getattr(signals, name), env_extra=LAUNCHER_ENV)  # fmt: skip
    _assert_preempted(out, rc, output, left, name)
    assert "world size 2" in output


def _agent_of(launcher_pid: int) -> int:
    return int(subprocess.check_output(["pgrep", "-P", str(launcher_pid)]).split()[0])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_torchrun_agent_reaches_the_workers_without_a_traceback(
    tiny_dataset, tmp_path, name
):
    """The agent runs under pretrain.launch: a SIGTERM or SIGUSR1 sent to it (not to the
    launcher) is passed to every rank, which saves and stops; the agent ends with one line and
    exit 128 + the signal, not a traceback (SIGTERM) or an instant death (SIGUSR1)."""
    import signal as signals

    out = tmp_path / "run"
    sig = getattr(signals, name)
    rc, output, left = _signal_at_step(_launcher(tiny_dataset, out), out, sig,
                                       target=_agent_of, env_extra=LAUNCHER_ENV)  # fmt: skip
    _assert_preempted(out, rc, output, left, name, rc_wanted=128 + sig)
    assert f"pretrain.launch: {name}: passed to every training process" in output


def test_workers_of_a_dead_torchrun_agent_save_and_stop(tiny_dataset, tmp_path):
    """A SIGKILL to the agent cannot be handled; the ranks notice that their parent is gone,
    save and exit instead of training on unsupervised."""
    import signal as signals

    out = tmp_path / "run"
    rc, output, left = _signal_at_step(_launcher(tiny_dataset, out), out, signals.SIGKILL,
                                       target=_agent_of, env_extra=LAUNCHER_ENV)  # fmt: skip
    assert not left, f"trainer processes left running: {left}"
    status = _status(out)
    assert status["state"] == "preempted", status
    assert status["signal"] == "the exit of the torchrun agent"
    assert status["checkpoint"] == str(out / "checkpoints" / f"step-{status['step']:06d}")
    assert rc == 128 + signals.SIGKILL  # the agent's own death, passed on by the launcher


# --------------------------------------------------------------------------- Muon


def _muon_cfg(data, *pairs):
    return _cfg(data, ("optimizer.name", "muon"), ("train.lr", "3e-3"),
                ("optimizer.muon_lr", "0.02"), *pairs)  # fmt: skip


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from pretrain.model import Transformer
    from pretrain.optim import build_optimizer

    cfg = load_config(None, [("model.n_layers", "1"), ("model.d_model", "32"),
                             ("model.vocab_size", "64"), ("optimizer.name", "muon"),
                             ("train.lr", "1e-3"), ("optimizer.muon_lr", "0.02")])  # fmt: skip
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, head, rest = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    assert "layers.0.self_attn.q_proj.weight" in muon and "layers.0.mlp.down_proj.weight" in muon
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in muon)
    assert head == {"lm_head.weight"} and opt.param_groups[1]["weight_decay"] == 0.1
    assert "embed_tokens.weight" in rest and opt.param_groups[2]["weight_decay"] == 0.0
    assert len(muon) + len(head) + len(rest) == len(names)
    from pretrain.optim import set_lr

    set_lr(opt, 5e-4)  # the schedule's rate, scaled for Muon's group by muon_lr / train.lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4])


def test_muon_run_learns_and_logs_the_update_size_of_each_group(tiny_dataset, tmp_path):
    result = train(_muon_cfg(tiny_dataset, ("train.steps", "10")), tmp_path / "run")
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3, [r["loss"] for r in recs]
    assert result.loss == recs[-1]["loss"]
    assert all(r["update_rms/muon"] > 0 and r["update_rms/adamw"] > 0 for r in recs)


def test_muon_resumed_run_equals_the_uninterrupted_one(tiny_dataset, tmp_path):
    common = (("train.steps", "8"), ("checkpoint.every", "4"))
    straight = train(_muon_cfg(tiny_dataset, *common), tmp_path / "straight")
    train(_muon_cfg(tiny_dataset, *common, ("train.stop_at", "4")), tmp_path / "resumed")
    resumed = train(_muon_cfg(tiny_dataset, *common, ("checkpoint.resume", "auto")),
                    tmp_path / "resumed")  # fmt: skip
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert any("momentum_buffer" in k for k in a)
    assert_bitwise_equal(a, b)


def test_the_kernel_backend_of_a_run_is_undone_after_it(tiny_dataset, tmp_path):
    import kernels

    before = kernels.get_backend()
    train(_cfg(tiny_dataset, ("train.kernels", "torch"), ("train.steps", "1")), tmp_path / "run")
    assert kernels.get_backend() == before


@pytest.mark.slow
def test_two_ranks_train_muon_like_one_process(tiny_dataset, tmp_path):
    """Under FSDP2 Muon steps row-sharded DTensors (each matrix orthogonalized whole by one
    rank): the losses agree with one process."""
    muon = ("--optimizer.name", "muon", "--optimizer.muon_lr", "0.02", "--eval.every", "0")
    run_train(tiny_dataset, tmp_path / "w1", *muon)
    run_train(tiny_dataset, tmp_path / "w2", *muon, nproc=2)
    assert_losses_close(losses(tmp_path / "w1"), losses(tmp_path / "w2"), rtol=1e-4)
