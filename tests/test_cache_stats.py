"""Cache accounting counts real storage."""

import torch
from kvpress import KnormPress
from transformers import DynamicCache

from pikv_press import cache_lengths, cache_nbytes
from tests.conftest import get_model


def test_cache_bytes_and_lengths_follow_compression():
    model = get_model("deepseek_v3")  # keys 24 wide, values 12 wide
    ids = torch.randint(5, 300, (1, 40))
    full, compressed = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
        with KnormPress(0.75)(model):
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
