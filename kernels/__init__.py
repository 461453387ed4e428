"""Fused ops in Triton, each with a PyTorch reference; CUDA tensors get the kernel.

``kernels`` imports torch and triton only. Every public op takes ``backend=None`` (automatic),
``"triton"`` or ``"torch"``; see :mod:`kernels._backend`.
"""

from kernels._backend import backend, get_backend, set_backend, use_triton
from kernels.adamw import AdamW, clip_grad_scale
from kernels.attention import attention, attention_reference
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.muon import Muon
from kernels.newton_schulz import newton_schulz, newton_schulz_reference
from kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "AdamW",
    "Muon",
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "apply_rope_reference",
    "attention",
    "attention_reference",
    "backend",
    "clip_grad_scale",
    "get_backend",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "newton_schulz",
    "newton_schulz_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "set_backend",
    "swiglu",
    "swiglu_reference",
    "use_triton",
]
