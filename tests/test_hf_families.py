"""Hugging Face families: Llama, Mistral, Qwen2 and Qwen3 checkpoints in, the same families out.

The reference is transformers itself: a tiny model of each family with random weights, saved
with ``save_pretrained``, must give our model the same logits (fp32, 1e-4) and the same greedy
tokens; what we export must load in transformers as the same architecture with our logits.
The architecture options (QK-norm, q/k/v biases, an explicit head width, scaled RoPE) are
checked against the transformers module that has them.
"""

from __future__ import annotations

import os

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig
from pretrain.model import Transformer, fuse_projections

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

VOCAB = 384
TOL = 1e-4


def random_tokens(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def ours_from_transformers(hf_model, cfg: ModelConfig) -> Transformer:
    """Our model holding a transformers model's weights, renamed by hand (no adapter code)."""
    model = Transformer(cfg)
    weights = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def max_logit_diff(ours: Transformer, hf_model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        want = hf_model(tokens).logits.float()
        got = ours(tokens)
    return (got - want).abs().max().item()


@pytest.fixture(scope="module")
def qwen3_module():
    """A transformers Qwen3 (QK-norm, head_dim != hidden / heads) and the config matching it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf_cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    hf_model = Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so a missing norm cannot pass
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
        max_seq_len=128, norm_eps=1e-6, qk_norm=True, head_dim_override=24,
    )  # fmt: skip
    return hf_model, cfg


def test_qk_norm_and_head_dim_match_qwen3_attention(qwen3_module):
    hf_model, cfg = qwen3_module
    ours = ours_from_transformers(hf_model, cfg)
    assert ours.layers[0].self_attn.q_norm.weight.shape == (24,)
    assert max_logit_diff(ours, hf_model, random_tokens()) <= TOL
    without = ModelConfig(**{**cfg.__dict__, "qk_norm": False})
    stripped = Transformer(without)
    stripped.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if "_norm.weight" not in k or "layernorm" in k}
    )
    assert max_logit_diff(stripped.eval(), hf_model, random_tokens()) > 1e-2  # the op matters
    fuse_projections(ours)
    assert max_logit_diff(ours, hf_model, random_tokens()) <= TOL


def test_architecture_options_are_validated_in_one_line():
    for overrides, named in [
        ({"head_dim_override": -1}, "model.head_dim_override"),
        ({"head_dim_override": 7}, "head dim 7"),
        ({"rope_factor": 2.0}, "model.rope_factor"),
        ({"rope_scaling": "llama3", "rope_factor": 8.0}, "model.rope_original_max_seq_len"),
        ({"rope_scaling": "linear", "rope_factor": 0.5}, "model.rope_factor"),
        (
            {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_seq_len": 64,
             "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 1.0},
            "rope_low_freq_factor",
        ),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            ModelConfig(**overrides).validate()
    ModelConfig(d_model=60, n_heads=8, head_dim_override=16).validate()  # need not divide
