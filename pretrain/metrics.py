"""Training metrics: one console line per log step, ``metrics.jsonl`` always, wandb when asked.

Only rank 0 writes. Every record is a flat JSON object with a ``kind`` (``train`` or ``eval``)
and a ``step``, so a run can be plotted or compared with ``json.loads`` per line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import UserError

# Dense bf16 peak (no sparsity) of the GPUs MFU is reported for, by device-name substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not known (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float | None):
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=-"
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key}={value:.3e}"
        if key in ("tok/s",):
            return f"{key}={value:,.0f}"
        if key in ("mfu",):
            return f"{key}={100 * value:.1f}%"
        return f"{key}={value:.4f}"
    return f"{key}={value}"


class MetricsLogger:
    """Console lines, ``metrics.jsonl`` and wandb for one run; a no-op on ranks other than 0."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass  # no progress bar without tqdm; the console lines still come
            else:
                self._bar = tqdm(
                    total=total_steps,
                    initial=start_step,
                    unit="step",
                    dynamic_ncols=True,
                    leave=False,
                )
        if wandb_config is not None:
            self._wandb = _start_wandb(out_dir, wandb_config)

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step``, left by an interrupted run this one resumes (all of them
        when starting at step 0: an earlier attempt that saved no checkpoint)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if step > 0 and line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def print(self, message: str) -> None:
        """A line on stdout that does not tear the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, kind: str, step: int, values: dict[str, Any], *, console: bool = True) -> None:
        """Record ``values`` at ``step``: a JSON line, a wandb point and (optionally) a console line."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            prefix = "val" if kind == "eval" else "train"
            points = {f"{prefix}/{k.removeprefix('val_')}": v for k, v in values.items()}
            self._wandb.log({k: v for k, v in points.items() if v is not None}, step=step)
        if console:
            width = len(str(self.total_steps))
            head = f"{kind} step={step:>{width}}/{self.total_steps}"
            self.print(" ".join([head, *(_fmt(k, v) for k, v in _console_view(values).items())]))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _console_view(values: dict[str, Any]) -> dict[str, Any]:
    renames = {"tokens_per_s": "tok/s", "peak_mem_gb": "mem_gb"}
    view = {renames.get(k, k): v for k, v in values.items() if k not in ("tokens", "time_s")}
    return {k: v for k, v in view.items() if v is not None and not (k == "skipped" and not v)}


def _start_wandb(out_dir: Path, config: dict[str, Any]):
    """Start a wandb run; offline (files under the run directory) unless WANDB_API_KEY is set."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            "logging.wandb is true but wandb is not installed: pip install wandb "
            "(or run with --logging.wandb false)"
        ) from None
    logging_cfg = config.get("logging", {})
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    return wandb.init(
        project=logging_cfg.get("wandb_project") or "pretrain",
        name=logging_cfg.get("wandb_run_name") or Path(out_dir).name,
        config=config,
        dir=str(out_dir),
        mode=mode,
    )
