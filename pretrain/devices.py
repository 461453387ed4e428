"""Which torch device a command runs on, resolved the same way for training, generation and serving."""

from __future__ import annotations

import torch

from pretrain.errors import UserError


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; asking for a missing GPU fails.

    ``option`` names the setting in the error (``--device``, ``train.device``), so the message
    says what to change.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown {option} {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"{option} is {name!r} but no CUDA device is available to PyTorch; use cpu (or "
            "auto), or install a CUDA build of torch"
        )
    return device
