"""``RoutingLayerBudgetPress``: the global budget redistributed across layers from each layer's measured routing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kvpress import KnormPress, ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from pikv_press.compat import routing_source_layer
from pikv_press.moe.record import ContextRouting
from pikv_press.presses.base import RoutingScorerPress, check_batch_size_one
from pikv_press.presses.expert_balanced import expert_budgets

LAYER_STATISTICS = ("entropy", "experts_spanned")


def routing_statistic(ids: torch.Tensor, num_experts: int, statistic: str) -> float:
    """A layer's routing statistic in [0, 1] from the top-1 experts of its context tokens (``ids[:, 0]``).

    ``"entropy"``: the entropy of the top-1 expert histogram over the context, divided by ``log(num_experts)``
    (0: every token goes to one expert; 1: tokens spread evenly over all experts). ``"experts_spanned"``: the share of
    experts that are the top-1 expert of at least one context token. Both depend only on which expert ranks first,
    never on the scale of the router's logits.
    """
    if statistic not in LAYER_STATISTICS:
        raise ValueError(f"statistic must be one of {LAYER_STATISTICS}, got {statistic!r}.")
    counts = torch.bincount(ids[:, 0].reshape(-1).cpu(), minlength=num_experts).to(torch.float64)
    if statistic == "experts_spanned":
        return float((counts > 0).sum()) / num_experts
    p = counts / counts.sum()
    entropy = -float(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum())
    return entropy / math.log(num_experts) if num_experts > 1 else 0.0


@dataclass
class RoutingLayerBudgetPress(RoutingScorerPress):
    """Splits the kept budget across layers by a routing statistic measured on the context, then keeps each layer's
    best tokens by a base press's scores.

    PiKV's scheduling applied to layer budgets, in the spirit of PyramidKV's per-layer budgets but measured rather
    than fixed (pikv-press's own rule, no published algorithm). Once every layer's routing is known, each layer's
    statistic ``s_l`` (:func:`routing_statistic`: the normalised entropy of its context's top-1 expert histogram, or
    the share of experts its context spans) gives it a budget in proportion to ``s_l ** strength``, at least
    ``min_layer_share`` of the uniform budget and at most the whole context; the budgets add up to exactly
    ``num_layers * compute_n_kept(seq, compression_ratio)`` tokens, so the global ratio is the one asked for.
    ``strength=0`` gives every layer the uniform budget (the base press alone).

    A layer's budget depends on the routing of every layer, which exists only once the whole context has run through
    the model: the MoE-aware hooks therefore compress every layer at the end of the prefill (during prefill no layer
    reads its cache again, so the result is the same as compressing each layer in its own hook, but the full cache
    of every layer is held until then: the peak memory of the prefill is that of the full cache). It needs the
    recorded routing (``routing="actual"``; predicted routing would need the hidden states of every layer) and runs
    through the MoE-aware hooks, not inside kvpress wrappers that read a press's scores (it has no single ratio per
    layer to score for).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed over all layers, in [0, 1).
    press : the kvpress ``ScorerPress`` that ranks tokens inside each layer (its own ratio is not used).
    statistic : ``"entropy"`` or ``"experts_spanned"`` (see :func:`routing_statistic`).
    strength : exponent of the statistic, >= 0 (0: uniform budgets; larger: layers with more spread routing get more).
    min_layer_share : floor of every layer, as a share of the uniform budget, in [0, 1].
    """

    press: ScorerPress = field(default_factory=KnormPress)
    statistic: str = "entropy"
    strength: float = 1.0
    min_layer_share: float = 0.25

    needs_all_layers = True

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.routing != "actual":
            raise ValueError(f"{name} needs the recorded routing of every layer (routing='actual'), got "
                             f"{self.routing!r}.")
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"{name} ranks tokens with a kvpress ScorerPress (KnormPress, TOVAPress, ...), got "
                             f"{type(self.press).__name__}.")
        if self.statistic not in LAYER_STATISTICS:
            raise ValueError(f"{name}: statistic must be one of {LAYER_STATISTICS}, got {self.statistic!r}.")
        if not isinstance(self.strength, (int, float)) or self.strength < 0:
            raise ValueError(f"{name}: strength must be >= 0, got {self.strength!r}.")
        if not isinstance(self.min_layer_share, (int, float)) or not 0.0 <= self.min_layer_share <= 1.0:
            raise ValueError(f"{name}: min_layer_share must be in [0, 1], got {self.min_layer_share!r}.")
        self.layer_budgets: dict[int, int] = {}
        self.layer_statistics: dict[int, float] = {}

    def post_init_from_model(self, model: nn.Module) -> None:
        super().post_init_from_model(model)
        self.press.post_init_from_model(model)

    def plan_layers(self, routing: dict[int, ContextRouting], layers: list[int]) -> dict[int, int]:
        """Set (and return) the kept tokens of every layer in ``layers`` from the context routing of every MoE
        layer."""
        anatomy = self.anatomy
        missing = [m for m in {routing_source_layer(anatomy, idx) for idx in layers} if m not in routing]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the routing of MoE layers {sorted(missing)}: record the "
                             "whole prefill (PrefillRecorder) or run the press through the MoE-aware hooks.")
        stats = {idx: routing_statistic(routing[routing_source_layer(anatomy, idx)].topk_ids, anatomy.num_experts,
                                        self.statistic) for idx in layers}
        seq = int(routing[routing_source_layer(anatomy, layers[0])].topk_ids.shape[0])
        uniform = compute_n_kept(seq, self.compression_ratio)
        budgets = expert_budgets(
            torch.tensor([stats[idx] for idx in layers], dtype=torch.float64),
            torch.full((len(layers),), seq, dtype=torch.int64),
            uniform * len(layers), float(self.strength), int(self.min_layer_share * uniform),
        )
        self.layer_statistics = stats
        self.layer_budgets = {idx: int(b) for idx, b in zip(layers, budgets.tolist(), strict=True)}
        return dict(self.layer_budgets)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} sets a budget per layer and has no scores for a single ratio: wrap "
                         "its base press instead of it, or use it on its own (or first in a ComposedPress).")

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        check_batch_size_one(self, keys)
        n_kept = self.layer_budgets.get(module.layer_idx)
        if n_kept is None:
            raise ValueError(f"{type(self).__name__} has no budget for layer {module.layer_idx}: it runs through "
                             "pikv-press's MoE-aware hooks (`with press(model):`, the pipeline, or a prefill replay), "
                             "which plan every layer's budget once the whole context has been routed.")
        if n_kept >= keys.shape[2]:
            return keys, values
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        indices = scores.topk(n_kept, dim=-1).indices.unsqueeze(-1)
        keys = keys.gather(2, indices.expand(-1, -1, -1, keys.shape[-1])).contiguous()
        values = values.gather(2, indices.expand(-1, -1, -1, values.shape[-1])).contiguous()
        return keys, values
