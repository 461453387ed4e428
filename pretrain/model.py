"""A decoder-only transformer of the Llama family, in plain PyTorch.

Token embedding -> n_layers x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> linear head. Every fused op is called through
``kernels``, which runs Triton on CUDA and the PyTorch reference elsewhere, so this file never
asks which device it is on. Parallelism (FSDP2, activation checkpointing, compile) is applied from
outside by ``pretrain.parallel``; the model itself is single-device PyTorch.

Parameter names are those of Hugging Face's ``LlamaForCausalLM`` (without its ``model.`` prefix),
and RoPE uses the same half-split layout, so an export is a renaming, not a conversion.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import kernels
from pretrain.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            # The cache stores this step's keys/values and returns everything the queries may see.
            k, v = cache.update(self.layer_idx, k, v)
        y = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc_ids=None, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); the loss instead when given targets.

        ``doc_ids`` (B, T) keeps attention inside each packed document (positions then restart at
        each document, as if it were alone). ``positions`` (T,) or (B, T) overrides the default
        0..T-1, for decoding against a ``cache``. Targets equal to -100 carry no loss.
        """
        B, T = idx.shape
        if positions is None:
            positions = (
                _positions_within_documents(doc_ids)
                if doc_ids is not None
                else torch.arange(T, device=idx.device)
            )
        cos, sin = kernels.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        if cos.dim() == 3:  # per-sequence positions (B, T, D/2) broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids, cache)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x).float()
        return kernels.linear_cross_entropy(
            x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T), reduction=reduction
        )

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (non-embedding parameters) plus attention's 12 L d T.

        The second term counts the attention score and value products over a full T x T
        matrix, as PaLM's MFU does; the head counts once even when tied.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len

    @classmethod
    def from_pretrained(
        cls, path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Transformer:
        """A model from an export directory (``pretrain export``), after checking its checksums.

        ``dtype`` None keeps the export's dtype. Only safetensors and JSON are read, no pickle.
        """
        from pretrain.export import load_export

        cfg, state_dict, _ = load_export(path, verify=True)
        with torch.device("meta"):
            model = cls(cfg)
        state_dict = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()


def _positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... restarting wherever the document id changes along each row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_pos
