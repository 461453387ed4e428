"""Test setup: Triton runs in its interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator executes, i.e. before
``kernels`` is imported, so it is set here at import time when no CUDA device is present.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if "kernels" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def root() -> Path:
    return ROOT
