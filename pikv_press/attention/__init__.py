"""attention layer of pikv-press (see DESIGN.md).

* :func:`~pikv_press.attention.latent.enable_latent_attention`: DeepSeek-V2/V3 multi-head latent attention computed
  from the latent cache (:class:`pikv_press.cache.LatentCache`) with absorbed projections.
"""

from pikv_press.attention.latent import enable_latent_attention

__all__ = ["enable_latent_attention"]
