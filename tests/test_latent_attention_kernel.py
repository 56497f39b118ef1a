"""The torch reference of attention over the MLA latent cache equals attention over decompressed keys and values."""

import pytest
import torch
from torch.nn import functional as F

from pikv_press.kernels.latent_attention import latent_attention


def _decompressed(q_nope, q_rope, latent, rope_key, w_uk, w_uv, scaling, mask):
    """Per-head keys ``[W_uk c, k_rope]`` and values ``W_uv c``, then plain softmax attention (the stock path)."""
    heads = q_nope.shape[1]
    keys = torch.cat([torch.einsum("hdr,bkr->bhkd", w_uk, latent),
                      rope_key.unsqueeze(1).expand(-1, heads, -1, -1)], dim=-1)
    values = torch.einsum("hdr,bkr->bhkd", w_uv, latent)
    query = torch.cat([q_nope, q_rope], dim=-1)
    logits = query @ keys.transpose(-1, -2) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights @ values, torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("num_queries", [1, 5])
@pytest.mark.parametrize("with_mask", [False, True])
def test_absorbed_attention_equals_decompressed(num_queries, with_mask):
    gen = torch.Generator().manual_seed(0)
    b, h, k, r, dr, dn, dv = 2, 3, 9, 16, 8, 12, 10
    q_nope = torch.randn(b, h, num_queries, dn, generator=gen)
    q_rope = torch.randn(b, h, num_queries, dr, generator=gen)
    latent, rope_key = torch.randn(b, k, r, generator=gen), torch.randn(b, k, dr, generator=gen)
    w_uk, w_uv = torch.randn(h, dn, r, generator=gen), torch.randn(h, dv, r, generator=gen)
    mask = torch.rand(b, 1, num_queries, k, generator=gen) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    q_latent = torch.einsum("bhqd,hdr->bhqr", q_nope, w_uk)
    out_latent, lse = latent_attention(q_latent, q_rope, latent, rope_key, 0.3, mask=mask)
    out = torch.einsum("bhqr,hdr->bhqd", out_latent, w_uv)
    expected, expected_lse = _decompressed(q_nope, q_rope, latent, rope_key, w_uk, w_uv, 0.3, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32 and out_latent.shape == (b, h, num_queries, r)


def test_causal_additive_mask_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    b, h, q, k, r, dr = 1, 2, 4, 6, 8, 4
    q_latent, q_rope = torch.randn(b, h, q, r, generator=gen), torch.randn(b, h, q, dr, generator=gen)
    latent, rope_key = torch.randn(b, 1, k, r, generator=gen), torch.randn(b, 1, k, dr, generator=gen)
    causal = torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)  # the last q tokens are the queries
    out, lse = latent_attention(q_latent, q_rope, latent, rope_key, 0.5, is_causal=True)
    additive = torch.zeros(q, k).masked_fill(~causal, float("-inf"))
    out_add, lse_add = latent_attention(q_latent, q_rope, latent, rope_key, 0.5, mask=additive)
    query = torch.cat([q_latent, q_rope], dim=-1)
    keys = torch.cat([latent, rope_key], dim=-1)  # (b, 1, k, r + dr): one shared key head
    expected = F.scaled_dot_product_attention(query, keys.expand(-1, h, -1, -1),
                                              latent.expand(-1, h, -1, -1), attn_mask=causal, scale=0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_add, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_add)
    nothing = torch.zeros(b, 1, q, k, dtype=torch.bool)
    out_none, lse_none = latent_attention(q_latent, q_rope, latent, rope_key, 0.5, mask=nothing)
    assert torch.equal(out_none, torch.zeros_like(out_none)) and torch.isinf(lse_none).all() and (lse_none < 0).all()


def test_bad_shapes_raise():
    q = torch.zeros(1, 2, 1, 8)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        latent_attention(q, torch.zeros(1, 2, 1, 4), torch.zeros(1, 3, 6), torch.zeros(1, 3, 4), 1.0)
    with pytest.raises(ValueError, match="agree on"):
        latent_attention(q, torch.zeros(1, 2, 1, 4), torch.zeros(1, 3, 8), torch.zeros(1, 5, 4), 1.0)
