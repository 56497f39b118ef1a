"""attention layer of pikv-press (see DESIGN.md).

* :func:`~pikv_press.attention.latent.enable_latent_attention`: DeepSeek-V2/V3 multi-head latent attention computed
  from the latent cache (:class:`pikv_press.cache.LatentCache`) with absorbed projections.
* :func:`~pikv_press.attention.lowrank.register_lowrank_attention`: attention in the reduced key space of
  :class:`pikv_press.cache.LowRankKeyCache` (``attn_implementation="pikv_lowrank"``).
* :func:`register_sharded_attention` (``attn_implementation="pikv_sharded"``, :mod:`pikv_press.attention.sharded`):
  attention over
  :class:`pikv_press.cache.ExpertShardedCache` shard by shard, merged exactly with log-sum-exp; across
  ``torch.distributed`` ranks with :mod:`pikv_press.attention.distributed`.
"""

from pikv_press.attention.latent import enable_latent_attention
from pikv_press.attention.lowrank import LOWRANK_ATTENTION, register_lowrank_attention
from pikv_press.cache.sharded import SHARDED_ATTENTION

__all__ = ["LOWRANK_ATTENTION", "SHARDED_ATTENTION", "enable_latent_attention", "register_lowrank_attention",
           "register_sharded_attention"]


def register_sharded_attention() -> str:
    """Register the ``pikv_sharded`` attention with transformers' ``AttentionInterface`` (idempotent; importing
    :mod:`pikv_press.attention.sharded` does the same); returns the name to pass as ``attn_implementation``. Importing
    :mod:`pikv_press` alone registers nothing."""
    import pikv_press.attention.sharded  # noqa: F401  (registers on import)

    return SHARDED_ATTENTION
