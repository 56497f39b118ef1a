"""Cache layouts and cache accounting.

Today: :func:`cache_nbytes` and :func:`cache_lengths` measure what a cache really holds. Cache layouts that physically
hold less (expert-sharded, ragged, quantized, latent) will live here.
"""

from pikv_press.cache.stats import cache_lengths, cache_nbytes

__all__ = ["cache_lengths", "cache_nbytes"]
