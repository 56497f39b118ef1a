"""The latent cache of multi-head latent attention: exact logits, real bytes, composition with eviction presses."""

import copy

import pytest
import torch
from kvpress import AdaKVPress, DecodingPress, KnormPress, PyramidKVPress, StreamingLLMPress
from transformers import DynamicCache, pipeline

from evaluation.latent_cache_bytes import deepseek_v2_lite_config, measured_bytes_per_token_and_layer
from pikv_press import MoEAware, cache_lengths, cache_nbytes, layer_access, make_cache, ragged_cache_masks
from pikv_press.attention.latent import enable_latent_attention, is_latent_attention_enabled
from pikv_press.cache.latent import LatentCache, LatentLayer, latent_bytes_per_token, match_rows, shared_rows
from pikv_press.testing import build_model
from tests.conftest import get_model

MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_logits_equal_stock_in_prefill_and_decoding(family, attn):
    model = get_model(family, attn)
    ids = torch.randint(5, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    stock, latent = DynamicCache(), LatentCache(model.config)
    with torch.no_grad():
        expected = [model(ids, past_key_values=stock).logits]
        for _ in range(4):  # decoding steps, one token each, greedy from the stock cache
            expected.append(model(expected[-1][:, -1:].argmax(-1), past_key_values=stock).logits)
        with enable_latent_attention(model):
            got = [model(ids, past_key_values=latent).logits]
            for step in expected[:-1]:  # the same tokens from the latent cache
                got.append(model(step[:, -1:].argmax(-1), past_key_values=latent).logits)
    for step_got, step_expected in zip(got, expected, strict=True):
        torch.testing.assert_close(step_got, step_expected, **TOL)
    assert cache_lengths(latent) == cache_lengths(stock) == [17] * model.config.num_hidden_layers
    assert all(isinstance(layer, LatentLayer) for layer in latent.layers)
    # what the latent layer reconstructs is what the stock cache holds
    for stock_layer, latent_layer in zip(stock.layers, latent.layers, strict=True):
        keys, values = layer_access(latent_layer).read()
        torch.testing.assert_close(keys, stock_layer.keys, **TOL)
        torch.testing.assert_close(values, stock_layer.values, **TOL)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_greedy_generation_identical_and_cache_latent(family):
    model = get_model(family)
    ids = torch.randint(5, 300, (1, 11), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        with enable_latent_attention(model):  # generate's own DynamicCache: its empty layers become latent layers
            latent = model.generate(ids, **kwargs)
    assert torch.equal(stock.sequences, latent.sequences)
    assert all(isinstance(layer, LatentLayer) for layer in latent.past_key_values.layers)
    assert cache_nbytes(latent.past_key_values) < cache_nbytes(stock.past_key_values)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_bytes_per_token_formula_equals_storage(family):
    model = get_model(family)
    batch, tokens = 2, 9
    ids = torch.randint(5, 300, (batch, tokens))
    stock, latent = DynamicCache(), make_cache("latent", model.config)
    with torch.no_grad():
        model(ids, past_key_values=stock)
        with enable_latent_attention(model):
            model(ids, past_key_values=latent)
    figures = latent_bytes_per_token(model.config, torch.float32)
    assert cache_nbytes(stock) == batch * tokens * figures.stock
    assert cache_nbytes(latent) == batch * tokens * figures.latent
    config = model.config
    assert figures.latent == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert figures.ratio > 1


def test_deepseek_v2_lite_bytes_per_token():
    config = deepseek_v2_lite_config()
    figures = latent_bytes_per_token(config)  # the config's bf16
    assert figures.stock == 27 * 16 * (128 + 64 + 128) * 2  # 270 KiB
    assert figures.latent == 27 * (512 + 64) * 2  # 30.4 KiB
    assert 8.8 < figures.ratio < 9.0
    # the formula per layer equals the storage of real caches of a layer with V2-Lite's attention shapes (bf16)
    stock, latent = measured_bytes_per_token_and_layer(config, tokens=4)
    assert (stock, latent) == (figures.stock / 27, figures.latent / 27)


def test_models_without_latent_attention_raise():
    model = get_model("qwen3_moe")
    with pytest.raises(ValueError, match="multi-head latent attention"):
        LatentCache(model.config)
    with pytest.raises(ValueError, match="multi-head latent attention"):
        with enable_latent_attention(model):
            pass
    with pytest.raises(ValueError, match="multi-head latent attention"):
        latent_bytes_per_token(model.config, torch.float32)


def test_forwards_restored_on_errors_and_nesting():
    model = get_model("deepseek_v3")
    modules = [layer.self_attn for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with enable_latent_attention(model):
            assert is_latent_attention_enabled(model)
            with enable_latent_attention(model):  # nested: nothing more to swap
                pass
            assert is_latent_attention_enabled(model)
            raise RuntimeError("boom")
    assert not is_latent_attention_enabled(model)
    assert all("forward" not in module.__dict__ for module in modules)


def test_wrong_cache_contents_raise():
    model = get_model("deepseek_v2")
    ids = torch.randint(5, 300, (1, 6))
    with torch.no_grad():
        with pytest.raises(ValueError, match="enable_latent_attention"):
            model(ids, past_key_values=LatentCache(model.config))  # stock attention into a latent cache
        stock = DynamicCache()
        model(ids, past_key_values=stock)
        with enable_latent_attention(model), pytest.raises(ValueError, match="per-head keys"):
            model(ids, past_key_values=stock)  # a cache already holding decompressed keys


def _prefill(model, ids, cache, press=None, latent=False):
    with torch.no_grad(), enable_latent_attention(model) if latent else torch.no_grad():
        if press is None:
            model.model(ids, past_key_values=cache)
        else:
            with MoEAware(press)(model):
                model.model(ids, past_key_values=cache)


def _next_logits(model, cache, tokens, latent):
    with torch.no_grad(), enable_latent_attention(model) if latent else torch.no_grad():
        return model(tokens, past_key_values=cache).logits


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_head_shared_press_equals_stock_press(family):
    """A press that keeps the same tokens in every head (StreamingLLM) gives the stock press's logits exactly."""
    model = get_model(family)
    ids, tokens = torch.randint(5, 300, (1, 20)), torch.randint(5, 300, (1, 3))
    press = StreamingLLMPress(0.5, n_sink=2)
    stock, latent = DynamicCache(), LatentCache(model.config)
    _prefill(model, ids, stock, press)
    _prefill(model, ids, latent, press, latent=True)
    assert cache_lengths(latent) == cache_lengths(stock) == [10] * model.config.num_hidden_layers
    torch.testing.assert_close(_next_logits(model, latent, tokens, True), _next_logits(model, stock, tokens, False),
                               **TOL)


def _votes(per_head: list[list[int]], kept: int) -> list[int]:
    """The shared tokens written out plainly: most heads first, then the Borda count, then the earlier token."""
    tokens = {t for head in per_head for t in head}
    votes = {t: sum(t in head for head in per_head) for t in tokens}
    borda = {t: sum(kept - head.index(t) for head in per_head if t in head) for t in tokens}
    return sorted(sorted(tokens, key=lambda t: (-votes[t], -borda[t], t))[:kept])


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_knorm_on_latent_cache(family):
    """MoEAware(KnormPress(0.5)) halves the stored tokens. Its heads keep different tokens, which one latent per token
    cannot hold: the latent keeps the tokens most heads kept, and the logits equal those of the stock cache holding
    those tokens in every head (not those of the stock press, which keeps each head's own tokens)."""
    model = get_model(family)
    ids, tokens = torch.randint(5, 300, (1, 20)), torch.randint(5, 300, (1, 3))
    full, latent, full_latent = DynamicCache(), LatentCache(model.config), LatentCache(model.config)
    _prefill(model, ids, full)
    _prefill(model, ids, full_latent, latent=True)
    _prefill(model, ids, latent, KnormPress(0.5), latent=True)
    layers = model.config.num_hidden_layers
    assert cache_lengths(latent) == [10] * layers
    assert cache_nbytes(latent) * 2 == cache_nbytes(full_latent)
    disagreements = 0
    for layer_idx, layer in enumerate(full.layers):
        norms = layer.keys[0].norm(dim=-1)  # (heads, seq): KnormPress keeps the lowest norms of each head
        per_head = [norms[h].topk(10, largest=False).indices.tolist() for h in range(norms.shape[0])]
        disagreements += len({frozenset(head) for head in per_head}) > 1
        rows = torch.tensor(_votes(per_head, 10))
        kept, everything = latent.layers[layer_idx], full_latent.layers[layer_idx]
        assert torch.equal(kept.latent[0, 0], everything.latent[0, 0, rows])
        assert torch.equal(kept.rope_key[0, 0], everything.rope_key[0, 0, rows])
        layer.keys, layer.values = layer.keys[:, :, rows], layer.values[:, :, rows]  # the same tokens, every head
    assert disagreements > 0  # the vote is exercised
    torch.testing.assert_close(_next_logits(model, latent, tokens, True), _next_logits(model, full, tokens, False),
                               **TOL)


def test_shared_rows_and_match_rows():
    per_head = torch.tensor([[[3, 1, 0], [1, 3, 2], [4, 1, 3]]])  # (batch, heads, kept), best first
    # 1 and 3 are kept by every head; 0, 2 and 4 by one each: 4 wins on Borda points (ranked first in its head)
    assert shared_rows(per_head, 5).tolist() == [_votes(per_head[0].tolist(), 3)] == [[1, 3, 4]]
    agree = torch.tensor([[[2, 0, 4], [4, 2, 0]]])
    assert shared_rows(agree, 5).tolist() == [[0, 2, 4]]
    index = torch.tensor([[[5, 0], [3, 1]]])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # hashed, hashed, matched by sorting rows
        full = torch.randn(1, 2, 6, 4).to(dtype)
        assert torch.equal(match_rows(full, full.gather(2, index[..., None].expand(-1, -1, -1, 4))), index)
        with pytest.raises(ValueError, match="keep or drop tokens"):
            match_rows(full, full[:, :, :2] + 1)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_padded_batch_and_kvpress_pipeline(family, tokenizer):
    model = get_model(family)
    ids = torch.randint(5, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, stock = model(ids, attention_mask=mask).logits, model.generate(ids, **kwargs)
        with enable_latent_attention(model):
            got, latent = model(ids, attention_mask=mask).logits, model.generate(ids, **kwargs)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], **TOL)
    assert torch.equal(stock, latent)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 4
    answer = pipe(context, question="What?", max_new_tokens=5)["answer"]
    cache = LatentCache(model.config)
    with enable_latent_attention(model):
        assert pipe(context, question="What?", max_new_tokens=5, cache=cache)["answer"] == answer
    assert min(cache_lengths(cache)) > 0


def test_presses_the_latent_cache_cannot_hold_raise():
    model = get_model("deepseek_v3")
    ids, token = torch.randint(5, 300, (1, 16)), torch.randint(5, 300, (1, 1))
    with torch.no_grad(), enable_latent_attention(model):
        with pytest.raises(ValueError, match="DynamicCache"):  # reads per-head tensors from the cache itself
            with MoEAware(DecodingPress(KnormPress(0.5), compression_interval=2, target_size=8))(model):
                model.model(ids, past_key_values=LatentCache(model.config))
        cache = LatentCache(model.config)
        try:
            with MoEAware(AdaKVPress(KnormPress(0.5)))(model):  # masks keys per head, frees nothing
                model.model(ids, past_key_values=cache)
            with pytest.raises(ValueError, match="head-wise press"):
                model(token, past_key_values=cache)
        finally:
            for layer in model.model.layers:
                layer.self_attn.masked_key_indices = None


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_bfloat16_error_no_worse_than_stock(family):
    """In bf16 the latent path (absorption and softmax in float32) is as close to the float32 model as the stock one."""
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(6))
    model16 = build_model(family).to(torch.bfloat16)
    with torch.no_grad():
        reference = get_model(family)(ids).logits
        stock = model16(ids, past_key_values=DynamicCache()).logits.float()
        with enable_latent_attention(model16):
            latent = model16(ids, past_key_values=LatentCache(model16.config)).logits.float()
    stock_error, latent_error = (stock - reference).abs().mean(), (latent - reference).abs().mean()
    assert latent.dtype == torch.float32 and stock_error > 0
    assert latent_error <= 1.25 * stock_error


def test_deepcopy_shares_the_projection_and_copies_the_latent():
    model = get_model("deepseek_v2")
    cache = LatentCache(model.config)
    with torch.no_grad(), enable_latent_attention(model):
        model(torch.randint(5, 300, (1, 5)), past_key_values=cache)
    clone = copy.deepcopy(cache)
    for layer, copied in zip(cache.layers, clone.layers, strict=True):
        assert copied.kv_b_proj is layer.kv_b_proj
        assert torch.equal(copied.latent, layer.latent) and copied.latent.data_ptr() != layer.latent.data_ptr()
    assert cache_nbytes(clone) == cache_nbytes(cache)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_ragged_press_on_latent_cache_decodes_like_stock_with_the_same_tokens(family):
    """PyramidKV leaves layers of different lengths: decoding from the latent cache equals decoding from a stock cache
    holding, in every head of each layer, the tokens the latent layer kept."""
    model = get_model(family)
    ids, tokens = torch.randint(5, 300, (1, 40)), torch.randint(5, 300, (1, 2))
    full, full_latent, latent = DynamicCache(), LatentCache(model.config), LatentCache(model.config)
    _prefill(model, ids, full)
    _prefill(model, ids, full_latent, latent=True)
    _prefill(model, ids, latent, PyramidKVPress(0.5, window_size=4), latent=True)
    lengths = cache_lengths(latent)
    assert len(set(lengths)) > 1 and sum(lengths) == sum(cache_lengths(full)) // 2
    for layer, full_layer, latent_layer in zip(full.layers, full_latent.layers, latent.layers, strict=True):
        # positions of the kept tokens (latent and rotary key: a token's latent alone repeats in layer 0)
        rows = match_rows(torch.cat([full_layer.latent, full_layer.rope_key], dim=-1),
                          torch.cat([latent_layer.latent, latent_layer.rope_key], dim=-1))[0, 0]
        layer.keys, layer.values = layer.keys[:, :, rows], layer.values[:, :, rows]
    with ragged_cache_masks(model):
        expected = _next_logits(model, full, tokens, False)
        got = _next_logits(model, latent, tokens, True)
    torch.testing.assert_close(got, expected, **TOL)
