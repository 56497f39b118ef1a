"""PackedKVCache (KIVI-style packed low-bit KV): storage layout and byte counts from first principles, attention
close to the full cache, composition with eviction presses, kvpress's attribute access and pipeline, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from kvpress import DecodingPress, KnormPress, TOVAPress
from transformers import DynamicCache, Qwen3MoeConfig, pipeline

from pikv_press import MoEAware, cache_lengths, cache_nbytes, layer_access
from pikv_press.cache.packed import PackedKVCache, PackedKVLayer
from pikv_press.kernels.lowbit import dequantize
from pikv_press.prefill import PrefillRecorder
from pikv_press.testing import MOE_FAMILY_NAMES, build_tokenizer
from tests.conftest import get_model
from tests.decoding_helpers import decode_logits as _decode
from tests.decoding_helpers import token_ids as _ids

HEADS, DIM = 2, 16  # KV heads and head_dim of the tiny Qwen3-MoE



def packed_layer_bytes(tokens: int, bits: int, group: int, residual: int, value_group: int, key_dim: int,
                       value_dim: int, heads: int, itemsize: int) -> int:
    """Bytes of one layer holding ``tokens`` tokens, written out from the layout (module docstring of packed.py)."""
    quantized = group * (max(0, tokens - residual) // group)
    window = tokens - quantized
    per_head = (quantized * math.ceil(key_dim * bits / 8) + 2 * (quantized // group) * key_dim * itemsize
                + quantized * math.ceil(value_dim * bits / 8) + 2 * quantized * (value_dim // value_group) * itemsize
                + window * (key_dim + value_dim) * itemsize)
    return heads * per_head



@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bytes_are_counted_from_storage_and_match_the_layout(bits):
    model = get_model("qwen3_moe")
    cache = PackedKVCache(bits, group_size=8, residual_length=4, config=model.config)
    layers = model.config.num_hidden_layers
    expected = lambda n: layers * packed_layer_bytes(n, bits, 8, 4, 8, DIM, DIM, HEADS, 4)  # noqa: E731
    _decode(model, cache, _ids(37), steps=0)
    layer = cache.layers[0]
    assert (layer.quantized_length, layer.window_length) == (32, 5)
    assert cache_lengths(cache) == [37] * layers
    assert cache_nbytes(cache) == expected(37)
    _decode(model, cache, _ids(7, seed=1), steps=6)  # 7 + 6 tokens more: 50, a group flushed on the way
    assert (layer.quantized_length, layer.window_length) == (40, 10)
    assert cache_nbytes(cache) == expected(50)
    # the packed codes hold bits / 8 bytes a number
    assert layer._key_codes.dtype == torch.uint8 and layer._key_codes.shape == (1, HEADS, 40, DIM * bits // 8)


def test_stored_tokens_read_back_as_dequantized_codes_and_the_window_exactly():
    model = get_model("qwen3_moe")
    packed, full = PackedKVCache(4, group_size=8, residual_length=4, config=model.config), DynamicCache()
    ids = _ids(30)
    _decode(model, packed, ids, steps=0)
    _decode(model, full, ids, steps=0)
    layer = packed.layers[1]
    keys, values = layer_access(layer).read()
    quantized = layer.quantized_length  # 24: three groups of 8
    assert torch.equal(keys[..., quantized:, :], full.layers[1].keys[..., quantized:, :])
    assert torch.equal(values[..., quantized:, :], full.layers[1].values[..., quantized:, :])
    assert torch.equal(keys[..., :quantized, :], dequantize(layer._key_codes, layer._key_scale, layer._key_zero, 4, 8,
                                                            -2, DIM, torch.float32))
    # each number within half a quantization step of the full-precision one
    key_step = layer._key_scale.repeat_interleave(8, dim=-2)
    assert bool(((keys[..., :quantized, :] - full.layers[1].keys[..., :quantized, :]).abs()
                 <= key_step / 2 + 1e-6).all())
    value_step = layer._value_scale.repeat_interleave(8, dim=-1)
    assert bool(((values[..., :quantized, :] - full.layers[1].values[..., :quantized, :]).abs()
                 <= value_step / 2 + 1e-6).all())


INT8_LOGIT_TOLERANCE = 5e-3  # absolute, on logits of magnitude ~0.5-1 (int8 keys and values: 1/255 of a range)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_int8_logits_close_to_the_full_cache_prefill_exact(family):
    model = get_model(family)
    ids = _ids(40)
    value_group = 4  # divides every tiny family's value width (16, DeepSeek's 12)
    full = _decode(model, DynamicCache(), ids, steps=6)
    packed = _decode(model, PackedKVCache(8, 8, 4, value_group, config=model.config), ids, steps=6)
    assert torch.equal(packed[0], full[0])  # a forward pass sees its own tokens in full precision
    assert (packed - full).abs().max() < INT8_LOGIT_TOLERANCE
    int2 = _decode(model, PackedKVCache(2, 8, 4, value_group, config=model.config), ids, steps=6)
    assert (int2 - full).abs().max() > (packed - full).abs().max()  # fewer bits, larger error


def test_generate_runs_with_every_bit_width():
    model = get_model("mixtral")
    ids = _ids(24)
    for bits in (2, 4, 8):
        cache = PackedKVCache(bits, group_size=8, residual_length=8)  # no config: layers added lazily
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (1, 29)
        assert cache_lengths(cache) == [28] * model.config.num_hidden_layers


def _bytes_after_prefill(model, cache, ids, press=None) -> int:
    with torch.no_grad(), (MoEAware(press)(model) if press is not None else torch.no_grad()):
        model.model(input_ids=ids, past_key_values=cache)
    return cache_nbytes(cache)


@pytest.mark.parametrize("press", [KnormPress(0.5), TOVAPress(0.5)], ids=["knorm", "tova"])
def test_eviction_press_halves_tokens_and_bytes(press):
    model = get_model("qwen3_moe")
    layers = model.config.num_hidden_layers
    ids = _ids(64)
    cache = PackedKVCache(4, group_size=8, residual_length=0, config=model.config)
    nbytes = _bytes_after_prefill(model, cache, ids, press)
    assert cache_lengths(cache) == [32] * layers
    assert nbytes == layers * packed_layer_bytes(32, 4, 8, 0, 8, DIM, DIM, HEADS, 4)
    full = PackedKVCache(4, group_size=8, residual_length=0, config=model.config)
    assert nbytes * 2 == _bytes_after_prefill(model, full, ids)


def test_kept_rows_are_requantized_from_what_the_press_read():
    """The press reads the dequantized rows and keeps some: the stored result is their re-quantization."""
    model = get_model("qwen3_moe")
    ids = _ids(64)
    cache = PackedKVCache(4, group_size=8, residual_length=0, config=model.config)
    with torch.no_grad(), MoEAware(KnormPress(0.5))(model):
        model.model(input_ids=ids, past_key_values=cache)
    reference = PackedKVCache(4, group_size=8, residual_length=0, config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=reference)
    keys, values = layer_access(reference.layers[0]).read()
    norms = keys.norm(dim=-1)  # Knorm keeps the lowest key norms
    kept = norms.topk(32, dim=-1, largest=False).indices
    gather = lambda t: t.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
    expected = PackedKVLayer(4, group_size=8, residual_length=0)
    expected.write(gather(keys), gather(values))
    got_keys, got_values = layer_access(cache.layers[0]).read()
    exp_keys, exp_values = expected.read()
    assert torch.equal(got_keys, exp_keys) and torch.equal(got_values, exp_values)


def test_replay_on_a_packed_cache_equals_the_live_press():
    model = get_model("olmoe")
    ids = _ids(48)
    factory = lambda: PackedKVCache(4, group_size=8, residual_length=4, config=model.config)  # noqa: E731
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    replayed = recorder.snapshot.replay(MoEAware(KnormPress(0.5)), cache_factory=factory)
    live = factory()
    _bytes_after_prefill(model, live, ids, KnormPress(0.5))
    for a, b in zip(replayed.layers, live.layers, strict=True):
        for x, y in zip(layer_access(a).read(), layer_access(b).read(), strict=True):
            assert torch.equal(x, y)


def test_half_eviction_plus_int4_against_the_bf16_full_cache():
    """50% eviction + int4 (groups of 128, no full-precision window) against the bf16 full cache, head_dim 128.

    The figure from first principles, per token and KV head: bf16 full = 2 x 128 x 2 = 512 bytes; int4 = 2 x 64 bytes
    of codes + key scales/zeros (2 x 128 x 2 bytes per 128 tokens = 4) + value scales/zeros (2 x 2 bytes per token = 4)
    = 136 bytes, for half the tokens: 68, so 512 / 68 = 7.53x (8x less the scales and zero points).
    """
    config = Qwen3MoeConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=128, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=2048)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = _ids(1024)
    full = _bytes_after_prefill(model, DynamicCache(), ids)
    cache = PackedKVCache(4, group_size=128, residual_length=0, config=model.config)
    packed = _bytes_after_prefill(model, cache, ids, KnormPress(0.5))
    assert full == 2 * 2 * 1024 * 512  # layers x heads x tokens x bytes
    assert cache_lengths(cache) == [512, 512]
    assert packed == 2 * packed_layer_bytes(512, 4, 128, 0, 128, 128, 128, 2, 2) == 2 * 2 * 512 * 136
    assert full / packed == pytest.approx(512 / 68)
    assert full / packed > 7.5


def test_kvpress_attribute_access_and_pipeline():
    """kvpress reads ``layer.keys`` and assigns keys then values: assignment re-quantizes, a prefix crops exactly."""
    model = get_model("qwen2_moe")
    cache = PackedKVCache(4, group_size=8, residual_length=4, config=model.config)
    _decode(model, cache, _ids(30), steps=0)
    layer = cache.layers[0]
    keys, values = layer.keys, layer.values
    layer.keys, layer.values = keys[:, :, :13], values[:, :, :13]  # a prefix: crop, exact
    assert layer.get_seq_length() == 13
    assert torch.equal(layer.keys, keys[:, :, :13]) and torch.equal(layer.values, values[:, :, :13])
    # a DecodingPress writes through the attributes (kvpress's own hook)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=build_tokenizer())
    context = "The quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire. " * 3
    question = "What does the fox do?"
    packed = PackedKVCache(8, group_size=8, residual_length=4, config=model.config)
    answer = pipe(context, question=question, press=MoEAware(KnormPress(0.5)), cache=packed,
                  max_new_tokens=4)["answer"]
    context_len = pipe.preprocess(context, [question], "", 10**6)["context_ids"].shape[1]
    assert cache_lengths(packed) == [context_len // 2] * model.config.num_hidden_layers  # the answer trimmed off
    assert isinstance(answer, str)
    decoding = DecodingPress(KnormPress(), compression_interval=2, target_size=16)
    pipe(context, question=question, press=MoEAware(decoding), cache=PackedKVCache(8, 8, 4, config=model.config),
         max_new_tokens=4)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"bits=3 is not supported.*choose one of \(2, 4, 8\)"):
        PackedKVCache(bits=3)
    with pytest.raises(ValueError, match="group_size must be an integer"):
        PackedKVCache(bits=4, group_size=0)
    with pytest.raises(ValueError, match="residual_length must be"):
        PackedKVCache(bits=4, residual_length=-1)
    model = get_model("qwen3_moe")  # head_dim 16
    with pytest.raises(ValueError, match="value_group_size=32 does not divide the value head dimension 16"):
        _decode(model, PackedKVCache(4, group_size=32, config=model.config), _ids(8), steps=0)
    layer = PackedKVLayer(4, group_size=8, residual_length=0, value_group_size=8)
    layer.update(torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="changes the head dimension"):
        layer.write(torch.randn(1, 2, 8, 12), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match=r"shape \(batch, kv_heads, seq, dim\)"):
        layer.write(torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    # a press with its own hook reads the cache directly, which a partial-RoPE layout cannot allow on packed storage
    glm = get_model("glm4_moe")
    decoding = MoEAware(DecodingPress(KnormPress(), compression_interval=2, target_size=8))
    with pytest.raises(ValueError, match="use a DynamicCache with this model and press"):
        with torch.no_grad(), decoding(glm):
            glm.model(input_ids=_ids(20), past_key_values=PackedKVCache(8, 8, 4, config=glm.config))


@pytest.mark.parametrize("name", ["packed-int8", "packed-int4", "packed-int2"])
def test_cache_names_build_packed_caches_for_every_family(name):
    from pikv_press.cache import make_cache

    for family in ("qwen3_moe", "deepseek_v3"):  # value widths 16 and 12
        model = get_model(family)
        cache = make_cache(name, model.config)
        assert isinstance(cache, PackedKVCache) and cache.bits == int(name[-1])
        _decode(model, cache, _ids(70), steps=1)
        layer = cache.layers[-1]
        assert (layer.group_size, layer.residual_length) == (32, 32)
        assert layer.value_dim % layer.value_group_size == 0
        assert (layer.quantized_length, layer.window_length) == (32, 39)
