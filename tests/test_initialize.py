"""The initial weights: the init rule of pretrain.model and its options."""

import torch

from pretrain.config import ModelConfig
from pretrain.model import Transformer


def _cfg(**kw):
    base = dict(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_zero_init_residual_zeros_exactly_the_residual_output_projections():
    torch.manual_seed(0)
    model = Transformer(_cfg(zero_init_residual=True))
    zeroed = {n for n, p in model.named_parameters() if not p.any()}
    expected = {
        f"layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
    }
    assert zeroed == expected
    torch.manual_seed(0)
    default = Transformer(_cfg())
    assert not any(not p.any() for p in default.parameters())
