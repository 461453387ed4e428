"""pretrain: LLM pretraining with Triton kernels, an FSDP2 trainer, checkpoints, export and serving."""

from pretrain.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
