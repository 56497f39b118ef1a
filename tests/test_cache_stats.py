"""Cache accounting counts real storage, through the cache-layer interface, for dynamic and quantized caches."""

import math

import pytest
import torch
from kvpress import KnormPress, SnapKVPress
from transformers import DynamicCache

from pikv_press import MoEAware, cache_lengths, cache_nbytes, layer_access, make_cache
from pikv_press.cache import KVLayerAccess, register_layer_adapter
from tests.conftest import get_model

GROUP = 64  # q_group_size of the quantized caches of pikv_press.cache.make_cache


def test_cache_bytes_and_lengths_follow_compression():
    model = get_model("deepseek_v3")  # keys 24 wide, values 12 wide
    ids = torch.randint(5, 300, (1, 40))
    full, compressed = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
        with MoEAware(KnormPress(0.75))(model):
            model.model(input_ids=ids, past_key_values=compressed)
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    per_token = heads * (24 + 12) * 4  # float32 keys and values of one token in one layer
    assert cache_lengths(full) == [40] * layers
    assert cache_nbytes(full) == layers * 40 * per_token
    assert cache_lengths(compressed) == [10] * layers
    assert cache_nbytes(compressed) == layers * 10 * per_token


def test_views_count_their_whole_storage():
    cache = DynamicCache()
    keys = torch.zeros(1, 2, 10, 4)
    cache.update(keys, keys.clone(), 0)
    cache.layers[0].keys = cache.layers[0].keys[:, :, :5]  # trimmed view: the storage is still alive
    assert cache_lengths(cache) == [5]
    assert cache_nbytes(cache) == 2 * keys.numel() * 4


def _quantized_bytes(values: int, bits: int, residual_values: int) -> int:
    """Keys and values of one layer: ``values`` quantized numbers each, packed ``8 // bits`` per byte in rows of
    GROUP bytes (one row per ``8 // bits`` groups), one float32 scale and one float32 zero point per group, plus a
    float32 residual of ``residual_values`` numbers each."""
    groups = values // GROUP
    packed = math.ceil(groups / (8 // bits)) * GROUP
    return 2 * (packed + 2 * groups * 4 + residual_values * 4)


@pytest.mark.parametrize(("name", "bits", "package"), [
    ("quantized-int4", 4, "optimum.quanto"), ("quantized-int2", 2, "optimum.quanto"),
    ("quantized-hqq-int4", 4, "hqq"), ("quantized-hqq-int8", 8, "hqq"),
])
def test_quantized_caches_are_counted_exactly(name, bits, package):
    pytest.importorskip(package)
    model = get_model("qwen3_moe")  # 2 KV heads of 16 dims
    cache = make_cache(name, model.config)
    ids = torch.randint(5, 300, (1, 131))
    with torch.no_grad():
        model.model(input_ids=ids[:, :128], past_key_values=cache)  # quantized at once
        model.model(input_ids=ids[:, 128:], past_key_values=cache)  # 3 tokens in the full-precision residual
    layers = model.config.num_hidden_layers
    assert cache_lengths(cache) == [131] * layers
    assert cache.get_seq_length() == 131
    assert cache_nbytes(cache) == layers * _quantized_bytes(2 * 128 * 16, bits, 2 * 3 * 16)
    keys, values = layer_access(cache.layers[0]).read()
    assert keys.shape == values.shape == (1, 2, 131, 16)


def test_presses_compress_quantized_caches():
    pytest.importorskip("optimum.quanto")
    model = get_model("qwen3_moe")
    cache = make_cache("quantized-int4", model.config)
    with torch.no_grad(), MoEAware(SnapKVPress(0.5, window_size=4))(model):
        model.model(input_ids=torch.randint(5, 300, (1, 128)), past_key_values=cache)
    assert cache_lengths(cache) == [64] * model.config.num_hidden_layers
    assert cache_nbytes(cache) == model.config.num_hidden_layers * _quantized_bytes(2 * 64 * 16, 4, 0)


def test_quantized_write_that_does_not_fit_the_groups_says_what_to_do():
    pytest.importorskip("optimum.quanto")
    model = get_model("qwen3_moe")  # 2 KV heads x 16 dims: 32 numbers per token, groups of 64
    cache = make_cache("quantized-int4", model.config)
    with pytest.raises(ValueError, match="groups of 64"):
        with torch.no_grad(), MoEAware(KnormPress(0.5))(model):
            model.model(input_ids=torch.randint(5, 300, (1, 126)), past_key_values=cache)  # keeps 63 tokens


def test_unknown_layers_get_a_clear_error_and_adapters_can_be_registered():
    class OddLayer:
        pass

    with pytest.raises(TypeError, match="register_layer_adapter"):
        layer_access(OddLayer())

    class OddAccess(KVLayerAccess):
        def __init__(self, layer):
            self.layer = layer

        def seq_length(self) -> int:
            return 7

    register_layer_adapter(OddLayer, OddAccess)
    assert layer_access(OddLayer()).seq_length() == 7
    with pytest.raises(ValueError, match="dynamic"):
        make_cache("paged")
    with pytest.raises(ValueError, match="config"):
        make_cache("quantized-int4")
