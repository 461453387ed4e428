"""A decoder-only transformer of the Llama family, in plain PyTorch.

Token embedding -> n_layers x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> linear head. Every fused op is called through
``kernels``, which runs Triton on CUDA and the PyTorch reference elsewhere, so this file never
asks which device it is on. Parallelism (FSDP2, activation checkpointing, compile) is applied from
outside by ``pretrain.parallel``; the model itself is single-device PyTorch.

Parameter names are those of Hugging Face's ``LlamaForCausalLM`` (without its ``model.`` prefix),
and RoPE uses the same half-split layout, so an export is a renaming, not a conversion.

This forward is the only one: training, ``pretrain generate`` and the server all run it, so a
change to a layer changes all three. Incremental decoding goes through the ``cache`` argument:
``cache.update(layer_idx, k, v) -> (k, v)`` stores this step's keys and values and returns what
the queries may attend to, and a cache that also has ``cache.attend(layer_idx, q, k, v) -> y``
computes the attention itself (the server's attends each row to its own slot and length);
otherwise it is ``kernels.attention``. For inference, :func:`fuse_projections` turns q/k/v and
gate/up into one product each and :class:`RowwiseHead` is a batch-invariant ``head``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from pretrain.config import ModelConfig

# --------------------------------------------------------------------------- initial weights

INIT_BLOCK_ELEMENTS = 1 << 16  # noise is drawn in blocks of whole rows of about this many values


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts: normal(0, ``std``) noise, uniform(-``bound``, ``bound``) noise,
    or all ``fill`` when both are 0."""

    std: float = 0.0
    fill: float = 0.0
    bound: float = 0.0

    @property
    def is_constant(self) -> bool:
        return self.std == 0.0 and self.bound == 0.0


def draw_init_seed() -> int:
    """A seed for the initial weights from torch's global generator."""
    return int(torch.randint(0, 2**62, ()).item())


def init_block_rows(shape: tuple[int, ...] | torch.Size) -> int:
    """Rows of a parameter of ``shape`` per noise block (depends on the global shape alone)."""
    row = math.prod(shape[1:])
    return max(1, INIT_BLOCK_ELEMENTS // max(row, 1))


def init_block(
    init: ParamInit, seed: int, name: str, shape: tuple[int, ...] | torch.Size, block: int
) -> torch.Tensor:
    """Rows ``block * r .. (block + 1) * r`` (r = :func:`init_block_rows`) of parameter ``name``
    as a float32 CPU tensor (rows, row size).

    Each block has its own generator, seeded from (seed, name, block index), so a block's values
    depend neither on the other parameters nor on which rows a process holds: any sharding of the
    parameter can be filled by generating only the blocks its rows fall in.
    """
    rows = init_block_rows(shape)
    start = block * rows
    stop = min(start + rows, shape[0])
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    out = torch.empty(stop - start, math.prod(shape[1:]))
    if init.bound > 0.0:
        return out.uniform_(-init.bound, init.bound, generator=gen)
    return out.normal_(0.0, init.std, generator=gen)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class FusedLinear(nn.Module):
    """Several linear layers of one input as one matrix product (see fuse_projections).

    The layers' weights (and biases, when they all have one) become views of the fused weight
    (and bias), so nothing is stored twice and the state dict keeps its names. The fused tensors
    are buffers outside the state dict.
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        has_bias = {m.bias is not None for m in linears}
        if len(has_bias) != 1:
            raise ValueError("FusedLinear needs all layers with a bias or all without")
        fused = torch.cat([m.weight.detach() for m in linears])
        self.register_buffer("weight", fused, persistent=False)
        bias = torch.cat([m.bias.detach() for m in linears]) if has_bias == {True} else None
        self.register_buffer("bias", bias, persistent=False)
        self.sizes = [m.out_features for m in linears]
        for m, view in zip(linears, self.weight.split(self.sizes)):
            m.weight = nn.Parameter(view, requires_grad=False)
        if bias is not None:
            for m, view in zip(linears, self.bias.split(self.sizes)):
                m.bias = nn.Parameter(view, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias  # on q, k and v only, as Qwen2 has them
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qkv_proj: FusedLinear | None = None  # set by fuse_projections
        # QK-norm (Qwen3): one RMSNorm over the head dimension, shared by all heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x)
        # -1 heads: under tensor parallel each rank holds only its own heads' columns.
        q = q.view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if self.q_norm is not None:  # before RoPE, as Qwen3 does
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            # The cache stores this step's keys/values and returns everything the queries may see.
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), or what attend reads
        if hasattr(cache, "attend"):  # the cache owns attention over its slots
            y = cache.attend(self.layer_idx, q, k, v)  # (B, H, T, D)
        else:
            y = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.gate_up_proj: FusedLinear | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x)
        return self.down_proj(kernels.swiglu(gate, up))


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
    """The model. Built on ``torch.device("meta")`` it holds no memory and no values (a sharded
    run materializes and initializes it after sharding); otherwise it comes out initialized by
    :meth:`reset_parameters` from ``init_seed``."""

    def __init__(self, cfg: ModelConfig, *, init_seed: int | None = None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not self.embed_tokens.weight.is_meta:  # on meta, pretrain.initialize fills the shards
            self.reset_parameters(init_seed)

    def param_init(self, name: str, param: torch.Tensor) -> ParamInit:
        """The init rule: how parameter ``name`` starts. Biases zero, gains (1-D) one, matrices
        normal(0, init_std), the residual output projections scaled by 1/sqrt(2 n_layers), or
        zero with ``zero_init_residual`` (each block then starts as the identity)."""
        cfg = self.config
        if name.endswith(".bias"):
            return ParamInit(fill=0.0)
        if param.dim() == 1:
            return ParamInit(fill=1.0)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            if cfg.zero_init_residual:
                return ParamInit(fill=0.0)
            return ParamInit(std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        return ParamInit(std=cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Every parameter by :meth:`param_init`, its noise drawn block by block from ``seed``
        (None: a seed drawn from torch's global generator, so ``torch.manual_seed`` decides).

        The values are those :mod:`pretrain.initialize` gives each shard of a sharded model
        with the same seed, on any number of ranks (see :func:`init_block`).
        """
        if seed is None:
            seed = draw_init_seed()
        for name, p in self.named_parameters():
            init = self.param_init(name, p)
            if init.is_constant:
                p.fill_(init.fill)
                continue
            rows = init_block_rows(p.shape)
            flat = p.view(p.shape[0], -1)
            for block in range(math.ceil(p.shape[0] / rows)):
                flat[block * rows : (block + 1) * rows] = init_block(
                    init, seed, name, p.shape, block
                )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); the loss instead when given targets.

        ``doc_ids`` (B, T) keeps attention inside each packed document (positions then restart at
        each document, as if it were alone). ``positions`` (T,) or (B, T) overrides the default
        0..T-1, for decoding against a ``cache`` (see the module docstring). ``head`` maps the
        final hidden states (B, T, d_model) to logits instead of ``lm_head``: a server passes a
        :class:`RowwiseHead`, or one that skips padding rows. Targets equal to -100 carry no loss.
        """
        B, T = idx.shape
        if positions is None:
            positions = (
                _positions_within_documents(doc_ids)
                if doc_ids is not None
                else torch.arange(T, device=idx.device)
            )
        cos, sin = rope_tables(self.config, positions)
        if cos.dim() == 3:  # per-sequence positions (B, T, D/2) broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids, cache)
        x = self.norm(x)
        if targets is None:
            return (self.lm_head if head is None else head)(x).float()
        return kernels.linear_cross_entropy(
            x.reshape(B * T, -1), head_weight(self.lm_head), targets.reshape(B * T),
            reduction=reduction,
        )  # fmt: skip

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


class RowwiseHead:
    """The output projection computed for each row on its own, in one batched call.

    The vocabulary projection is the largest matrix of a decode step, and on CPU a padded
    four-row product costs several times a one-row one. ``torch.bmm`` over rows, each a (1, d) x
    (d, vocab) product with the weight transposed once, gives every row the numbers it gets
    alone, so the head needs no padding: one request pays for one row.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight_t = weight.detach().t().contiguous()  # (d, vocab)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        d, vocab = self.weight_t.shape
        rows = h.reshape(-1, 1, d)  # (N, 1, d), one row of (..., d) each
        out = torch.bmm(rows, self.weight_t.expand(rows.shape[0], d, vocab))  # (N, 1, vocab)
        return out.view(*h.shape[:-1], vocab)

    @classmethod
    def if_exact(cls, weight: torch.Tensor, max_batch: int) -> RowwiseHead | None:
        """The head when, on this device, each row's logits are bitwise those it gets alone
        (checked, as BLAS libraries differ); None to fall back to the padded batch."""
        if weight.device.type != "cpu":
            return None  # on GPUs the padded batch is cheap and the copy of the weight is not
        head = cls(weight)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(max_batch, weight.shape[1], generator=gen).to(weight.dtype)
        with torch.no_grad():
            full = head(x)
            for size in sorted({1, 2, 3, max_batch // 2, max_batch - 1} - {0}):
                part = head(x[:size])
                alone = torch.cat([head(x[i : i + 1]) for i in range(size)])
                if not (torch.equal(part, full[:size]) and torch.equal(alone, part)):
                    return None
        return head


def fuse_projections(model: Transformer) -> Transformer:
    """Prepare ``model`` for inference, in place: q/k/v and gate/up become one product each.

    Decoding a token is a handful of thin matrix products per block; fewer, wider ones (4 per
    block instead of 7) are faster. The separate weights become views of the fused ones
    (:class:`FusedLinear`), so memory and state dict are unchanged, but they no longer train:
    call this only on a model kept for inference, after moving or casting it (``.to()`` would
    copy the views apart). Calling it again changes nothing.
    """
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = FusedLinear(attn.q_proj, attn.k_proj, attn.v_proj)
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = FusedLinear(mlp.gate_proj, mlp.up_proj)
    return model.eval()


def head_weight(head: nn.Module) -> torch.Tensor:
    """The head's weight matrix for the fused loss: its ``weight``, or the ``effective_weight()``
    of a head wrapped from outside the model (a LoRA head adds its adapters' product)."""
    effective = getattr(head, "effective_weight", None)
    return head.weight if effective is None else effective()


def product_weights(model: Transformer, *, head: bool = True) -> list[torch.Tensor]:
    """The weight of every matrix product a forward runs (fused ones as one), the head's first.

    Which BLAS kernel computes a product, and so a row's exact result, depends on the weight's
    shape and the number of rows: these are the shapes a batch-invariance check must try.
    """
    weights = [model.lm_head.weight] if head else []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        weights += _input_weights(attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj)
        weights += _input_weights(mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj)
        weights += [attn.o_proj.weight, mlp.down_proj.weight]
    return weights


def _input_weights(fused: FusedLinear | None, *linears: nn.Linear) -> list[torch.Tensor]:
    return [m.weight for m in linears] if fused is None else [fused.weight]


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin at ``positions``, with the config's theta and frequency scaling."""
    return kernels.rope_cos_sin(
        positions,
        cfg.head_dim,
        cfg.rope_theta,
        scaling=cfg.rope_scaling,
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_len=cfg.rope_original_max_seq_len,
        beta_fast=cfg.rope_beta_fast,
        beta_slow=cfg.rope_beta_slow,
        truncate=cfg.rope_truncate,
        attention_factor=yarn_attention_factor(cfg),
    )


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's scale of cos and sin: ``rope_attention_factor``, or 0.1 ln(factor) + 1 by default
    (1 without yarn scaling)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor > 0:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0


def _positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... restarting wherever the document id changes along each row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_pos
