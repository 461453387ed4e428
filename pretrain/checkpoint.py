"""Checkpoints with torch.distributed.checkpoint (DCP): save, resume, prune, load weights.

Layout of a run's checkpoints::

    runs/NAME/checkpoints/
        step-000100/            a DCP directory (.metadata + one .distcp file per rank)
            config.toml         the resolved config of the run
            tokenizer.json      the tokenizer of the data
        step-000200/
        latest                  text: the directory name of the newest complete checkpoint

The DCP state dict has three entries: ``"model"`` (the model's state dict with the plain names of
``pretrain.model.Transformer.state_dict()``, whatever wrapping FSDP, compile or activation
checkpointing added), ``"optimizer"`` (the optimizer state keyed by the same names) and
``"trainer"`` (bytes: ``torch.save`` of a dict, read back with ``weights_only=True``, with the step, tokens seen, the schedule, the loader
state and RNG states of every rank). DCP reshards on load, so a run saved by N ranks resumes on M.

Publication is atomic: every rank writes into ``.tmp-step-000100``; rank 0 then adds the config and
the tokenizer, renames the directory and only then rewrites ``latest`` (temporary file, rename).
A process killed mid-save leaves a ``.tmp-*`` directory that the next start deletes, and
``latest`` still names the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import save_config
from pretrain.errors import UserError
from pretrain.parallel import DistInfo, barrier

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it runs "in a single process" whenever there is no process group: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_checkpoint_dir(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``: a step directory, a checkpoints directory or a
    run directory (the last two through their ``latest``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if is_checkpoint_dir(p):
        return p
    for base in (p, p / CHECKPOINTS):
        latest = base / LATEST
        if latest.is_file():
            target = base / latest.read_text().strip()
            if not is_checkpoint_dir(target):
                raise UserError(f"{latest} names {target.name}, which is not a complete checkpoint")
            return target
    if p.name.startswith(TMP_PREFIX) or any(p.glob("*.distcp")):
        raise UserError(
            f"{p} is a half-written checkpoint (no .metadata): it was interrupted while saving; "
            "resume from the previous one"
        )
    raise UserError(
        f"{p} is not a checkpoint: expected a step-N directory with a .metadata file, or a run "
        "directory whose checkpoints/latest names one"
    )


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:
        raise UserError(f"checkpoint {path} cannot be read (damaged .metadata?): {e}") from None


def _check_model_shapes(path: Path, metadata, model_sd: dict[str, Any], prefix: str) -> None:
    """Every model tensor must be in the checkpoint with the same shape; name the first that isn't."""
    saved = metadata.state_dict_metadata
    for name, tensor in model_sd.items():
        key = f"{prefix}{name}"
        if key not in saved:
            raise UserError(
                f"checkpoint {path} has no parameter '{name}': it was saved from another model "
                "(check model.n_layers and model.tie_embeddings)"
            )
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != tuple(tensor.shape):
            raise UserError(
                f"checkpoint {path} does not fit the model: parameter '{name}' has shape "
                f"{list(shape)} in the checkpoint but {list(tensor.shape)} in the model "
                "(the model section of the config differs from the one it was saved with)"
            )


def _dcp_load(state: dict, path: Path) -> None:
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        message = [line for line in str(e).strip().splitlines() if line.strip()]
        raise UserError(
            f"checkpoint {path} could not be loaded (damaged or incomplete file?): "
            f"{message[-1][:300] if message else type(e).__name__}"
        ) from None


def _rng_state(device: torch.device) -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves and loads the checkpoints of one run directory, on every rank together."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        dist_info: DistInfo,
        config,
        tokenizer_path: str | Path | None,
    ):
        self.root = Path(run_dir) / CHECKPOINTS
        self.dist = dist_info
        self.config = config
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.keep_last = config.checkpoint.keep_last
        self.keep_steps = set(config.checkpoint.keep_steps)
        self.async_save = config.checkpoint.async_save
        self._pending: tuple[Any, Path, Path] | None = None  # (future, tmp dir, final dir)
        self._async_group = None
        self._remove_incomplete()

    # ------------------------------------------------------------------ finding checkpoints

    def _remove_incomplete(self) -> None:
        """Delete ``.tmp-*`` directories left by a save that was killed (rank 0; all wait)."""
        if self.dist.is_main and self.root.is_dir():
            for tmp in self.root.glob(TMP_PREFIX + "*"):
                print(f"removing half-written checkpoint {tmp}", flush=True)
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if that is gone (a crash while a step was being
        saved a second time), the newest complete ``step-N`` directory."""
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        target = self.root / latest.read_text().strip()
        if is_checkpoint_dir(target):
            return target
        complete = sorted(
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and is_checkpoint_dir(p)
        )
        return complete[-1][1] if complete else None

    def has_checkpoints(self) -> bool:
        return self.root.is_dir() and any(
            _STEP_DIR.match(p.name) and is_checkpoint_dir(p) for p in self.root.iterdir()
        )

    def resolve_resume(self, resume: str) -> Path | None:
        """``""``: no resume; ``auto``: the latest checkpoint of this run if any; else a path."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        return find_checkpoint(resume)

    # ------------------------------------------------------------------ saving

    def _state(self, model, optimizer, trainer: dict[str, Any]) -> dict[str, Any]:
        ranks = self._gather_rank_states(trainer.pop("loader"))
        trainer = {**trainer, "world_size": self.dist.world_size, "ranks": ranks}
        buffer = io.BytesIO()
        torch.save(trainer, buffer)
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "trainer": buffer.getvalue(),
        }

    def _gather_rank_states(self, loader_state: Any) -> list[dict[str, Any]]:
        mine = {"loader": loader_state, "rng": _rng_state(self.dist.device)}
        if not dist.is_initialized():
            return [mine]
        every: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(every, mine)
        return every

    def save(self, step: int, model, optimizer, trainer: dict[str, Any]) -> Path:
        """Write a checkpoint of ``step``; returns its final directory (complete unless async)."""
        self._finish_pending()
        name = step_dir_name(step)
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        state = self._state(model, optimizer, dict(trainer))
        if self.async_save:
            if dist.is_initialized() and self._async_group is None:
                # Background collectives need their own group, apart from training's.
                self._async_group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = (future, tmp, final)
            return final
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        self._publish(tmp, final)
        barrier()
        return final

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        barrier()
        self._publish(tmp, final)
        barrier()

    def finish(self) -> None:
        """Wait for an asynchronous save to complete and publish it."""
        self._finish_pending()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0: add config and tokenizer, rename into place, then point ``latest`` at it."""
        if not self.dist.is_main:
            return
        save_config(self.config, tmp / "config.toml")
        if self.tokenizer_path is not None and self.tokenizer_path.is_file():
            shutil.copyfile(self.tokenizer_path, tmp / "tokenizer.json")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run stopping where it began)
            old = final.with_name(TMP_PREFIX + final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_text_atomic(self.root / LATEST, final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints (all when <= 0) and those in ``keep_steps``."""
        if self.keep_last <= 0:
            return
        steps = sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))
        )
        for step in steps[: -self.keep_last]:
            if step not in self.keep_steps:
                shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def load(self, path: Path, model, optimizer) -> dict[str, Any]:
        """Restore model and optimizer from ``path``; return the trainer state saved with them."""
        path = find_checkpoint(path)
        metadata = _read_metadata(path)
        model_sd = get_model_state_dict(model)
        _check_model_shapes(path, metadata, model_sd, "model.")
        state = {
            "model": model_sd,
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "trainer": b"",
        }
        _dcp_load(state, path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        trainer = torch.load(io.BytesIO(state["trainer"]), weights_only=True)
        if self.dist.is_main:
            print(f"resumed from {path} at step {trainer['step']}", flush=True)
        return trainer

    def loader_state_for_rank(self, trainer: dict[str, Any]) -> Any:
        """This rank's loader state; its global position is the same on every rank, so with
        another world size rank 0's state continues the same global sequence."""
        ranks = trainer["ranks"]
        same_world = trainer["world_size"] == self.dist.world_size
        return ranks[self.dist.rank if same_world else 0]["loader"]

    def restore_rng(self, trainer: dict[str, Any]) -> None:
        if trainer["world_size"] == self.dist.world_size:
            _set_rng_state(trainer["ranks"][self.dist.rank]["rng"], self.dist.device)


# ---------------------------------------------------------------------- weights only


def _is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def load_weights(path: str | Path, model) -> None:
    """Initialise ``model`` from a checkpoint's or an export's weights only (no optimizer/data)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint.init_from: {p} does not exist")
    model_sd = get_model_state_dict(model)
    if _is_export_dir(p):
        from pretrain.export import load_export

        _, weights, _ = load_export(p)  # checksums verified, names mapped back to ours
        for name, tensor in model_sd.items():
            if name not in weights:
                raise UserError(f"export {p} has no tensor for parameter '{name}'")
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise UserError(
                    f"export {p} does not fit the model: parameter '{name}' has shape "
                    f"{list(weights[name].shape)} in the export but {list(tensor.shape)} in the model"
                )
        full = {k: weights[k].to(t.dtype) for k, t in model_sd.items()}
        set_model_state_dict(
            model, full, options=StateDictOptions(full_state_dict=True, strict=True)
        )
        return
    ckpt_dir = find_checkpoint(p)
    metadata = _read_metadata(ckpt_dir)
    _check_model_shapes(ckpt_dir, metadata, model_sd, "model.")
    state = {"model": model_sd}
    _dcp_load(state, ckpt_dir)
    set_model_state_dict(model, state["model"])
