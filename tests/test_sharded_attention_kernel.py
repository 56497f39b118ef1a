"""pikv_press.kernels.sharded_attention: merging the partials of any split of the keys equals one softmax attention."""

from __future__ import annotations

import pytest
import torch

from pikv_press.kernels.sharded_attention import merge_partials, partial_attention, sink_partial

TOL = dict(atol=1e-5, rtol=1e-5)


def reference_attention(query, key, value, scaling, mask=None, sinks=None):
    """Eager softmax attention written out independently: repeat kv heads, softmax with an optional sink column."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    logits = query @ key.transpose(-1, -2) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink_col = sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return probs @ value


def random_split(k_len, n_shards, generator):
    """A random partition of range(k_len) into n_shards index sets (some possibly empty), not contiguous."""
    owner = torch.randint(0, n_shards, (k_len,), generator=generator)
    return [torch.nonzero(owner == s).flatten() for s in range(n_shards)]


def causal_window_mask(q_len, k_len, window=None):
    q_pos = torch.arange(k_len - q_len, k_len).view(-1, 1)
    k_pos = torch.arange(k_len).view(1, -1)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed.view(1, 1, q_len, k_len)


def make_inputs(seed, batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=23, dim=16, value_dim=None):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, k_len, value_dim or dim, generator=g)
    return query, key, value, g


def sharded(query, key, value, scaling, mask, shards, sinks=None):
    outs, lses = [], []
    for idx in shards:
        shard_mask = None if mask is None else mask[..., idx]
        out, lse = partial_attention(query, key[:, :, idx], value[:, :, idx], scaling, shard_mask)
        outs.append(out)
        lses.append(lse)
    if sinks is not None:
        out, lse = sink_partial(sinks, outs[0])
        outs.append(out)
        lses.append(lse)
    return merge_partials(outs, lses)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_shards", [1, 2, 5])
@pytest.mark.parametrize("kind", ["plain", "causal", "sliding", "sinks", "sliding+sinks", "wide_keys"])
def test_merge_of_any_split_equals_softmax_attention(seed, n_shards, kind):
    value_dim = 12 if kind == "wide_keys" else None
    query, key, value, g = make_inputs(seed, value_dim=value_dim)
    scaling = query.shape[-1] ** -0.5
    mask = None
    if kind in ("causal", "wide_keys"):
        mask = causal_window_mask(query.shape[2], key.shape[2])
    if kind.startswith("sliding"):
        mask = causal_window_mask(query.shape[2], key.shape[2], window=6)
    sinks = torch.randn(query.shape[1], generator=g) * 2 if "sinks" in kind else None
    expected = reference_attention(query, key, value, scaling, mask, sinks)
    out, lse = sharded(query, key, value, scaling, mask, random_split(key.shape[2], n_shards, g), sinks)
    torch.testing.assert_close(out, expected, **TOL)
    assert lse.dtype == torch.float32 and lse.shape == query.shape[:3]


def test_lse_is_log_of_softmax_denominator():
    query, key, value, _ = make_inputs(0, batch=1, q_heads=2, kv_heads=1)
    out, lse = partial_attention(query, key, value, 0.3)
    logits = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), **TOL)


def test_additive_mask_equals_boolean_mask():
    query, key, value, _ = make_inputs(1)
    mask = causal_window_mask(query.shape[2], key.shape[2], window=4)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    a = partial_attention(query, key, value, 0.25, mask)
    b = partial_attention(query, key, value, 0.25, additive)
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)


def test_empty_shard_and_fully_masked_rows_are_ignored():
    query, key, value, _ = make_inputs(2)
    full_out, full_lse = partial_attention(query, key, value, 0.25)
    empty_out, empty_lse = partial_attention(query, key[:, :, :0], value[:, :, :0], 0.25)
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
    masked_out, masked_lse = partial_attention(query, key, value, 0.25, torch.zeros(1, 1, 1, key.shape[2], dtype=bool))
    assert torch.isneginf(masked_lse).all() and (masked_out == 0).all() and not masked_out.isnan().any()
    out, lse = merge_partials([empty_out, full_out, masked_out], [empty_lse, full_lse, masked_lse])
    torch.testing.assert_close(out, full_out, **TOL)
    torch.testing.assert_close(lse, full_lse, **TOL)
    none_out, none_lse = merge_partials([empty_out], [empty_lse])
    assert (none_out == 0).all() and torch.isneginf(none_lse).all()


def test_low_precision_inputs_are_computed_in_float32():
    query, key, value, g = make_inputs(3)
    expected = reference_attention(query, key, value, 0.25)
    out, lse = sharded(query.bfloat16(), key.bfloat16(), value.bfloat16(), 0.25, None,
                       random_split(key.shape[2], 3, g))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_bad_shapes_raise_clear_errors():
    query, key, value, _ = make_inputs(4, q_heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        partial_attention(query, key, value, 1.0)
    query, key, value, _ = make_inputs(4)
    with pytest.raises(ValueError, match="4-D"):
        partial_attention(query[0], key, value, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        partial_attention(query[..., :8], key, value, 1.0)
    with pytest.raises(ValueError, match="as many lses"):
        merge_partials([query], [])
    with pytest.raises(ValueError, match="sinks must be"):
        sink_partial(torch.zeros(3), query)
