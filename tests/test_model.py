"""The transformer: shapes, GQA, tied embeddings, per-document masking, loss against a reference."""

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.model import Transformer


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
