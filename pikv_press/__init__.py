"""pikv-press: KV cache compression for Mixture-of-Experts language models, in the style of NVIDIA kvpress.

Importing pikv_press makes every kvpress press MoE-aware (see :mod:`pikv_press.compat`): query-based scorers use
each family's real queries, sliding-window layers are left alone, and impossible combinations raise clear errors.

Public API
----------
- :func:`get_anatomy` / :class:`MoEAnatomy`: layers, attention modules, routers, dense vs MoE layers, experts, top-k,
  shared experts and router scoring of a loaded model (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V2/V3,
  GLM-4-MoE, Granite-MoE, PhiMoE; dense models are accepted and have no router).
- :class:`RouterTap`: records actual and predicted routing of every MoE layer, in prefill and decoding.
- :class:`AttentionLayout` and :class:`AttentionView`: exact queries, keys and RoPE of each family in kvpress's layout.
- :func:`cache_nbytes` / :func:`cache_lengths`: bytes of storage and tokens per layer a KV cache really holds.
- :func:`install_kvpress_compat` / :func:`uninstall_kvpress_compat`: turn the kvpress integration on or off.
"""

import kvpress as _kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)

from pikv_press.cache import cache_lengths, cache_nbytes
from pikv_press.compat import AttentionView, check_press_supported
from pikv_press.compat import install as install_kvpress_compat
from pikv_press.compat import uninstall as uninstall_kvpress_compat
from pikv_press.moe import (
    AttentionLayout,
    MoEAnatomy,
    RouterScoring,
    RouterTap,
    Routing,
    RoutingRecord,
    get_anatomy,
    supported_families,
    use_dense_masked_experts,
)

__version__ = "0.1.0"

install_kvpress_compat()

__all__ = [
    "AttentionLayout",
    "AttentionView",
    "MoEAnatomy",
    "RouterScoring",
    "RouterTap",
    "Routing",
    "RoutingRecord",
    "cache_lengths",
    "cache_nbytes",
    "check_press_supported",
    "get_anatomy",
    "install_kvpress_compat",
    "supported_families",
    "uninstall_kvpress_compat",
    "use_dense_masked_experts",
]
