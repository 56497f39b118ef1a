"""LowRankKeyCache: full rank is the full cache, lower ranks store exactly the counted bytes, the basis is the keys'
top singular directions (rank from energy or budget), decoding projects on the same basis, presses compose, and
kvpress's ThinK saves nothing by comparison."""

from __future__ import annotations

import pytest
import torch
from kvpress import KnormPress, ThinKPress
from transformers import DynamicCache

from pikv_press import MoEAware, cache_lengths, cache_nbytes, layer_access
from pikv_press.cache.lowrank import LowRankKeyCache, LowRankKeyLayer
from pikv_press.testing import MOE_FAMILY_NAMES
from tests.conftest import get_model
from tests.decoding_helpers import decode_logits as _decode
from tests.decoding_helpers import token_ids as _ids

FP32_LOGIT_TOLERANCE = 1e-4  # full rank: keys rotated onto an orthonormal basis and back, fp32 rounding only




def _key_width(model) -> int:
    cache = DynamicCache()
    _decode(model, cache, _ids(2), steps=0)
    return cache.layers[0].keys.shape[-1]


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_full_rank_reproduces_the_full_cache(family):
    model = get_model(family)
    ids = _ids(24)
    full = _decode(model, DynamicCache(), ids, steps=6)
    cache = LowRankKeyCache(rank=_key_width(model), config=model.config)
    low = _decode(model, cache, ids, steps=6)
    assert (low - full).abs().max() < FP32_LOGIT_TOLERANCE
    assert (low[1:] - full[1:]).abs().max() > 0  # decoding really reads the projected keys


def _projector(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """``V_r V_r^T`` from the SVD of each head's keys (sign-free), ``(batch, heads, D, D)``."""
    _, _, vh = torch.linalg.svd(keys.double(), full_matrices=False)
    basis = vh[..., :rank, :].transpose(-1, -2)
    return basis @ basis.transpose(-1, -2)


@pytest.mark.parametrize("rank", [2, 8])
def test_lower_rank_stores_the_counted_bytes_and_projects_on_the_top_directions(rank):
    model = get_model("qwen3_moe")  # 2 KV heads, head_dim 16, float32
    layers, heads, dim = model.config.num_hidden_layers, 2, 16
    ids = _ids(40)
    full, cache = DynamicCache(), LowRankKeyCache(rank=rank, config=model.config)
    _decode(model, full, ids, steps=0)
    _decode(model, cache, ids, steps=0)
    per_head = lambda t: (t * rank + dim * rank + t * dim) * 4  # noqa: E731  coefficients, basis, values
    assert cache.ranks == [rank] * layers
    assert cache_nbytes(cache) == layers * heads * per_head(40)
    assert cache_nbytes(full) == layers * heads * 40 * 2 * dim * 4
    keys, values = layer_access(cache.layers[1]).read()
    reference = full.layers[1].keys
    expected = (reference.double() @ _projector(reference, rank)).float()
    assert torch.allclose(keys, expected, atol=1e-5)
    assert torch.equal(values, full.layers[1].values)
    # decoding: 3 tokens more, projected on the same basis (not refitted); layer 0's new keys do not depend on
    # earlier attention, so they are the full cache's
    basis = cache.layers[0]._basis.clone()
    _decode(model, full, _ids(3, seed=1), steps=0)
    _decode(model, cache, _ids(3, seed=1), steps=0)
    assert torch.equal(cache.layers[0]._basis, basis)
    assert cache_nbytes(cache) == layers * heads * per_head(43)
    new_keys = full.layers[0].keys[..., 40:, :]
    assert torch.allclose(cache.layers[0]._coefficients[..., 40:, :], new_keys @ basis, atol=1e-6)


def test_rank_from_energy_and_from_a_byte_budget():
    model = get_model("olmoe")
    ids = _ids(40)
    full = DynamicCache()
    _decode(model, full, ids, steps=0)
    for energy in (0.5, 0.9, 0.99):
        cache = LowRankKeyCache(energy=energy, config=model.config)
        _decode(model, cache, ids, steps=0)
        for layer, reference in zip(cache.layers, full.layers, strict=True):
            singular = torch.linalg.svdvals(reference.keys.double())  # (batch, heads, D)
            share = (singular ** 2).cumsum(-1) / (singular ** 2).sum(-1, keepdim=True)
            needed = int(((share < energy).sum(-1) + 1).max())
            assert layer.rank == needed
    width = _key_width(model)
    budget = LowRankKeyCache(key_budget=0.3, config=model.config)
    _decode(model, budget, ids, steps=0)
    assert budget.ranks == [int(0.3 * width)] * model.config.num_hidden_layers


def test_eviction_press_on_low_rank_keys():
    model = get_model("qwen3_moe")
    ids = _ids(40)
    cache = LowRankKeyCache(rank=4, config=model.config)
    with torch.no_grad(), MoEAware(KnormPress(0.5))(model):
        model.model(input_ids=ids, past_key_values=cache)
    layers = model.config.num_hidden_layers
    assert cache_lengths(cache) == [20] * layers
    assert cache_nbytes(cache) == layers * 2 * (20 * 4 + 16 * 4 + 20 * 16) * 4
    _decode(model, cache, _ids(2, seed=3), steps=2)  # decodes from the pruned cache
    assert cache_lengths(cache) == [24] * layers


def test_think_saves_no_bytes_low_rank_does():
    """kvpress's ThinK zeroes half the key channels in place: the cache holds exactly the bytes of the full cache.
    The low-rank cache at half the key width holds the counted bytes, fewer."""
    model = get_model("qwen3_moe")
    ids = _ids(40)
    full, think = DynamicCache(), DynamicCache()
    _decode(model, full, ids, steps=0)
    with torch.no_grad(), MoEAware(ThinKPress(key_channel_compression_ratio=0.5, window_size=8))(model):
        model.model(input_ids=ids, past_key_values=think)
    assert (think.layers[1].keys == 0).sum() == 40 * 2 * 8  # half the channels of every token zeroed
    assert cache_nbytes(think) == cache_nbytes(full)
    low = LowRankKeyCache(key_budget=0.5, config=model.config)
    _decode(model, low, ids, steps=0)
    layers = model.config.num_hidden_layers
    assert cache_nbytes(low) == layers * 2 * (40 * 8 + 16 * 8 + 40 * 16) * 4 < cache_nbytes(full)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="exactly one of rank, energy or key_budget"):
        LowRankKeyCache()
    with pytest.raises(ValueError, match="exactly one of rank, energy or key_budget"):
        LowRankKeyCache(rank=4, energy=0.9)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LowRankKeyCache(rank=0)
    with pytest.raises(ValueError, match=r"energy must be a fraction in \(0, 1\]"):
        LowRankKeyCache(energy=1.5)
    with pytest.raises(ValueError, match=r"key_budget must be a fraction"):
        LowRankKeyCache(key_budget=0)
    model = get_model("qwen3_moe")
    with pytest.raises(ValueError, match="rank=17 exceeds the key head dimension 16"):
        _decode(model, LowRankKeyCache(rank=17, config=model.config), _ids(4), steps=0)
    layer = LowRankKeyLayer(rank=2)
    layer.update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="presses that change the head dimension cannot run on it"):
        layer.write(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 16))


def test_reduced_space_attention_equals_attention_over_reconstructed_keys():
    """(q P) . (k P) with the basis attached to the keys == SDPA over k P P^T (GQA, causal mask, model scaling)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pikv_press.attention.lowrank import attach_basis, lowrank_attention_forward

    gen = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(1, 4, 5, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen),
                           torch.randn(1, 2, 9, 12, generator=gen))
    basis = torch.linalg.qr(torch.randn(1, 2, 16, 6, generator=gen)).Q  # orthonormal (16, 6) per head
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)[None, None]
    reduced, _ = lowrank_attention_forward(module, query, attach_basis(keys @ basis, basis), values, mask,
                                           scaling=0.25)
    reference, _ = sdpa_attention_forward(module, query, keys @ basis @ basis.transpose(-1, -2), values, mask,
                                          scaling=0.25)
    assert reduced.shape == (1, 5, 4, 12)
    assert torch.allclose(reduced, reference, atol=1e-5)
    plain, _ = lowrank_attention_forward(module, query, keys, values, mask, scaling=0.25)  # no basis: plain SDPA
    assert torch.equal(plain, sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)[0])


def test_reduced_attention_in_the_model():
    """Full rank through the reduced-space attention reproduces the full cache; a lower rank hands attention keys of
    width r."""
    from pikv_press.attention.lowrank import register_lowrank_attention
    from pikv_press.testing import build_model

    model = build_model("qwen3_moe", attn_implementation=register_lowrank_attention())
    ids = _ids(24)
    full = _decode(get_model("qwen3_moe"), DynamicCache(), ids, steps=4)
    reduced = _decode(model, LowRankKeyCache(rank=16, reduced_attention=True, config=model.config), ids, steps=4)
    assert (reduced - full).abs().max() < FP32_LOGIT_TOLERANCE
    widths = []
    handle = model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, kwargs, out: widths.append(kwargs["past_key_values"].layers[0]._coefficients.shape[-1]),
        with_kwargs=True)
    try:
        cache = LowRankKeyCache(rank=4, reduced_attention=True, config=model.config)
        _decode(model, cache, ids, steps=2)
        assert cache.layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))[0].shape[-1] == 4
    finally:
        handle.remove()
    assert widths == [4, 4, 4]


def test_generate_with_low_rank_keys():
    model = get_model("phimoe")
    ids = _ids(20)
    cache = LowRankKeyCache(energy=0.9)  # no config: layers added lazily
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 24) and cache_lengths(cache) == [23] * model.config.num_hidden_layers
    assert all(1 <= rank <= 16 for rank in cache.ranks)


def test_cache_names():
    from pikv_press.cache import make_cache

    model = get_model("qwen3_moe")
    for name, rank in (("lowrank-k50", 8), ("lowrank-k25", 4)):
        cache = make_cache(name, model.config)
        _decode(model, cache, _ids(10), steps=0)
        assert cache.ranks == [rank] * model.config.num_hidden_layers


def test_headwise_evictions_reach_the_reduced_attention():
    """AdaKVExpectedAttentionPress's head-wise masks: the reduced-space attention applies them (kvpress's patch never
    reaches it), so at full rank it decodes as SDPA over the same masked cache, and not as the unmasked cache."""
    from pikv_press import AdaKVExpectedAttentionPress
    from pikv_press.attention.lowrank import register_lowrank_attention
    from pikv_press.testing import build_model

    ids = _ids(40)
    logits = {}
    for name, attention, press in (("reduced", register_lowrank_attention(), AdaKVExpectedAttentionPress(0.5)),
                                   ("sdpa", "sdpa", AdaKVExpectedAttentionPress(0.5)), ("unmasked", "sdpa", None)):
        model = build_model("qwen3_moe", attn_implementation=attention)
        cache = LowRankKeyCache(rank=16, reduced_attention=name == "reduced", config=model.config)
        with torch.no_grad():
            if press is not None:
                with press(model):
                    model.model(input_ids=ids[:, :32], past_key_values=cache)
            else:
                model.model(input_ids=ids[:, :32], past_key_values=cache)
            logits[name] = model(ids[:, 32:], past_key_values=cache).logits
    assert (logits["reduced"] - logits["sdpa"]).abs().max() < FP32_LOGIT_TOLERANCE
    assert (logits["reduced"] - logits["unmasked"]).abs().max() > 100 * FP32_LOGIT_TOLERANCE
