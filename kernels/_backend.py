"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

The rule (ARCHITECTURE.md): Triton for CUDA tensors, the reference otherwise. A caller can force
either with ``backend="triton"`` / ``backend="torch"`` on each op, for a block of code with
``with backend(name):`` (the previous choice comes back on exit), or for the whole process with
:func:`set_backend` or the ``KERNELS_BACKEND`` environment variable. Forcing Triton on CPU tensors
needs ``TRITON_INTERPRET=1`` set before ``kernels`` is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BACKENDS = ("auto", "triton", "torch")
_forced: str = os.environ.get("KERNELS_BACKEND", "auto") or "auto"


def set_backend(name: str | None) -> None:
    """Force every op of the process onto ``"triton"`` or ``"torch"``; ``None``/``"auto"`` undoes it."""
    global _forced
    name = name or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {_BACKENDS}")
    _forced = name


def get_backend() -> str:
    return _forced


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Run the block with every op forced onto ``name`` (see :func:`set_backend`), then restore
    the choice that was in force before, so that one run does not decide for the next."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor, backend: str | None = None) -> bool:
    """True when the op called on ``x`` should run its Triton kernel."""
    choice = backend or _forced
    if choice not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; choose one of {_BACKENDS}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' was asked for but triton is not installed")
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                "before kernels is imported"
            )
        return True
    return HAS_TRITON and x.is_cuda
