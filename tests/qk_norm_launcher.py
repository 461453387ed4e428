"""The ``pretrain`` command line with one extra op in the model: QK-norm.

Queries and keys are RMS-normalised over each head's dimension just before RoPE, as one added
line in ``Attention.forward`` would do: model.py gets a ``kernels`` whose ``apply_rope`` first
normalises its q and k, and every other op is the real one. Nothing outside model.py is patched,
so whatever computes attention without ``Attention.forward`` misses the op.

    python tests/qk_norm_launcher.py generate EXPORT --prompt ...
"""

from __future__ import annotations

import sys

import torch

import kernels
import pretrain.model


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class QKNormKernels:
    """``kernels`` as model.py sees it, with QK-norm in front of RoPE."""

    def __getattr__(self, name: str):
        return getattr(kernels, name)

    @staticmethod
    def apply_rope(q, k, cos, sin):
        return kernels.apply_rope(_rms(q), _rms(k), cos, sin)


if __name__ == "__main__":
    from pretrain.cli import main

    pretrain.model.kernels = QKNormKernels()
    sys.exit(main(sys.argv[1:]))
