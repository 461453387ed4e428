"""The transformer: shapes, GQA, tied embeddings, per-document masking, loss against a reference;
the cache protocol and the inference options (fused projections, a replacement head)."""

import copy

import torch
import torch.nn.functional as F

import kernels
from pretrain.config import ModelConfig
from pretrain.model import RowwiseHead, Transformer, fuse_projections, product_weights


def _cfg(**kw):
    base = dict(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_logits_shape_and_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(_cfg())
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100
    logits = model(idx)
    assert logits.shape == (3, 16, 97)
    ref = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(idx, targets), ref, rtol=1e-5, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(_cfg())
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


def test_doc_mask_makes_each_document_independent():
    torch.manual_seed(0)
    model = Transformer(_cfg())
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage_and_param_count():
    tied = Transformer(_cfg(tie_embeddings=True))
    untied = Transformer(_cfg())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


def test_flops_per_token_counts_attention():
    model = Transformer(_cfg())
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 64 * 32


class _RecordingCache:
    """Keeps nothing, but owns the attention call and counts it per layer."""

    def __init__(self):
        self.attended = []

    def update(self, layer_idx, k, v):
        return k, v

    def attend(self, layer_idx, q, k, v):
        self.attended.append(layer_idx)
        return kernels.attention(q, k, v, causal=True)


def test_a_cache_with_attend_computes_every_layers_attention():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    idx = torch.randint(0, 97, (2, 9))
    cache = _RecordingCache()
    with torch.no_grad():
        assert torch.equal(model(idx, cache=cache), model(idx))
    assert cache.attended == [0, 1]


def test_fused_projections_keep_the_numbers_names_and_storage():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    fused = fuse_projections(copy.deepcopy(model))
    assert fuse_projections(fused) is fused  # a second call changes nothing
    before, after = model.state_dict(), fused.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    attn = fused.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_proj.weight.data_ptr()  # views, not copies
    assert sum(p.numel() for p in fused.parameters()) == model.num_params()
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(fused(idx), model(idx), rtol=1e-5, atol=1e-5)
    shapes = [tuple(w.shape) for w in product_weights(fused)[:5]]
    assert shapes == [(97, 64), (64 + 2 * 32, 64), (2 * 192, 64), (64, 64), (64, 192)]


def test_the_head_option_replaces_lm_head():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    idx = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        rowwise = model(idx, head=RowwiseHead(model.lm_head.weight))
        torch.testing.assert_close(rowwise, model(idx), rtol=1e-5, atol=1e-5)
        first = model(idx, head=lambda h: model.lm_head(h[:1]))
    assert first.shape == (1, 5, 97) and first.dtype == torch.float32
