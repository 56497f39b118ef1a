"""attention layer of pikv-press (see DESIGN.md).

* :func:`~pikv_press.attention.latent.enable_latent_attention`: DeepSeek-V2/V3 multi-head latent attention computed
  from the latent cache (:class:`pikv_press.cache.LatentCache`) with absorbed projections.
* :func:`~pikv_press.attention.lowrank.register_lowrank_attention`: attention in the reduced key space of
  :class:`pikv_press.cache.LowRankKeyCache` (``attn_implementation="pikv_lowrank"``).
* ``attn_implementation="pikv_sharded"`` (registered on import, :mod:`pikv_press.attention.sharded`): attention over
  :class:`pikv_press.cache.ExpertShardedCache` shard by shard, merged exactly with log-sum-exp; across
  ``torch.distributed`` ranks with :mod:`pikv_press.attention.distributed`.
"""

from pikv_press.attention.latent import enable_latent_attention
from pikv_press.attention.lowrank import LOWRANK_ATTENTION, register_lowrank_attention
from pikv_press.attention.sharded import SHARDED_ATTENTION

__all__ = ["LOWRANK_ATTENTION", "SHARDED_ATTENTION", "enable_latent_attention", "register_lowrank_attention"]
