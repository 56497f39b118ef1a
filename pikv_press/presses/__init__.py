"""pikv-press's presses: kvpress dataclasses, MoE-aware by construction, composable with kvpress presses.

- :class:`PiKVPress`: the default press (MoE-correct TOVA, chosen on the RULER-4k headline: routing did not help;
  figures in its docstring).
- :class:`AdaKVExpectedAttentionPress`: MoE-correct ExpectedAttention under AdaKV's head-wise budgets with exact
  masks (the default before; it leads at 1k tokens on the embedded model).
- :class:`ExpertBalancedPress`: the kept budget split across the experts the context tokens are routed to.
- :class:`RouterAffinityPress`: tokens routed like the end of the context, alone or with a base press.
- :class:`RoutingNoveltyPress`: tokens whose routing is rare in their context, alone or with a base press.
- :class:`RoutingLayerBudgetPress`: the global budget split across layers by each layer's measured routing.
- :class:`KVzipSurrogatePress`: KVzip's scores predicted from the attention input by a linear surrogate fitted for
  the model (the KVzap recipe; one is shipped for the embedded model).
- :class:`RoutingScorerPress`, :class:`RoutingFeaturePress`: their bases (routing from the MoE blocks, or
  predicted from the attention input).
"""

from pikv_press.presses.adakv_expected_attention import AdaKVExpectedAttentionPress
from pikv_press.presses.base import RoutingFeaturePress, RoutingScorerPress
from pikv_press.presses.expert_balanced import ExpertBalancedPress
from pikv_press.presses.kvzip_surrogate import KVzipSurrogatePress
from pikv_press.presses.pikv import PiKVPress
from pikv_press.presses.router_affinity import RouterAffinityPress
from pikv_press.presses.routing_layer_budget import RoutingLayerBudgetPress
from pikv_press.presses.routing_novelty import RoutingNoveltyPress

__all__ = [
    "AdaKVExpectedAttentionPress",
    "ExpertBalancedPress",
    "KVzipSurrogatePress",
    "PiKVPress",
    "RouterAffinityPress",
    "RoutingFeaturePress",
    "RoutingLayerBudgetPress",
    "RoutingNoveltyPress",
    "RoutingScorerPress",
]
