"""Checkpoints with torch.distributed.checkpoint (DCP): save, resume, prune, load weights.

Layout of a run's checkpoints::

    runs/NAME/.run.lock         the run directory's lock: host and pid of the trainer using it
    runs/NAME/checkpoints/
        step-000100/            a DCP directory (.metadata + one .distcp file per rank)
            config.toml         the resolved config of the run
            tokenizer.json      the tokenizer of the data
            trainer.json        step, tokens seen, schedule, loader and RNG state of every rank
        step-000200/
        latest                  text: the directory name of the newest complete checkpoint
        abandoned-<time>/       later steps set aside by a resume from an older step

The DCP state dict has two entries: ``"model"`` (the model's state dict with the plain names of
``pretrain.model.Transformer.state_dict()``, whatever wrapping FSDP, compile or activation
checkpointing added) and ``"optimizer"`` (the optimizer state keyed by the same names). The
trainer's own state is JSON (RNG states as base64 of their bytes). DCP reshards on load, so a run
saved by N ranks resumes on M. :func:`read_model_weights` reads the full (unsharded) model weights
of a checkpoint in one process, checked against its ``config.toml``: ``pretrain export`` and
:func:`load_weights` (``checkpoint.init_from``) both read weights through it.

Nothing read from a checkpoint is unpickled with arbitrary classes: ``.metadata`` (a pickle) goes
through :class:`SafeFileSystemReader`, whose unpickler admits only DCP's metadata classes, and the
few non-tensor entries (optimizer hyperparameters) through ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`). Every read of a checkpoint in the project uses these two.

Publication is atomic: every rank writes into ``.tmp-step-000100``; rank 0 then adds the config,
the tokenizer and the trainer state, renames the directory and only then rewrites ``latest``
(temporary file, rename). A process killed mid-save leaves a ``.tmp-*`` directory that the next
start deletes, and ``latest`` still names the previous complete checkpoint. Saving a step that
exists already moves the old copy to ``.old-step-N`` first; a start that finds ``.old-step-N``
without ``step-N`` (killed between the two renames) puts it back.

One trainer at a time uses a run directory: :func:`lock_run_dir` takes an exclusive ``flock`` on
``.run.lock`` (rank 0 under torchrun) before anything in the directory is touched; the kernel
releases it when the process ends, however it ends.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import ModelConfig, load_config, save_config
from pretrain.errors import UserError
from pretrain.model import Transformer
from pretrain.parallel import DistInfo, all_reduce_sum, barrier
from pretrain.tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # a complete step-N moved aside while the same step is saved again
ABANDONED_PREFIX = "abandoned-"
TRAINER_STATE = "trainer.json"
# Copied from beside the tokenizer when there: a Hugging Face model's special tokens and template.
TOKENIZER_SIDECARS = (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)
LOCK_FILE = ".run.lock"
TRAINER_FORMAT = 2  # 1: the pickled "trainer" entry of older checkpoints (read, never written)
_STEP_DIR = re.compile(r"^step-(\d+)$")
# A model with frozen parameters (LoRA) is checkpointed without them; this file names their base.
BASE_POINTER = "base.json"
_SMALL_FILE = 1 << 20  # files up to this size count by content in a base's identity
# Model keys a resume may change: they only matter when the weights are first initialised.
_MODEL_KEYS_FREE_ON_RESUME = ("init_std", "zero_init_residual")


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


# ---------------------------------------------------------------------- reading without pickle


_DCP_META = "torch.distributed.checkpoint.metadata"
# What DCP's .metadata pickles (found with pickletools on checkpoints of 1 and 2 ranks): its own
# dataclasses, torch.Size, dtypes, the layout lookup and the checkpoint path. Nothing else runs.
_METADATA_GLOBALS = {
    *(
        (_DCP_META, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the classes a DCP ``.metadata`` is made of.

    A pickle runs whatever callable it names; refusing every other global makes a crafted
    ``.metadata`` an error instead of code execution.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not part of DCP checkpoint metadata"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids, which DCP metadata never does")


def _unpickle_metadata(stream) -> Metadata:
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :class:`_MetadataUnpickler`, not ``pickle``.

    Tensor data is read by DCP itself with ``torch.load(weights_only=True)``; pass this reader
    to ``dcp.load`` (``storage_reader=``) together with :class:`SafeLoadPlanner`.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as stream:
            metadata = _unpickle_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by ``torch.load(weights_only=True)``.

    DCP stores non-tensor values (the optimizer's hyperparameters) with ``torch.save`` and reads
    them with ``weights_only=False``; a crafted entry there would run code like a pickle does.
    """

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise UserError(
                f"entry '{read_item.dest_index.fqn}' is not plain data "
                f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}); "
                "refused"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of checkpoint ``path``, read without running any code from it."""
    path = Path(path)
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(
            f"checkpoint {path} cannot be read: its .metadata was refused ({reason}); it is "
            "damaged or was not written by DCP"
        ) from None


def dcp_load(state: dict, path: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``state`` from ``path`` through the safe reader and planner; errors are
    one-line :class:`UserError`s naming the checkpoint."""
    path = Path(path)
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(str(path)),
                planner=SafeLoadPlanner(),
                no_dist=no_dist,
            )
    except UserError as e:
        raise UserError(f"checkpoint {path} could not be read: {e}") from None
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        cause = _first_user_error(e)
        if cause is not None:
            raise UserError(f"checkpoint {path} could not be read: {cause}") from None
        message = [line for line in str(e).strip().splitlines() if line.strip()]
        raise UserError(
            f"checkpoint {path} could not be read (damaged or incomplete file?): "
            f"{message[-1][:300] if message else type(e).__name__}"
        ) from None


def _exception_chain(e: BaseException):
    """``e``, its causes and contexts, and the per-rank failures inside a CheckpointException."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [pair[0] for pair in x.failures.values() if isinstance(pair, tuple)]


def _first_user_error(e: BaseException) -> UserError | None:
    return next((x for x in _exception_chain(e) if isinstance(x, UserError)), None)


def check_fits_model(
    source: str, shapes: dict[str, tuple[int, ...]], model_sd: dict[str, Any]
) -> None:
    """Every tensor of ``model_sd`` must be in ``shapes`` (name -> shape of the weights read from
    ``source``, e.g. ``"checkpoint runs/x/checkpoints/step-000100"``) with the same shape; the
    first that isn't is named with both shapes."""
    kind = source.split()[0]
    for name, tensor in model_sd.items():
        if name not in shapes:
            raise UserError(
                f"{source} has no parameter '{name}': it was saved from another model "
                "(check model.n_layers and model.tie_embeddings)"
            )
        shape = tuple(shapes[name])
        if shape != tuple(tensor.shape):
            raise UserError(
                f"{source} does not fit the model: parameter '{name}' has shape "
                f"{list(shape)} in the {kind} but {list(tensor.shape)} in the model "
                "(the model section of the config differs from the one it was saved with)"
            )


def _check_model_shapes(path: Path, metadata, model_sd: dict[str, Any], prefix: str) -> None:
    """Every model tensor must be in the checkpoint with the same shape; name the first that isn't."""
    shapes = {
        key.removeprefix(prefix): tuple(getattr(entry, "size", ()))
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    check_fits_model(f"checkpoint {path}", shapes, model_sd)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str | torch.Tensor) -> torch.Tensor:
    """An RNG state back as a uint8 tensor (older checkpoints hold the tensor itself)."""
    if isinstance(text, torch.Tensor):
        return text
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG states as JSON values: ints, floats, strings (byte states as base64)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def _json_default(value: Any) -> Any:
    """NumPy and 0-d torch scalars in the trainer state become plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot go into {TRAINER_STATE}")


def _read_trainer_json(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` (``trainer.json``), checked for its keys."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} cannot be read ({e}): the checkpoint is damaged") from None
    needed = ("step", "tokens_seen", "skipped", "world_size", "ranks")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise UserError(f"{file} lacks the keys {', '.join(needed)}: the checkpoint is damaged")
    if not isinstance(state["ranks"], list) or len(state["ranks"]) != state["world_size"]:
        raise UserError(f"{file}: 'ranks' does not hold one state per rank; it is damaged")
    return state


def _legacy_trainer_state(path: Path, blob: Any) -> dict[str, Any]:
    """The pickled trainer entry of a checkpoint written before ``trainer.json``, read with
    ``weights_only=True`` (plain data and tensors only, never code)."""
    try:
        if not isinstance(blob, bytes):
            raise TypeError(f"a {type(blob).__name__}, not bytes")
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"checkpoint {path}: its trainer state is not plain data ({reason}); refused"
        ) from None


# ---------------------------------------------------------------------- the run directory lock


_held_locks: dict[Path, RunLock] = {}


class RunLock:
    """This process's exclusive ``flock`` on a run directory's ``.run.lock``.

    Re-entrant within the process (``pretrain finetune`` takes it before the trainer it calls
    takes it again); ranks other than 0 hold a lock without a file. The file keeps the holder's
    host and pid while it is held and is emptied on release, so a start that finds it non-empty
    knows the previous holder died.
    """

    def __init__(self, path: Path | None, fd: int | None):
        self.path, self.fd, self.count = path, fd, 1

    def release(self) -> None:
        """Give the lock up (the last of nested holds does it); the kernel does this too when the
        process ends, however it ends."""
        self.count -= 1
        if self.count > 0 or self.fd is None:
            return
        _held_locks.pop(self.path, None)
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 512, 0).decode().strip()
    return ""


def _acquire_run_lock(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process or raise a one-line error naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.resolve() / LOCK_FILE
    held = _held_locks.get(path)
    if held is not None:
        held.count += 1
        return held
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd) or "holder unknown"
        os.close(fd)
        raise UserError(
            f"run directory {run_dir} is in use by another trainer ({holder}; lock file {path}): "
            "wait for it to end or stop it, or choose another --out"
        ) from None
    except OSError as e:
        os.close(fd)
        raise UserError(
            f"cannot lock {path} ({e.strerror}): this filesystem does not support flock; "
            "choose an --out on a local or lock-capable filesystem"
        ) from None
    previous = _read_holder(fd)
    if previous:
        print(f"{path}: its previous holder ({previous}) ended without releasing it; taking "
              "the run directory over", flush=True)  # fmt: skip
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
    os.fsync(fd)
    lock = _held_locks[path] = RunLock(path, fd)
    return lock


def lock_run_dir(run_dir: str | Path, dist_info: DistInfo | None = None) -> RunLock:
    """Lock ``run_dir`` for this run before anything in it is touched (use as a context manager).

    Rank 0 takes the lock; under torchrun every rank then learns through an all-reduce whether
    it did, so all ranks stop together with a one-line error instead of waiting on rank 0.
    """
    is_main = dist_info is None or dist_info.is_main
    lock, error = RunLock(None, None), None
    if is_main:
        try:
            lock = _acquire_run_lock(Path(run_dir))
        except UserError as e:
            error = e
    if dist_info is not None and dist.is_initialized():
        (failed,) = all_reduce_sum([1.0 if error else 0.0], dist_info.device)
        if failed and error is None:
            raise UserError(f"run directory {run_dir} is in use by another trainer (see rank 0)")
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------------- disk space


def _state_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what a checkpoint of it takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()  # a DTensor counts its global size
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v) for v in value)
    return 0


def _space_problem(e: BaseException) -> str | None:
    """What ran out, if ``e`` (or what caused it, on any rank) says the disk or a limit did."""
    for x in _exception_chain(e):
        code = x.errno if isinstance(x, OSError) else None
        text = str(x).lower()
        if code in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text or "quota" in text:
            return "no space left on device"
        if code == errno.EFBIG or "file too large" in text:
            return "no space left on device for it: a file hit the file size limit (ulimit -f)"
    return None


def _file_size_limit() -> float:
    """The soft RLIMIT_FSIZE of this process in bytes (inf when unlimited)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return float("inf") if soft == resource.RLIM_INFINITY else float(soft)


def _mb(n: int | None) -> str:
    return "? MB" if n is None else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------- the checkpointer


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
        self._pending: tuple[Any, Path, Path, int] | None = None  # (future, tmp, final, bytes)
        self._async_group = None
        self._frozen = False  # the latest saved model had frozen parameters (LoRA)
        self._pointer: str | None = None  # base.json of such checkpoints, made once
        self._remove_incomplete()

    # ------------------------------------------------------------------ finding checkpoints

    def _remove_incomplete(self) -> None:
        """Put back a ``step-N`` a kill left under ``.old-step-N``, then delete ``.tmp-*``
        directories left by a save that was killed (rank 0; all wait)."""
        if self.dist.is_main and self.root.is_dir():
            for old in self.root.glob(OLD_PREFIX + "step-*"):
                final = self.root / old.name.removeprefix(OLD_PREFIX)
                if is_checkpoint_dir(final):
                    shutil.rmtree(old, ignore_errors=True)  # the swap had finished
                elif is_checkpoint_dir(old):
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(old, final)
                    print(f"restored {final} (a save of the same step was interrupted)", flush=True)
            for tmp in self.root.glob(TMP_PREFIX + "*"):
                print(f"removing half-written checkpoint {tmp}", flush=True)
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """The ``step-N`` directories of this run, by step."""
        if not self.root.is_dir():
            return []
        return sorted(
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))
        )

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if that is gone (a crash while a step was being
        saved a second time), the newest complete ``step-N`` directory."""
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        target = self.root / latest.read_text().strip()
        if is_checkpoint_dir(target):
            return target
        complete = [p for _, p in self._step_dirs() if is_checkpoint_dir(p)]
        return complete[-1] if complete else None

    def has_checkpoints(self) -> bool:
        return any(is_checkpoint_dir(p) for _, p in self._step_dirs())

    def resolve_resume(self, resume: str) -> Path | None:
        """``""``: no resume; ``auto``: the latest checkpoint of this run if any; else a path."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        return find_checkpoint(resume)

    # ------------------------------------------------------------------ saving

    def _state(self, model, optimizer) -> dict[str, Any]:
        self._frozen = has_frozen_parameters(model)
        return {
            "model": trainable_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }

    def _base_pointer(self) -> str:
        """``base.json`` of a checkpoint without its frozen parameters: where they come from
        (``checkpoint.init_from``, resolved to the step or export it names now) and that
        directory's identity, so a base changed or replaced later is refused, not used."""
        if self._pointer is None:
            init = self.config.checkpoint.init_from
            if not init:
                raise UserError(
                    "a model with frozen parameters needs checkpoint.init_from: its checkpoints "
                    "hold only the trainable ones"
                )
            base = resolve_base(init)
            pointer = {"path": str(base.resolve()), "identity": base_identity(base)}
            self._pointer = json.dumps(pointer, indent=2) + "\n"
        return self._pointer

    def _trainer_json(self, trainer: dict[str, Any]) -> str:
        """``trainer.json``: the loop's state with every rank's loader and RNG state (a
        collective: all ranks call it)."""
        ranks = self._gather_rank_states(trainer.pop("loader"))
        state = {
            "format": TRAINER_FORMAT,
            **trainer,
            "world_size": self.dist.world_size,
            "ranks": ranks,
        }
        return json.dumps(state, default=_json_default) + "\n"

    def _gather_rank_states(self, loader_state: Any) -> list[dict[str, Any]]:
        mine = {"loader": loader_state, "rng": _rng_state(self.dist.device)}
        if not dist.is_initialized():
            return [mine]
        every: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(every, mine)
        return every

    def save(self, step: int, model, optimizer, trainer: dict[str, Any]) -> Path:
        """Write a checkpoint of ``step``; returns its final directory (complete unless async).

        Running out of space is a one-line error naming the directory, the bytes needed and
        free; the previous checkpoint and ``latest`` stay as they were.
        """
        self._finish_pending()
        name = step_dir_name(step)
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        trainer_text = self._trainer_json(dict(trainer))
        state = self._state(model, optimizer)
        need = _state_bytes(state) + len(trainer_text)
        try:
            if self.dist.is_main:
                _write_text_atomic(tmp / TRAINER_STATE, trainer_text)
            if self.async_save:
                if dist.is_initialized() and self._async_group is None:
                    # Background collectives need their own group, apart from training's.
                    self._async_group = dist.new_group(backend="gloo")
                if not dist.is_initialized():  # the write runs in a thread, after this call
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                with _quiet_single_process():
                    future = dcp.async_save(
                        state, checkpoint_id=str(tmp), process_group=self._async_group
                    )
                self._pending = (future, tmp, final, need)
                return final
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as e:
            self._raise_save_error(e, tmp, final, need)
        barrier()
        self._publish(tmp, final, need)
        barrier()
        return final

    def _raise_save_error(self, e: BaseException, tmp: Path, final: Path, need: int) -> None:
        """Turn a failed save into one line: what ran out, where, needed vs free, and that the
        previous checkpoint is intact. Errors that are not about files are raised unchanged."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.root).free
        problem = _space_problem(e)
        if problem is None and free is not None and free < need:
            problem = "no space left on device"
        if problem is None and need > _file_size_limit():  # torch's writer drops the errno
            problem = "no space left on device for it: a file hit the file size limit (ulimit -f)"
        os_error = next((x for x in _exception_chain(e) if isinstance(x, OSError)), None)
        if problem is None and os_error is None:
            raise e
        previous = self.latest()
        intact = (
            f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        )
        if problem is not None:
            raise UserError(
                f"cannot save checkpoint {final}: {problem} (about {_mb(need)} needed, "
                f"{_mb(free)} free in {self.root}); {intact}; free space there (or lower "
                "checkpoint.keep_last) and resume with --checkpoint.resume auto"
            ) from None
        raise UserError(f"cannot save checkpoint {final}: {os_error}; {intact}") from None

    def poll(self) -> None:
        """Between steps: publish a background save that has finished, or stop the run at the
        step its failure is seen, instead of at the next save.

        All ranks call it; while a save is pending they agree through an all-reduce whether it
        is done everywhere and whether it failed anywhere, so they publish or stop together.
        """
        if self._pending is None:
            return
        future = self._pending[0]
        done = future.done()
        failed = done and future.exception() is not None
        n_done, n_failed = all_reduce_sum([float(done), float(failed)], self.dist.device)
        if n_failed and not failed:
            _, tmp, final, _ = self._pending
            self._pending = None
            raise UserError(f"cannot save checkpoint {final}: it failed on another rank")
        if n_failed or n_done == self.dist.world_size:
            self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        future, tmp, final, need = self._pending
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            self._raise_save_error(e, tmp, final, need)
        barrier()
        self._publish(tmp, final, need)
        barrier()

    def finish(self) -> None:
        """Wait for an asynchronous save to complete and publish it."""
        self._finish_pending()

    def _publish(self, tmp: Path, final: Path, need: int = 0) -> None:
        """Rank 0: add config and tokenizer, rename into place, then point ``latest`` at it."""
        if not self.dist.is_main:
            return
        try:
            save_config(self.config, tmp / "config.toml")
            if self._frozen:
                _write_text_atomic(tmp / BASE_POINTER, self._base_pointer())
            if self.tokenizer_path is not None and self.tokenizer_path.is_file():
                shutil.copyfile(self.tokenizer_path, tmp / "tokenizer.json")
                for name in TOKENIZER_SIDECARS:  # a model's own special tokens and template
                    if (self.tokenizer_path.parent / name).is_file():
                        shutil.copyfile(self.tokenizer_path.parent / name, tmp / name)
            _fsync_dir(tmp)
        except OSError as e:
            self._raise_save_error(e, tmp, final, need)
        self._swap_in(tmp, final)
        _fsync_dir(self.root)
        _write_text_atomic(self.root / LATEST, final.name + "\n")
        self._prune(keep=final.name)

    def _swap_in(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again, as by a
        resumed run stopping where it began) is first moved to ``.old-step-N``, which a start
        puts back if a kill lands between the two renames, so a complete step-N always exists."""
        if not final.exists():
            os.replace(tmp, final)
            return
        old = self.root / (OLD_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` checkpoints (all when <= 0), those in ``keep_steps`` and
        always ``keep``, the one ``latest`` names. Later steps of another timeline were moved
        aside at resume (:meth:`set_aside_later_steps`), so the newest are this timeline's."""
        if self.keep_last <= 0:
            return
        steps = self._step_dirs()
        for step, path in steps[: -self.keep_last]:
            if step not in self.keep_steps and path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def set_aside_later_steps(self, step: int, resumed_from: Path) -> None:
        """A resume from ``step`` starts a new timeline: this run's checkpoints of later steps
        belong to the abandoned one. Move them to ``checkpoints/abandoned-<time>/`` (never
        deleted; pruning and ``latest`` no longer see them) and say so (rank 0; all wait)."""
        later = [p for s, p in self._step_dirs() if s > step]
        if self.dist.is_main and later:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            dest = self.root / f"{ABANDONED_PREFIX}{stamp}"
            n = 1
            while dest.exists():
                n += 1
                dest = self.root / f"{ABANDONED_PREFIX}{stamp}-{n}"
            dest.mkdir()
            for p in later:
                os.replace(p, dest / p.name)
            if resumed_from.parent.resolve() == self.root.resolve():
                _write_text_atomic(self.root / LATEST, resumed_from.name + "\n")
            _fsync_dir(self.root)
            names = ", ".join(p.name for p in later)
            print(
                f"resuming from step {step}: the later checkpoints {names} of the abandoned "
                f"timeline were moved to {dest} (delete it when you no longer need them)",
                flush=True,
            )
        barrier()

    # ------------------------------------------------------------------ loading

    def load(self, path: Path, model, optimizer) -> dict[str, Any]:
        """Restore model and optimizer from ``path``; return the trainer state saved with them.

        The checkpoint's saved model config must equal the run's: tensors of the same shapes
        can still mean another model (head layout, RoPE base).
        """
        path = find_checkpoint(path)
        metadata = read_metadata(path)
        model_sd = trainable_state_dict(model)
        _check_model_shapes(path, metadata, model_sd, "model.")
        _check_model_config(path, self.config)
        legacy = not (path / TRAINER_STATE).is_file()
        if legacy and "trainer" not in metadata.state_dict_metadata:
            raise UserError(
                f"checkpoint {path} has no {TRAINER_STATE}: it cannot be resumed; start from its "
                "weights with --checkpoint.init_from"
            )
        trainer = None if legacy else _read_trainer_json(path)
        state: dict[str, Any] = {
            "model": model_sd,
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        if legacy:
            state["trainer"] = b""
        dcp_load(state, path)
        if legacy:
            trainer = _legacy_trainer_state(path, state["trainer"])
        strict = StateDictOptions(strict=not has_frozen_parameters(model))  # frozen: the base's
        set_model_state_dict(model, state["model"], options=strict)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        if self.dist.is_main:
            print(f"resumed from {path} at step {trainer['step']}", flush=True)
        self.set_aside_later_steps(int(trainer["step"]), path)
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


def _check_model_config(path: Path, config) -> None:
    """Refuse a resume whose model section differs from the one saved with the checkpoint,
    naming every differing key with both values."""
    saved_file = path / "config.toml"
    if not saved_file.is_file():
        return
    try:
        saved = asdict(load_config(saved_file).model)
    except Exception as e:  # a damaged or foreign config.toml
        raise UserError(f"{saved_file} cannot be read ({e}): the checkpoint is damaged") from None
    current = asdict(config.model)
    differ = [
        f"model.{k} = {saved[k]!r} in the checkpoint, {current.get(k)!r} now"
        for k in saved
        if k not in _MODEL_KEYS_FREE_ON_RESUME and saved[k] != current.get(k)
    ]
    if differ:
        raise UserError(
            f"checkpoint {path} was saved with another model config ({'; '.join(differ)}): "
            "resume with the model section it was saved with, or start a new run from its "
            "weights with --checkpoint.init_from"
        )


# ---------------------------------------------------------------------- frozen parameters


def has_frozen_parameters(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def trainable_state_dict(model) -> dict[str, Any]:
    """The model entries a checkpoint holds: all of them, or only the trainable ones when some
    are frozen (LoRA: the adapters; the frozen base stays where ``base.json`` points)."""
    options = StateDictOptions(ignore_frozen_params=has_frozen_parameters(model))
    return get_model_state_dict(model, options=options)


def resolve_base(path: str | os.PathLike) -> Path:
    """The directory a base pointer names: an export as given, a run through its ``latest``."""
    p = Path(path)
    return p if (p / "config.json").is_file() else find_checkpoint(p)


def base_identity(path: str | os.PathLike) -> str:
    """A cheap content identity of a checkpoint or export directory: the sha256 over every
    file's name and size, and the bytes of the small ones (an export's ``checksums.sha256``,
    a checkpoint's ``.metadata``, ``trainer.json`` and ``config.toml``)."""
    root, digest = Path(path), hashlib.sha256()
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}\0{size}\0".encode())
        if size <= _SMALL_FILE:
            digest.update(f.read_bytes())
    return digest.hexdigest()


def checkpoint_base(step_dir: str | os.PathLike) -> Path | None:
    """The base of a checkpoint saved without its frozen parameters (None for a full one),
    checked to be the directory it was trained on."""
    pointer_file = Path(step_dir) / BASE_POINTER
    if not pointer_file.is_file():
        return None
    try:
        pointer = json.loads(pointer_file.read_text())
        base, identity = Path(pointer["path"]), str(pointer["identity"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{pointer_file} cannot be read: the checkpoint is damaged") from None
    if not base.is_dir():
        raise UserError(
            f"checkpoint {step_dir} holds only its trainable parameters; their base {base} is "
            "gone: put the base back at that path"
        )
    if base_identity(base) != identity:
        raise UserError(
            f"checkpoint {step_dir} was trained on the base {base}, which has changed since: "
            "restore that base (its files differ from the ones the adapters were trained on)"
        )
    return base


# ---------------------------------------------------------------------- weights only


def read_checkpoint_config(step_dir: str | os.PathLike) -> ModelConfig:
    """The ``[model]`` section of a checkpoint's resolved config (other sections are not needed)."""
    path = Path(step_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"checkpoint {step_dir} is incomplete: missing config.toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    model = data.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{path} has no [model] section")
    return load_config(None, [(f"model.{k}", v) for k, v in model.items()]).model


def meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict on the meta device: names and shapes without memory."""
    with torch.device("meta"):
        return Transformer(cfg).state_dict()


def _weights_template(
    step_dir: Path, cfg: ModelConfig, metadata: Metadata
) -> dict[str, torch.Tensor]:
    """Empty full tensors, in the stored dtypes, for the model entries ``cfg`` expects; every
    entry that is missing or has another shape than ``config.toml`` says is named."""
    stored = metadata.state_dict_metadata
    expected = meta_state_dict(cfg)
    if cfg.tie_embeddings and "model.lm_head.weight" not in stored:
        expected.pop("lm_head.weight")
    template: dict[str, torch.Tensor] = {}
    problems = []
    for name, meta in expected.items():
        entry = stored.get(f"model.{name}")
        if entry is None or not hasattr(entry, "size"):
            problems.append(f"{name} is missing")
        elif tuple(entry.size) != tuple(meta.shape):
            problems.append(
                f"{name} has shape {tuple(entry.size)}, config wants {tuple(meta.shape)}"
            )
        else:
            template[name] = torch.empty(meta.shape, dtype=entry.properties.dtype)
    if problems:
        raise UserError(
            f"checkpoint {step_dir} does not match its config.toml: {'; '.join(problems)}"
        )
    return template


def read_model_weights(
    step_dir: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and full (unsharded) model weights of a DCP checkpoint, in one process.

    Only the ``model`` entries are read; any world size that wrote the checkpoint gives the same
    tensors, in the dtype they were saved in. A tied checkpoint may hold the shared matrix under
    one name or both; the result always has both names for the same tensor.
    """
    step_dir = Path(step_dir)
    if (step_dir / BASE_POINTER).is_file():
        raise UserError(
            f"checkpoint {step_dir} holds LoRA adapters, not full weights: export it "
            "(pretrain export merges them into its base) and use the export"
        )
    cfg = read_checkpoint_config(step_dir)
    template = _weights_template(step_dir, cfg, read_metadata(step_dir))
    dcp_load({"model": template}, step_dir, no_dist=True)
    if cfg.tie_embeddings:
        template["lm_head.weight"] = template["embed_tokens.weight"]
    return cfg, template


def set_full_weights(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load full (unsharded) ``weights`` read from ``source`` into ``model``, sharded or not,
    in the model's dtypes, after checking every parameter is there with its shape."""
    model_sd = get_model_state_dict(model)
    frozen = has_frozen_parameters(model)
    if frozen:  # LoRA: the weights are the frozen base; the adapters keep their initial values
        trainable = trainable_state_dict(model)
        model_sd = {k: t for k, t in model_sd.items() if k not in trainable}
    check_fits_model(source, {k: tuple(t.shape) for k, t in weights.items()}, model_sd)
    full = {k: weights[k].to(t.dtype) for k, t in model_sd.items()}
    options = StateDictOptions(full_state_dict=True, strict=not frozen)
    set_model_state_dict(model, full, options=options)


def weights_to_load(model) -> dict[str, Any]:
    """The model's state dict (sharded as the model is) that initial weights are loaded into:
    all of it, or only the frozen base when some parameters are frozen (LoRA: the adapters keep
    their initial values)."""
    model_sd = get_model_state_dict(model)
    if has_frozen_parameters(model):
        trainable = trainable_state_dict(model)
        model_sd = {k: t for k, t in model_sd.items() if k not in trainable}
    return model_sd


def load_weights(path: str | Path, model) -> None:
    """Initialise ``model`` (sharded or not) from a checkpoint's weights only (no optimizer or
    data state).

    DCP reads straight into the model's own state dict, so each rank reads only the slices of
    its shards, whatever world size wrote the checkpoint. ``path`` is a step directory, a run's
    ``checkpoints/`` or the run directory; an export is loaded by :func:`pretrain.export.init_from`.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint.init_from: {p} does not exist")
    step_dir = find_checkpoint(p)
    metadata = read_metadata(step_dir)
    model_sd = weights_to_load(model)
    tied = model.lm_head.weight is model.embed_tokens.weight
    if tied and "model.lm_head.weight" not in metadata.state_dict_metadata:
        model_sd.pop("lm_head.weight", None)  # the same parameter as the embedding
    _check_model_shapes(step_dir, metadata, model_sd, "model.")
    dcp_load({"model": model_sd}, step_dir)
    strict = not has_frozen_parameters(model) and not tied
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=strict))
