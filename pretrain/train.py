"""The training loop: ``pretrain train`` and ``torchrun -m pretrain.train``.

One process or many (torchrun, one process per device, any number of nodes) run the same code:
the process group comes from torchrun's environment, :func:`pretrain.parallel.parallelize`
applies FSDP2, mixed precision, activation checkpointing and torch.compile from outside the
model, and every rank reads its own share of each global batch.

The loss of a step is the mean over the target tokens (targets != -100) of the *whole global
batch*: each micro-batch's summed loss is divided by the global token count, so gradient
accumulation and the number of ranks change neither the loss nor the gradient.

Reuse (fine-tuning calls the same loop with its own data)::

    train(config, out_dir, data=None) -> TrainResult

- ``config``: a :class:`pretrain.config.Config` (or a subclass with extra sections); only the
  ``model``, ``data.seq_len``, ``train``, ``optimizer``, ``eval``, ``logging`` and ``checkpoint``
  sections are read here.
- ``data``: a :class:`TrainData`, the run's data source: loader factories for the train and val
  splits (each loader a :class:`Loader`), bytes per token and the tokenizer. None: the
  :class:`pretrain.data.TokenLoader` splits of ``data.path`` and its manifest.

The optimizer, its parameter groups and the schedule are :mod:`pretrain.optim`'s.

Checkpoints, resume and weight initialisation follow ``config.checkpoint`` (see
:mod:`pretrain.checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import kernels
from pretrain.checkpoint import Checkpointer, checkpoint_base, lock_run_dir
from pretrain.config import (
    Config,
    ConfigError,
    config_help,
    config_to_toml,
    load_config,
    parse_overrides,
    save_config,
    validate_config,
)
from pretrain.data import Batch, TokenLoader, VerifiedShards, load_manifest
from pretrain.errors import UserError
from pretrain.export import DTYPES, init_from
from pretrain.initialize import materialize
from pretrain.lora import apply_lora_from_config
from pretrain.metrics import MetricsLogger, mfu, peak_flops, peak_memory_gb
from pretrain.model import Transformer
from pretrain.optim import (
    apply_hyperparameters,
    build_optimizer,
    lr_at,
    param_groups,  # noqa: F401  (part of this module's interface for scripts)
    set_lr,
    snapshot_params,
    update_rms,
)
from pretrain.parallel import (
    DistInfo,
    all_reduce_sum,
    barrier,
    build_mesh,
    check_tensor_parallel,
    clip_grad_norm,
    data_parallel_rank,
    destroy_distributed,
    init_distributed,
    parallelize,
    resolve_device,
    set_gradient_sync,
)
from pretrain.plan import (
    dry_run_world_size,
    fake_process_group,
    fake_tensors,
    gpu_param_dtype,
    human_bytes,
    materialize_fake,
    optimizer_state_bytes,
    sharded_meta_model,
    tensor_bytes,
)

ACCEPTS_OVERRIDES = True


class Loader(Protocol):
    """What the loop reads batches from: ``next()`` gives a batch with ``inputs`` and ``targets``
    (int64, ``(G // world_size, T)`` rows of the global batch of ``G = train.global_batch_size``
    sequences; targets -100 where no loss is wanted) and ``doc_ids`` (or None); its position is
    ``state_dict()`` / ``load_state_dict()``, kept in every checkpoint."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LoaderFactory = Callable[[int, int], Loader]  # (data-parallel rank, size) -> its loader


@dataclass
class TrainData:
    """A run's data source: what :func:`train` reads and what its checkpoints carry along.

    ``make_val`` is called afresh for every evaluation, so each one sees the same batches (None:
    no evaluation). ``bytes_per_token`` (UTF-8 bytes per token of the val split) gives bits per
    byte (None: no bpb). ``tokenizer_path`` is copied into every checkpoint. ``on_start`` runs on
    every rank once the run directory is locked, before the run starts, so that a caller can
    write its own files into it (fine-tuning's data report).
    """

    make_train: LoaderFactory
    make_val: LoaderFactory | None = None
    bytes_per_token: float | None = None
    tokenizer_path: Path | None = None
    on_start: Callable[[DistInfo], None] | None = None


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="TOML config file (default: built-in defaults)"
    )
    parser.add_argument("--data", default=None, help="prepared data directory (sets data.path)")
    parser.add_argument(
        "--out", default=None, help="run directory (default: runs/<config file name>)"
    )
    parser.epilog = config_help()


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(list(args.overrides or []))
    if args.data is not None:
        overrides.append(("data.path", args.data))
    config = load_config(args.config, overrides)
    out = args.out or str(Path("runs") / (Path(args.config).stem if args.config else "default"))
    train(config, out)
    return 0


# --------------------------------------------------------------------------- the step


@dataclass
class StepStats:
    loss: float  # mean over the target tokens of the global batch
    grad_norm: float
    tokens: int  # target tokens in the global batch
    skipped: bool = False
    update_rms: dict[str, float] | None = None  # per group kind, when the step measured it


class TrainingDiverged(UserError):
    """Training went wrong in a way more steps cannot repair; the run stops with exit 2.

    Raised before the bad state is updated or saved; the trainer adds the last good
    checkpoint to the message, since only it knows the checkpointer.
    """

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"training diverged at step {step}: {reason}")


class SpikeDetector:
    """The loss and gradient guard of every step: stops a divergence, flags a loss spike.

    A *divergence* stops the run, with no warm-up, so a blow-up at step 2 is caught:

    - a loss or gradient norm that is not finite;
    - a loss above ``loss_bound`` (``train.diverge_loss_factor x ln(vocab_size)``): a uniform
      guess over the vocabulary costs ln(vocab_size), so a loss a few times higher is a model
      that learned to be confidently wrong, whatever the data and from the first step;
    - a gradient norm more than ``grad_factor`` times above or below the running geometric
      mean of the accepted steps' norms (from the second step on, against the first): an
      exploding gradient, or one that vanished because the model collapsed (activations that
      overflowed predict a uniform distribution, with a loss of exactly ln(vocab_size)).

    A *spike* is a loss ``threshold`` standard deviations above the running mean of the
    accepted losses (exponential moving averages; only after ``warmup`` losses, since a
    variance needs some). With ``train.skip_spikes`` its update is skipped; ``max_skipped``
    skipped steps in a row mean the model does not come back, and stop the run. The state goes
    into checkpoints so that a resumed run decides alike.
    """

    def __init__(
        self,
        threshold: float,
        warmup: int = 20,
        beta: float = 0.95,
        *,
        loss_bound: float = math.inf,
        grad_factor: float = 0.0,
        max_skipped: int = 5,
    ):
        self.threshold, self.warmup, self.beta = threshold, warmup, beta
        self.loss_bound, self.grad_factor, self.max_skipped = loss_bound, grad_factor, max_skipped
        self.count, self.mean, self.var = 0, 0.0, 0.0
        self.grad_count, self.log_grad_mean = 0, 0.0
        self.consecutive_skips = 0

    @classmethod
    def from_config(cls, config: Config) -> SpikeDetector:
        """The guard ``config.train`` asks for (its divergence checks are always on)."""
        t = config.train
        factor = t.diverge_loss_factor
        return cls(
            t.spike_threshold,
            loss_bound=factor * math.log(config.model.vocab_size) if factor > 0 else math.inf,
            grad_factor=t.diverge_grad_factor,
            max_skipped=t.max_skipped_steps,
        )

    def loss_divergence(self, loss: float) -> str | None:
        """Why ``loss`` is a divergence, or None."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if loss > self.loss_bound:
            return (
                f"loss {loss:.6g} is above train.diverge_loss_factor x ln(model.vocab_size) = "
                f"{self.loss_bound:.4g} (a uniform guess costs ln(vocab_size))"
            )
        return None

    def divergence(self, loss: float, grad_norm: float) -> str | None:
        """Why a step with this loss and gradient norm is a divergence, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"loss {loss}, grad norm {grad_norm}"
        reason = self.loss_divergence(loss)
        if reason is None and self.grad_factor > 0 and self.grad_count > 0:
            mean = math.exp(self.log_grad_mean)
            if not mean / self.grad_factor <= grad_norm <= mean * self.grad_factor:
                reason = (
                    f"grad norm {grad_norm:.6g} is more than train.diverge_grad_factor = "
                    f"{self.grad_factor:g} times away from its running mean {mean:.4g}"
                )
        return reason

    def is_spike(self, loss: float) -> bool:
        if self.count < self.warmup:
            return False
        return (loss - self.mean) / math.sqrt(self.var + 1e-12) > self.threshold

    def update(self, loss: float, grad_norm: float | None = None) -> None:
        """Take an accepted step's loss (and gradient norm) into the running statistics."""
        if self.count == 0:
            self.mean = loss
        delta = loss - self.mean
        self.mean += (1 - self.beta) * delta
        self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
        self.count += 1
        self.consecutive_skips = 0
        if grad_norm is not None:
            log_norm = math.log(max(grad_norm, 1e-30))
            if self.grad_count == 0:
                self.log_grad_mean = log_norm
            self.log_grad_mean += (1 - self.beta) * (log_norm - self.log_grad_mean)
            self.grad_count += 1

    def skipped(self) -> bool:
        """Count a skipped step; True once ``max_skipped`` were skipped in a row."""
        self.consecutive_skips += 1
        return self.consecutive_skips >= self.max_skipped

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
            "grad_count": self.grad_count,
            "log_grad_mean": self.log_grad_mean,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the statistics (a checkpoint of an older version has the loss ones only)."""
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
        self.grad_count = state.get("grad_count", 0)
        self.log_grad_mean = state.get("log_grad_mean", 0.0)
        self.consecutive_skips = state.get("consecutive_skips", 0)


def _total_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip gradients to ``max_norm`` (0: no clipping) and return their norm before clipping.

    The gradients may be DTensor shards of several meshes and placements (FSDP2, HSDP, tensor
    parallel); :func:`pretrain.parallel.clip_grad_norm` counts every element once, over the
    whole mesh.
    """
    return clip_grad_norm(model.parameters(), max_norm)


def _micro_batch_losses(
    model: torch.nn.Module,
    batch,
    micro_batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Iterator[torch.Tensor]:
    """The summed token loss of each micro-batch of ``batch``, one forward pass at a time.

    Training and evaluation walk a rank's rows the same way; the caller decides what to do with
    each loss (backward, or just add it up) before the next forward pass runs.
    """
    inputs = batch.inputs.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    doc_ids = batch.doc_ids.to(device, non_blocking=True) if batch.doc_ids is not None else None
    for start in range(0, inputs.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        with autocast():
            loss = model(
                inputs[rows],
                targets[rows],
                doc_ids=doc_ids[rows] if doc_ids is not None else None,
                reduction="sum",
            )
        yield loss


def forward_backward(
    model: torch.nn.Module,
    batch,
    *,
    micro_batch_size: int,
    world_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tp_size: int = 1,
) -> tuple[float, int]:
    """Accumulate the gradient of this rank's share of a global batch; return (loss, tokens).

    Each micro-batch contributes ``sum of its token losses / global token count``; FSDP
    averages gradients over the ``world_size / tp_size`` data-parallel ranks, hence that
    factor (the ``tp_size`` ranks of a tensor-parallel group share their rows, so the sums over
    all ranks count each row ``tp_size`` times). Gradients are reduced after the last
    micro-batch only; the earlier ones accumulate unsharded.
    """
    local_tokens = int((batch.targets != -100).sum())
    (global_tokens,) = all_reduce_sum([local_tokens / tp_size], device)
    if global_tokens == 0:
        raise UserError("a training batch has no target tokens (every target is -100)")
    scale = world_size / tp_size / global_tokens
    n_micro = -(-batch.targets.shape[0] // micro_batch_size)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    try:
        for i, loss in enumerate(
            _micro_batch_losses(model, batch, micro_batch_size, device, autocast)
        ):
            set_gradient_sync(model, i == n_micro - 1)
            (loss * scale).backward()
            loss_sum += loss.detach().float()
    finally:
        set_gradient_sync(model, True)
    (total,) = all_reduce_sum([loss_sum.item() / tp_size], device)
    return total / global_tokens, round(global_tokens)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch,
    *,
    step: int,
    lr: float,
    micro_batch_size: int,
    world_size: int,
    grad_clip: float,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    spikes: SpikeDetector | None = None,
    skip_spikes: bool = True,
    measure_update: bool = False,
    tp_size: int = 1,
) -> StepStats:
    """One optimizer step on one global batch.

    A divergence (see :class:`SpikeDetector`; without one, a non-finite loss or gradient norm)
    raises :class:`TrainingDiverged` before the update; with ``skip_spikes`` a loss spike
    skips the update. Both decisions use the global loss and norm, so every rank takes them alike.
    ``lr`` is the schedule's rate, which each parameter group scales by its own ``lr_scale``
    (:func:`pretrain.optim.set_lr`). ``measure_update`` adds the RMS of the update of each kind of
    group (a copy of the parameters for the step: logging steps only).
    """
    loss, tokens = forward_backward(
        model,
        batch,
        micro_batch_size=micro_batch_size,
        world_size=world_size,
        device=device,
        autocast=autocast,
        tp_size=tp_size,
    )
    grad_norm = _total_grad_norm(model, grad_clip)
    guard = spikes if spikes is not None else SpikeDetector(math.inf)
    reason = guard.divergence(loss, grad_norm)
    if reason is not None:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(step, f"{reason}; stopped before its update")
    if skip_spikes and guard.is_spike(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=loss, grad_norm=grad_norm, tokens=tokens, skipped=True)
    set_lr(optimizer, lr)
    before = snapshot_params(optimizer) if measure_update else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    guard.update(loss, grad_norm)
    rms = None
    if before is not None:
        rms = update_rms(optimizer, before, lambda values: all_reduce_sum(values, device))
    return StepStats(loss=loss, grad_norm=grad_norm, tokens=tokens, update_rms=rms)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    *,
    batches: int,
    micro_batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Mean loss per target token over ``batches`` global batches (all ranks together)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = 0
    for _ in range(batches):
        batch = next(loader)
        for loss in _micro_batch_losses(model, batch, micro_batch_size, device, autocast):
            loss_sum += loss.double()
        tokens += int((batch.targets != -100).sum())
    model.train()
    total, count = all_reduce_sum([loss_sum.item(), tokens], device)
    return total / max(count, 1)


# --------------------------------------------------------------------------- setup


def check_config(config: Config, world_size: int) -> int:
    """Check what only the run can know; return the gradient accumulation steps.

    Every single value was checked when the config was loaded; it is checked again here
    (cheaply) because :func:`train` also takes configs built or changed in code, as fine-tuning
    does. What is left needs the world size, or two sections that a caller may still change
    after loading (fine-tuning adopts the model shape of its init).
    """
    validate_config(config)
    t = config.train
    if config.data.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than model.max_seq_len="
            f"{config.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
        )
    replicate, shard, tp = config.parallel.mesh_shape(world_size)
    check_tensor_parallel(config.model, tp, config.data.seq_len)
    dp = replicate * shard  # the tp ranks of a group read the same rows
    per_pass = t.micro_batch_size * dp
    if t.global_batch_size % per_pass:
        what = "world size" if tp == 1 else "data-parallel ranks"
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x {what} = {t.micro_batch_size} x {dp} = "
            f"{per_pass}; the global batch must be a whole number of micro-batches per rank"
        )
    return t.global_batch_size // per_pass


def _param_dtype(config: Config, device: torch.device) -> torch.dtype:
    dtype = config.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[dtype]


def _default_data(config: Config) -> TrainData:
    """The TokenLoader splits of ``data.path``, after checking the data against the model."""
    verified = VerifiedShards()  # every loader made here skips the files another one hashed
    data_dir = Path(config.data.path)
    if not data_dir.is_dir():
        raise UserError(
            f"data directory not found: {data_dir}; prepare one with `pretrain prepare` "
            "or point --data at a prepared directory"
        )
    manifest = load_manifest(data_dir, verified)
    if manifest.vocab_size != config.model.vocab_size:
        raise UserError(
            f"{data_dir} was prepared with a vocabulary of {manifest.vocab_size} tokens but "
            f"model.vocab_size is {config.model.vocab_size}; set --model.vocab_size "
            f"{manifest.vocab_size} or prepare the data with that vocabulary size"
        )

    def make(split: str) -> LoaderFactory:
        def factory(rank: int, world_size: int):
            return TokenLoader(
                data_dir,
                split=split,
                seq_len=config.data.seq_len,
                batch_size=config.train.global_batch_size,
                rank=rank,
                world_size=world_size,
                seed=config.train.seed,
                num_workers=config.data.num_workers,
                return_doc_ids=config.model.doc_mask,
                verified=verified,
            )

        return factory

    val_tokens, val_bytes = manifest.num_tokens("val"), manifest.num_bytes("val")
    bytes_per_token = val_bytes / val_tokens if val_tokens and val_bytes else None
    make_val = make("val") if val_tokens else None
    return TrainData(make("train"), make_val, bytes_per_token, Path(manifest.tokenizer_path))


class Preemption:
    """Remembers a SIGTERM/SIGUSR1 so the loop can finish its step, save and exit cleanly.

    Under torchrun it also notices the agent's death (the parent process changes): a SIGUSR1
    or a SIGKILL to the agent leaves the workers unsupervised, and a requeued job would start
    a second trainer beside them, so they save and stop as if signalled. A plain run does not
    watch its parent: ``nohup pretrain train ... &`` must survive its shell.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, watch_parent: bool | None = None):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if watch_parent is None:
            watch_parent = "TORCHELASTIC_RUN_ID" in os.environ
        self._parent = os.getppid() if watch_parent else None

    @property
    def reason(self) -> str | None:
        """What asks the run to stop (a signal's name, or the agent's exit), or None."""
        if self.signal_name is not None:
            return self.signal_name
        if self._parent is not None and os.getppid() != self._parent:
            return "the exit of the torchrun agent"
        return None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # last completed optimizer step
    loss: float | None  # training loss of the last step
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None  # the checkpoint written last
    preempted: bool = False
    state: str = "finished"  # or "preempted", as status.json says


# --------------------------------------------------------------------------- the loop


def train(config: Config, out_dir: str | Path, data: TrainData | None = None) -> TrainResult:
    """Train ``config.model`` and write the run (config, metrics, checkpoints) to ``out_dir``.

    ``data`` is the run's data source (None: the prepared data at ``data.path``). The kernel
    backend ``train.kernels`` holds for the run and the previous one is back afterwards.
    """
    if config.train.dry_run:
        return dry_run(config, Path(out_dir))
    device_type = resolve_device(config.train.device)
    if config.train.kernels == "triton" and device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError(
                "train.kernels = triton on a CPU needs TRITON_INTERPRET=1 in the environment "
                "(very slow; for tests only); use --train.kernels auto"
            )
    accum = check_config(config, int(os.environ.get("WORLD_SIZE", "1")))
    dist_info = init_distributed(device_type)
    try:
        # one trainer per run directory (rank 0 holds the lock)
        with lock_run_dir(out_dir, dist_info), kernels.backend(config.train.kernels):
            return _train(config, Path(out_dir), dist_info, data, accum)
    finally:
        destroy_distributed()


def dry_run(config: Config, out_dir: Path) -> TrainResult:
    """``--train.dry_run``: one optimizer step of this run on fake tensors, then exit.

    This process is rank 0 of a fake process group of ``WORLD_SIZE`` ranks (see
    :func:`pretrain.plan.dry_run_world_size`): the config is checked for that world, the model
    is built on the meta device and parallelized as the trainer parallelizes it, its shards get
    fake storage (shapes, no memory), and the step runs this module's micro-batch loop (the
    first micro-batch without gradient reduction when the step accumulates, the last with it)
    and the optimizer's update. Every shape, placement and collective of a real step runs, so a
    256-rank 70B mesh is checked on a laptop. Fake tensors have no values: the scalar reads
    (token count, loss, gradient norm), the initial weights and the data are left out, and
    nothing is written to ``out_dir``.
    """
    world = dry_run_world_size(config)
    accum = check_config(config, world)
    t, seq = config.train, config.data.seq_len
    start = time.perf_counter()
    with fake_process_group(world) as dist_info:
        mesh = config.parallel.mesh_shape(world)
        model = sharded_meta_model(config, dist_info)
        n_params = sum(p.numel() for p in model.parameters())
        with fake_tensors():
            materialize_fake(model).train()
            optimizer = build_optimizer(model, config, dist_info.device)
            n_micro = min(accum, 2)
            ids = torch.zeros(n_micro * t.micro_batch_size, seq, dtype=torch.long)
            batch = Batch(inputs=ids, targets=ids, doc_ids=None)
            autocast = _autocast_factory(gpu_param_dtype(config), dist_info)
            losses = _micro_batch_losses(
                model, batch, t.micro_batch_size, dist_info.device, autocast
            )
            for i, loss in enumerate(losses):
                set_gradient_sync(model, i == n_micro - 1)
                (loss / (t.global_batch_size * seq)).backward()
            set_lr(optimizer, lr_at(0, t))
            optimizer.step()
            params = tensor_bytes(model.parameters())
            grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
            states = optimizer_state_bytes(optimizer)
            optimizer.zero_grad(set_to_none=True)
    print(
        f"dry run: rank 0 of {world} (mesh dp_replicate={mesh[0]} x dp_shard={mesh[1]} x "
        f"tp={mesh[2]}), {n_params:,} parameters\n"
        f"  rank 0 holds parameters {human_bytes(params)}, gradients {human_bytes(grads)}, "
        f"{config.optimizer.name} states {human_bytes(states)} ({states} bytes)\n"
        f"  ran {n_micro} of {accum} micro-batches of {t.micro_batch_size} x {seq} tokens "
        f"(forward, backward, gradient reduction on the last), the optimizer step: ok\n"
        "  not run: the values (token count, loss, gradient norm), initial weights, data, "
        "torch.compile, the Triton kernels\n"
        f"  done in {time.perf_counter() - start:.1f} s"
    )
    return TrainResult(
        out_dir=out_dir,
        step=1,
        loss=None,
        val_loss=None,
        val_bpb=None,
        checkpoint=None,
        state="dry_run",
    )


class Stateful(Protocol):
    """Anything whose state a checkpoint keeps: the loader, the spike guard, ..."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Run:
    """The parts of one run that the loop, its evaluations and its checkpoints all use.

    ``states`` are the loop's stateful objects beside the model and optimizer, saved under their
    names in every checkpoint's trainer state and restored on resume: a new piece of loop state
    is one more entry here. ``loader`` is each rank's own (the checkpointer keeps one per rank).
    """

    config: Config
    dist_info: DistInfo
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]
    train_loader: Loader
    data: TrainData
    spikes: SpikeDetector
    states: dict[str, Stateful]
    checkpointer: Checkpointer
    log: MetricsLogger
    flops_per_token: float
    peak_flops: float | None


@dataclass
class _Progress:
    """Where the run stands; ``step``, ``tokens_seen`` and ``skipped`` go into checkpoints."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    last: StepStats | None = None  # the latest step's statistics
    val_loss: float | None = None
    val_bpb: float | None = None
    last_saved: Path | None = None  # the checkpoint written last
    preempted: bool = False
    signal: str | None = None  # the signal that preempted the run on this rank, if any
    batch: Any = None  # the latest step's batch
    cpu_s: float = 0.0  # CPU seconds of this process in training steps (not evaluations)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped = state["skipped"]


def _train(
    config: Config, out_dir: Path, dist_info: DistInfo, data: TrainData | None, accum: int
) -> TrainResult:
    """Set the run up, train, and record how it ended in ``status.json``."""
    run, progress, resume_from = _set_up(config, out_dir, dist_info, data, accum)
    t, checkpointer, log = config.train, run.checkpointer, run.log
    status = _StatusFile(out_dir, enabled=dist_info.is_main)
    status.write("running", step=progress.step, checkpoint=resume_from)
    try:
        if progress.step == 0:
            _evaluate_and_log(run, progress)
        _train_until(run, progress, stop_at=t.steps if t.stop_at <= 0 else min(t.steps, t.stop_at))
        checkpointer.finish()
    except TrainingDiverged as e:
        checkpointer.finish()  # publish an asynchronous save of a good step before stopping
        log.close()
        good = checkpointer.latest()
        error = _diverged_error(e, good)
        status.write("diverged", step=e.step, checkpoint=good, message=str(error))
        raise error from None
    except BaseException as e:
        if isinstance(e, UserError):
            checkpointer.finish()
        log.close()
        with contextlib.suppress(OSError):  # a full disk must not hide the error itself
            status.write(
                "failed",
                step=progress.step,
                checkpoint=checkpointer.latest(),
                message=f"{type(e).__name__}: {e}"[:1000],
            )
        raise
    return _finish(run, progress, status, out_dir)


def _set_up(
    config: Config, out_dir: Path, dist_info: DistInfo, data: TrainData | None, accum: int
) -> tuple[_Run, _Progress, Path | None]:
    """Data, checkpointer, model, optimizer (after FSDP2: it steps the sharded parameters),
    resume or initial weights, and the log; returns the run, where it stands and what it
    resumed from."""
    device = dist_info.device
    rank, world = data_parallel_rank(dist_info, config.parallel)  # whose rows this rank reads
    data = data or _default_data(config)
    if data.on_start is not None:
        data.on_start(dist_info)
    checkpointer, resume_from = _open_checkpointer(config, out_dir, dist_info, data.tokenizer_path)
    model, param_dtype, flops_per_token, n_params = _build_model(config, dist_info)
    optimizer = build_optimizer(model, config, device)
    train_loader, spikes = data.make_train(rank, world), SpikeDetector.from_config(config)
    states: dict[str, Stateful] = {"spikes": spikes, "loader": train_loader}
    progress = _Progress()
    if resume_from is not None:
        base = checkpoint_base(resume_from)  # a LoRA checkpoint: the frozen base comes first
        if base is not None:
            init_from(base, model)
        _resume(checkpointer, resume_from, config, model, optimizer, progress, states)
    elif config.checkpoint.init_from:
        init_from(config.checkpoint.init_from, model)
    run = _Run(
        config=config,
        dist_info=dist_info,
        model=model,
        optimizer=optimizer,
        autocast=_autocast_factory(param_dtype, dist_info),
        train_loader=train_loader,
        data=data,
        spikes=spikes,
        states=states,
        checkpointer=checkpointer,
        log=_open_log(config, out_dir, dist_info, progress.step),
        flops_per_token=flops_per_token,
        peak_flops=peak_flops(device),
    )
    if dist_info.is_main:
        _write_run_header(
            config,
            out_dir,
            run.log,
            dist_info,
            step=progress.step,
            resume_from=resume_from,
            n_params=n_params,
            param_dtype=param_dtype,
            accum=accum,
        )
    return run, progress, resume_from


def _finish(run: _Run, progress: _Progress, status: _StatusFile, out_dir: Path) -> TrainResult:
    """The end of a run that was not stopped by an error: summary, status and the result."""
    barrier()
    state = "preempted" if progress.preempted else "finished"
    if run.dist_info.is_main and not progress.preempted:
        run.log.print(_summary_line(progress, run.config.train.steps, out_dir))
    run.log.close()
    saved = progress.last_saved or run.checkpointer.latest()  # a resumed run may have had no steps
    status.write(state, step=progress.step, checkpoint=saved, signal=progress.signal)
    return TrainResult(
        out_dir=out_dir,
        step=progress.step,
        loss=progress.last.loss if progress.last else None,
        val_loss=progress.val_loss,
        val_bpb=progress.val_bpb,
        checkpoint=progress.last_saved,
        preempted=progress.preempted,
        state=state,
    )


def _diverged_error(e: TrainingDiverged, good: Path | None) -> TrainingDiverged:
    """The divergence with what to do about it: the last good checkpoint (never a diverged
    one: nothing is saved that fails the guard) or the news that there is none."""
    advice = "lower train.lr, raise train.warmup_steps or set train.grad_clip"
    if good is None:
        return TrainingDiverged(
            e.step, f"{e.reason}. No checkpoint was saved before it: {advice}, then start again"
        )
    return TrainingDiverged(
        e.step,
        f"{e.reason}. The last good checkpoint is {good} (nothing after it was saved): {advice}, "
        f"then continue from it with --checkpoint.resume {good}",
    )


class _StatusFile:
    """``status.json`` in the run directory: how the run ended, for a wrapper to read.

    ``{"state": "running" | "finished" | "preempted" | "diverged" | "failed", "step": N,
    "checkpoint": path or null, "signal": ..., "message": ..., "pid": ..., "time": ...}``.
    Rank 0 writes it when the loop starts and at every exit, atomically (temporary file, fsync,
    rename), so a reader never sees half of one; ``running`` left behind means the process died
    without a chance to write (SIGKILL, power loss).
    """

    NAME = "status.json"

    def __init__(self, out_dir: Path, *, enabled: bool):
        self.path, self.enabled = Path(out_dir) / self.NAME, enabled

    def write(self, state: str, *, step: int, checkpoint: Path | None = None, **extra) -> None:
        if not self.enabled:
            return
        record = {
            "state": state,
            "step": step,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "signal": None,
            "message": None,
            **extra,
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.NAME + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- setting a run up


def _open_checkpointer(
    config: Config, out_dir: Path, dist_info: DistInfo, tokenizer_path: Path | None
) -> tuple[Checkpointer, Path | None]:
    """The run's checkpointer and the checkpoint to resume from (None: start fresh).

    Starting fresh in a directory that holds an earlier run's checkpoints is refused: the new
    run would write its checkpoints among the old ones. Workers restarted by torchrun
    (``--max-restarts``) continue from the latest checkpoint of the run, as
    ``--checkpoint.resume auto`` would: all of them, when any rank's agent counts a restart
    (``TORCHELASTIC_RESTART_COUNT`` is per node: the healthy nodes' ranks restart at 0).
    """
    checkpointer = Checkpointer(
        out_dir, dist_info=dist_info, config=config, tokenizer_path=tokenizer_path
    )
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    (restarted,) = all_reduce_sum([float(restarts)], dist_info.device)
    resume = "auto" if restarted and checkpointer.has_checkpoints() else config.checkpoint.resume
    resume_from = checkpointer.resolve_resume(resume)
    if resume_from is None and checkpointer.has_checkpoints():
        raise UserError(
            f"{out_dir} already holds checkpoints of an earlier run; continue it with "
            "--checkpoint.resume auto, or choose another --out"
        )
    return checkpointer, resume_from


def _build_model(
    config: Config, dist_info: DistInfo
) -> tuple[torch.nn.Module, torch.dtype, float, int]:
    """Seed, build the model on the meta device, parallelize it, then give each rank its shards
    of the initial weights; return it with its dtype, FLOPs/token, size.

    No rank ever holds the whole model: :func:`materialize` allocates the local shards and fills
    them from ``train.seed`` with the values ``Transformer(cfg, init_seed=train.seed)`` has, on
    any mesh. FLOPs and parameter count are read before :func:`parallelize` shards the model.
    """
    t = config.train
    seed_everything(t.seed)
    with torch.device("meta"):
        model = Transformer(config.model)
    flops_per_token = model.flops_per_token(config.data.seq_len)
    n_params = model.num_params()
    apply_lora_from_config(model, config)  # finetune.lora.rank > 0: frozen base, adapters
    param_dtype = _param_dtype(config, dist_info.device)
    model = parallelize(
        model,
        dist_info,
        config.parallel,
        param_dtype=param_dtype,
        activation_checkpointing=t.activation_checkpointing,
        compile=t.compile,
        mesh=build_mesh(dist_info, config.parallel),
    )
    materialize(model, dist_info.device, t.seed)
    model.train()
    return model, param_dtype, flops_per_token, n_params


def _autocast_factory(
    param_dtype: torch.dtype, dist_info: DistInfo
) -> Callable[[], contextlib.AbstractContextManager]:
    """The context the forward passes run in: autocast to ``param_dtype`` on a single CPU process.

    Where :func:`parallelize` applies FSDP2 (several ranks, or CUDA) its mixed-precision policy
    already casts, so autocast would be redundant there.
    """
    device = dist_info.device
    use_autocast = param_dtype != torch.float32 and not (
        dist_info.world_size > 1 or device.type == "cuda"
    )

    def autocast():
        if use_autocast:
            return torch.autocast(device.type, dtype=param_dtype)
        return contextlib.nullcontext()

    return autocast


def _resume(
    checkpointer: Checkpointer,
    path: Path,
    config: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: _Progress,
    states: dict[str, Stateful],
) -> None:
    """Continue from checkpoint ``path``: weights, optimizer, counters, RNG and every one of
    ``states`` (the loader at this rank's data position).

    The config's optimizer hyperparameters are applied over the restored param groups, so the
    resumed run follows the config it is given now, not the one saved with the checkpoint.
    """
    state = checkpointer.load(path, model, optimizer)
    apply_hyperparameters(optimizer, config)
    progress.load_state_dict(state)
    for name, stateful in states.items():
        saved = checkpointer.loader_state_for_rank(state) if name == "loader" else state.get(name)
        if saved is not None:  # a checkpoint of an older version may lack a piece
            stateful.load_state_dict(saved)
    checkpointer.restore_rng(state)


def _open_log(config: Config, out_dir: Path, dist_info: DistInfo, step: int) -> MetricsLogger:
    """The metrics log, started at ``step`` (it drops records a resumed run will write again)."""
    return MetricsLogger(
        out_dir,
        enabled=dist_info.is_main,
        total_steps=config.train.steps,
        start_step=step,
        wandb_config=config.to_dict() if config.logging.wandb else None,
    )


def _write_run_header(
    config: Config,
    out_dir: Path,
    log: MetricsLogger,
    dist_info: DistInfo,
    *,
    step: int,
    resume_from: Path | None,
    n_params: int,
    param_dtype: torch.dtype,
    accum: int,
) -> None:
    """Save ``config.toml`` and print the resolved config and what this run is (main rank).

    The saved config is what a later resume or export reads, and the printed one is what the
    run actually used after defaults and overrides.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.toml")
    log.print("resolved config:\n" + config_to_toml(config).rstrip())
    how = f"resuming from {resume_from}" if resume_from else "starting fresh"
    log.print(
        f"model: {n_params / 1e6:.2f}M parameters | world size {dist_info.world_size} | device "
        f"{dist_info.device.type} | {param_dtype} | grad accumulation {accum} | {how} at step {step}"
    )


# --------------------------------------------------------------------------- running it


def _train_until(run: _Run, progress: _Progress, stop_at: int) -> None:
    """Step until ``stop_at``, logging, evaluating and checkpointing as the config says.

    A SIGTERM/SIGUSR1 on any rank (or, under torchrun, the agent's death) ends the loop after
    the current step, with a checkpoint; all ranks agree on it through an all-reduce, so they
    save and stop at the same step. No checkpoint is written before :func:`_check_before_saving`
    has passed the weights it would hold.
    """
    config, device = run.config, run.dist_info.device
    t = config.train
    window_start, window_tokens = time.perf_counter(), 0
    deferred = False  # a checkpoint was due but its state was a spike: save at the next good step
    with Preemption() as preemption:
        while progress.step < stop_at:
            lr = lr_at(progress.step, t)
            step = progress.step + 1
            logged = step % max(config.logging.every, 1) == 0 or step == stop_at
            cpu_start = time.process_time()
            _take_step(run, progress, lr, measure_update=logged)
            progress.cpu_s += time.process_time() - cpu_start
            if t.cpu_budget_s > 0 and _budget_spent(progress.cpu_s, t.cpu_budget_s, device):
                stop_at = step  # this step is the last: logged, evaluated and saved
                logged = True
            window_tokens += progress.last.tokens
            if logged:
                tokens_per_s = _tokens_per_second(window_tokens, window_start, device)
                _log_train(run, progress, lr, tokens_per_s)
                window_start, window_tokens = time.perf_counter(), 0
            final = step == t.steps or (t.cpu_budget_s > 0 and step == stop_at)
            if config.eval.every > 0 and (step % config.eval.every == 0 or final):
                _evaluate_and_log(run, progress)
            run.checkpointer.poll()  # a background save that failed stops the run now
            reason = preemption.reason
            (signalled,) = all_reduce_sum([1.0 if reason else 0.0], device)
            due = deferred or (config.checkpoint.every > 0 and step % config.checkpoint.every == 0)
            last = bool(signalled) or step == stop_at
            if due or last:
                problem = _check_before_saving(run, progress)
                if problem is None:
                    progress.last_saved = run.checkpointer.save(
                        step, run.model, run.optimizer, _trainer_state(run, progress)
                    )
                    deferred = False
                elif last:
                    raise TrainingDiverged(
                        step, f"{problem}; the run ends here and it was not saved"
                    )
                else:
                    deferred = True
                    run.log.print(f"step {step}: checkpoint postponed: {problem}")
            if signalled:
                progress.preempted = True
                # asked again: the agent may have died after this rank looked, before another did
                progress.signal = preemption.reason or "a signal on another rank"
                run.log.print(
                    f"preempted by {progress.signal}: "
                    f"saved {progress.last_saved} at step {step}; rerun with "
                    "--checkpoint.resume auto to continue"
                )
                break


def _budget_spent(cpu_s: float, budget_s: float, device: torch.device) -> bool:
    """Whether any rank has used ``train.cpu_budget_s``: all ranks then stop at the same step."""
    (spent,) = all_reduce_sum([1.0 if cpu_s >= budget_s else 0.0], device)
    return spent > 0


def _probe_after_update(run: _Run, progress: _Progress) -> tuple[float, float]:
    """Loss and gradient norm of the latest step's batch under the weights that step left.

    One forward and backward pass, whose gradients are dropped: no data read, no random numbers
    drawn and nothing updated, so a run gives the same losses and weights with or without it.
    """
    t = run.config.train
    loss, _ = forward_backward(
        run.model,
        progress.batch,
        micro_batch_size=t.micro_batch_size,
        world_size=run.dist_info.world_size,
        device=run.dist_info.device,
        autocast=run.autocast,
        tp_size=_tp_size(run),
    )
    grad_norm = _total_grad_norm(run.model, 0.0)
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _check_before_saving(run: _Run, progress: _Progress) -> str | None:
    """Why the weights after this step must not be checkpointed yet (a spike), or None.

    A step's loss is computed before its update, so the update that does the damage passes its
    own check; the weights it left are judged here, by their loss and gradient on the batch
    just trained on: a blown-up model has a huge loss or gradient, a collapsed one (overflowed
    activations predict a uniform distribution) a gradient that vanished. A divergence raises
    :class:`TrainingDiverged`, so a diverged model is never saved and the newest checkpoint
    stays the last good one.
    """
    loss, grad_norm = _probe_after_update(run, progress)
    reason = run.spikes.divergence(loss, grad_norm)
    if reason is not None:
        raise TrainingDiverged(
            progress.step, f"after its update, {reason} on its batch; stopped before saving it"
        )
    if run.config.train.skip_spikes and run.spikes.is_spike(loss):
        return f"after its update the loss of its batch is {loss:.4f}, a spike"
    return None


def _tp_size(run: _Run) -> int:
    """The ranks of one tensor-parallel group (they read the same rows)."""
    return run.config.parallel.mesh_shape(run.dist_info.world_size)[2]


def _take_step(run: _Run, progress: _Progress, lr: float, measure_update: bool = False) -> None:
    """One optimizer step on the next global batch, counted in ``progress``.

    A step whose loss is a spike still counts (its batch was consumed) but is reported, so a
    run that keeps skipping is visible on the console; ``train.max_skipped_steps`` of them in a
    row stop it. The batch is kept for :func:`_check_before_saving`.
    """
    t = run.config.train
    progress.batch = next(run.train_loader)
    progress.last = train_step(
        run.model,
        run.optimizer,
        progress.batch,
        step=progress.step + 1,
        lr=lr,
        micro_batch_size=t.micro_batch_size,
        world_size=run.dist_info.world_size,
        grad_clip=t.grad_clip,
        device=run.dist_info.device,
        autocast=run.autocast,
        spikes=run.spikes,
        skip_spikes=t.skip_spikes,
        measure_update=measure_update,
        tp_size=_tp_size(run),
    )
    progress.step += 1
    progress.tokens_seen += progress.last.tokens
    run.log.advance()
    if progress.last.skipped:
        progress.skipped += 1
        run.log.print(
            f"step {progress.step}: loss {progress.last.loss:.4f} is a spike; "
            f"update skipped ({progress.skipped} so far)"
        )
        if run.spikes.skipped():
            raise TrainingDiverged(
                progress.step,
                f"{run.spikes.consecutive_skips} steps in a row were loss spikes and skipped "
                f"(train.max_skipped_steps = {t.max_skipped_steps}): the model does not recover",
            )


def _tokens_per_second(tokens: int, since: float, device: torch.device) -> float:
    """Throughput since ``since``; CUDA is synchronised first, since its kernels run async."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - since
    return tokens / elapsed if elapsed > 0 else 0.0


def _log_train(run: _Run, progress: _Progress, lr: float, tokens_per_s: float) -> None:
    """Record the latest step's loss, rate, throughput, MFU and memory in the metrics log."""
    device, last = run.dist_info.device, progress.last
    run.log.log(
        "train",
        progress.step,
        {
            "loss": last.loss,
            "lr": lr,
            "grad_norm": last.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(run.flops_per_token, tokens_per_s, run.dist_info.world_size, run.peak_flops),
            "peak_mem_gb": peak_memory_gb(device),
            "tokens": progress.tokens_seen,
            "cpu_s": progress.cpu_s,
            "skipped": progress.skipped,
            **(last.update_rms or {}),
        },
    )


def _evaluate_and_log(run: _Run, progress: _Progress) -> None:
    """Validation loss (and bits per byte) at the current step, kept in ``progress`` and logged.

    The val loader is made afresh each time so every evaluation sees the same batches; nothing
    happens without val data or with ``eval.every <= 0``.
    """
    config = run.config
    if run.data.make_val is None or config.eval.every <= 0:
        return
    val_loss = evaluate(
        run.model,
        run.data.make_val(*data_parallel_rank(run.dist_info, run.config.parallel)),
        batches=config.eval.batches,
        micro_batch_size=config.train.micro_batch_size,
        device=run.dist_info.device,
        autocast=run.autocast,
    )
    bpt = run.data.bytes_per_token
    progress.val_loss = val_loss
    progress.val_bpb = val_loss / math.log(2) / bpt if bpt else None
    run.log.log(
        "eval",
        progress.step,
        {
            "val_loss": val_loss,
            "val_bpb": progress.val_bpb,
            "tokens": progress.tokens_seen,
            "cpu_s": progress.cpu_s,
        },
    )


def _trainer_state(run: _Run, progress: _Progress) -> dict[str, Any]:
    """The loop's own state for a checkpoint, beside the model and optimizer: what a resume
    needs to continue exactly (the counters, then each of ``run.states`` under its name)."""
    t = run.config.train
    return {
        **progress.state_dict(),
        "lr": lr_at(max(progress.step - 1, 0), t),
        "schedule": t.schedule,
        **{name: stateful.state_dict() for name, stateful in run.states.items()},
    }


def _summary_line(progress: _Progress, total_steps: int, out_dir: Path) -> str:
    """The closing console line: where the run got to and its last losses."""
    summary = f"done: step {progress.step}/{total_steps}"
    if progress.last is not None:
        summary += f" | loss {progress.last.loss:.4f}"
    if progress.val_loss is not None:
        summary += f" | val_loss {progress.val_loss:.4f}"
    if progress.val_bpb is not None:
        summary += f" | val_bpb {progress.val_bpb:.4f}"
    return summary + f" | {out_dir}"


if __name__ == "__main__":
    # ``torchrun -m pretrain.train ...`` enters here: the ``pretrain train`` command.
    from pretrain.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
