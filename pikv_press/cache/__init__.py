"""Cache layouts and cache accounting.

* :func:`layer_access` / :class:`KVLayerAccess`: the one interface through which presses, the prefill replay and the
  statistics read and write a cache layer (transformers' dynamic, sliding-window and quantized layers; pikv-press's
  own layouts implement it directly).
* :func:`make_cache` / :func:`register_cache`: caches by name (``dynamic``, ``quantized-int4``, ...).
* :func:`cache_nbytes` / :func:`cache_lengths`: what a cache really holds, from tensor storage.
* :class:`PackedKVCache`: KIVI-style packed int8/int4/int2 keys and values with a full-precision window
  (:mod:`pikv_press.cache.packed`); :class:`LowRankKeyCache`: keys on their top singular directions
  (:mod:`pikv_press.cache.lowrank`). Both hold fewer bytes, counted by :func:`cache_nbytes`, and compose with presses.
* :class:`LatentCache` (``make_cache("latent", config)``): the latent cache of multi-head latent attention
  (DeepSeek-V2/V3), with :func:`pikv_press.attention.latent.enable_latent_attention`.
* :class:`ExpertShardedCache`: each layer's KV split into shards by routed expert (plus sink/recent tokens), ragged,
  on their own devices or ranks (:mod:`pikv_press.cache.sharded`), read by ``attn_implementation="pikv_sharded"``.
"""

from pikv_press.cache.factory import CACHES, make_cache, register_cache
from pikv_press.cache.latent import LatentCache
from pikv_press.cache.layers import KVLayerAccess, layer_access, register_layer_adapter
from pikv_press.cache.lowrank import LowRankKeyCache
from pikv_press.cache.packed import PackedKVCache
from pikv_press.cache.sharded import ExpertShardedCache
from pikv_press.cache.stats import cache_lengths, cache_nbytes

__all__ = [
    "CACHES",
    "ExpertShardedCache",
    "KVLayerAccess",
    "LatentCache",
    "LowRankKeyCache",
    "PackedKVCache",
    "cache_lengths",
    "cache_nbytes",
    "layer_access",
    "make_cache",
    "register_cache",
    "register_layer_adapter",
]
