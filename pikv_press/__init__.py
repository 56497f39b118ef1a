"""pikv-press: KV cache compression for Mixture-of-Experts language models, in the style of NVIDIA kvpress.

Importing pikv_press changes nothing in kvpress or transformers. kvpress's presses become MoE-correct when asked:
``MoEAware(press)``, or inside ``with kvpress_moe_support():`` (see :mod:`pikv_press.compat`).

Public API
----------
- :func:`MoEAware`, :func:`kvpress_moe_support`, :func:`install_kvpress_compat` / :func:`uninstall_kvpress_compat`:
  run kvpress presses MoE-aware (a copy of one press, a block of code, or the whole process).
- :func:`ragged_cache_masks`: decode from caches whose layers hold different numbers of tokens.
- :func:`get_anatomy` / :class:`MoEAnatomy`: layers, attention modules, routers, dense vs MoE layers, experts, top-k,
  shared experts and router scoring of a loaded model (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V2/V3,
  GLM-4-MoE, Granite-MoE, PhiMoE; dense models are accepted and have no router).
- :class:`RoutingRecorder`: the routing of the context tokens of every MoE layer, on-device, for presses.
- :class:`RouterTap`: analysis of actual and predicted routing of every MoE layer, in prefill and decoding.
- :func:`make_cache`, :func:`layer_access`, :func:`cache_nbytes` / :func:`cache_lengths`: caches by name, the one
  cache-layer interface, and what a cache really holds.
- :class:`PackedKVCache` (KIVI-style packed int8/int4/int2 keys and values) and :class:`LowRankKeyCache` (keys on
  their top singular directions): caches that hold fewer bytes and compose with eviction presses;
  :class:`LatentCache` (the latent of DeepSeek's multi-head latent attention, with
  :func:`pikv_press.attention.enable_latent_attention`) and :class:`ExpertShardedCache` (per-expert ragged shards,
  read by ``attn_implementation="pikv_sharded"`` after :func:`pikv_press.attention.register_sharded_attention`).
- :mod:`pikv_press.scheduling`: decode-time policies (H2O, StreamingLLM, Quest-style pages, LRU, LFU, expert-aware) and
  bounded-memory chunked prefill (:func:`pikv_press.scheduling.chunked_prefill`).
- :mod:`pikv_press.kernels`: Triton kernels beside their torch references (``PIKV_KERNELS=auto|torch|triton``).
- :class:`PiKVPress` (TOVA made MoE-correct, the best press on the RULER-4k headline: routing did not help in the
  ablations), :class:`AdaKVExpectedAttentionPress` (ExpectedAttention under AdaKV's head-wise budgets with exact
  masks: better at 1k tokens), :class:`KVzipSurrogatePress` (KVzip's scores predicted by a linear surrogate fitted
  per model, the KVzap recipe; :mod:`pikv_press.surrogate` fits one) and the experimental
  routing presses :class:`ExpertBalancedPress`, :class:`RouterAffinityPress`, :class:`RoutingNoveltyPress`,
  :class:`RoutingLayerBudgetPress`.
- :func:`use_dense_masked_experts`: run a model's routed experts as two dense matmuls (faster on CPUs).
"""

import kvpress as _kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline; changes nothing else)

from pikv_press.cache import (
    ExpertShardedCache,
    KVLayerAccess,
    LatentCache,
    LowRankKeyCache,
    PackedKVCache,
    cache_lengths,
    cache_nbytes,
    layer_access,
    make_cache,
    register_cache,
)
from pikv_press.compat import MoEAware, is_moe_aware, kvpress_moe_support, ragged_cache_masks
from pikv_press.compat import install as install_kvpress_compat
from pikv_press.compat import uninstall as uninstall_kvpress_compat
from pikv_press.moe import (
    MoEAnatomy,
    RouterScoring,
    RouterTap,
    Routing,
    RoutingRecorder,
    get_anatomy,
    supported_families,
    use_dense_masked_experts,
)
from pikv_press.presses import (
    AdaKVExpectedAttentionPress,
    ExpertBalancedPress,
    KVzipSurrogatePress,
    PiKVPress,
    RouterAffinityPress,
    RoutingLayerBudgetPress,
    RoutingNoveltyPress,
)

__version__ = "0.1.0"

__all__ = [
    "AdaKVExpectedAttentionPress",
    "ExpertBalancedPress",
    "ExpertShardedCache",
    "KVzipSurrogatePress",
    "KVLayerAccess",
    "LatentCache",
    "LowRankKeyCache",
    "MoEAnatomy",
    "MoEAware",
    "PackedKVCache",
    "PiKVPress",
    "RouterAffinityPress",
    "RouterScoring",
    "RouterTap",
    "Routing",
    "RoutingLayerBudgetPress",
    "RoutingNoveltyPress",
    "RoutingRecorder",
    "cache_lengths",
    "cache_nbytes",
    "get_anatomy",
    "install_kvpress_compat",
    "is_moe_aware",
    "kvpress_moe_support",
    "layer_access",
    "make_cache",
    "ragged_cache_masks",
    "register_cache",
    "supported_families",
    "uninstall_kvpress_compat",
    "use_dense_masked_experts",
]
