"""What pikv-press's routing presses share: a MoE-aware ``ScorerPress`` base and scale-free routing features.

Where the routing comes from (``routing=``):

* ``"actual"`` (default): the experts each context token was dispatched to by the layer's MoE block, recorded on
  device during the prefill (:class:`~pikv_press.moe.RoutingRecorder`). The routing of layer ``l`` exists only after
  its MoE block, which runs after its attention, so the MoE-aware hooks (:mod:`pikv_press.compat`) run such a press
  in a hook after the decoder layer (equivalent: during prefill no layer reads its cache again after its attention);
  the prefill record stores the routing, so replay gives the same cache.
* ``"predicted"``: the layer's router applied to the attention input that the press receives (the hidden states
  after the input norm, before the layer's router has seen the tokens; arXiv 2511.10676 reports 93-97% exact top-k
  on real MoEs). Cheaper and usable wherever a press runs (inside kvpress wrappers, decoding presses), but only an
  estimate of the routing.

Dense layers use the routing of the nearest MoE layer (:func:`pikv_press.compat.routing_source_layer`).

Routing features depend only on *which* experts a token is dispatched to and in which order (by routing weight),
never on the size of router logits: families differ (softmax or sigmoid scores) and the embedded model's logits are
deliberately tiny. Multiplying a router's weights by a positive constant leaves every feature unchanged wherever the
family's top-k and weight order are monotone in the logits (softmax families; sigmoid families without a correction
bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvpress import ScorerPress
from torch import nn

from pikv_press.compat import ROUTING_KWARG, _MoEAwareBase, routing_source_layer
from pikv_press.moe import MoEAnatomy, get_anatomy

ROUTING_SOURCES = ("actual", "predicted")


def check_ratio(press: Any, ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{type(press).__name__}: compression_ratio must be in [0, 1) (the fraction of the cache "
                         f"removed), got {ratio!r}.")


def check_batch_size_one(press: Any, keys: torch.Tensor) -> None:
    if keys.shape[0] != 1:
        raise ValueError(f"{type(press).__name__} compresses one sequence at a time (batch size 1, as kvpress's "
                         f"pipeline runs), got a batch of {keys.shape[0]}: compress each sequence separately.")


@dataclass
class RoutingScorerPress(_MoEAwareBase, ScorerPress):
    """Base of pikv-press's routing presses: a kvpress ``ScorerPress`` that is MoE-aware by construction and reads
    the routing of each layer's context tokens (see the module docstring for ``routing``).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    routing : ``"actual"`` (the MoE block's dispatch, recorded at prefill) or ``"predicted"`` (the router applied to
        the attention input).
    """

    routing: str = "actual"

    def __post_init__(self):
        check_ratio(self, self.compression_ratio)
        if self.routing not in ROUTING_SOURCES:
            raise ValueError(f"{type(self).__name__}: routing must be one of {ROUTING_SOURCES}, got {self.routing!r}.")

    @property
    def needs_routing(self) -> bool:
        """Whether the hooks must hand this press the recorded routing (``routing="actual"``)."""
        return self.routing == "actual"

    def post_init_from_model(self, model: nn.Module) -> None:
        anatomy = get_anatomy(model)
        if not anatomy.has_router:
            raise ValueError(f"{type(self).__name__} reads the routing of a Mixture-of-Experts model; "
                             f"{anatomy.describe()}. Use a kvpress press on dense models.")
        self._anatomy = anatomy

    @property
    def anatomy(self) -> MoEAnatomy:
        anatomy = getattr(self, "_anatomy", None)
        if anatomy is None:
            raise ValueError(f"{type(self).__name__} has not seen the model: use it as `with press(model):` or "
                             "through the pipeline.")
        return anatomy

    def context_experts(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                        kwargs: dict) -> torch.Tensor:
        """Expert ids of each context token ``(seq, top_k)`` int64, best first by routing weight, on the keys'
        device."""
        check_batch_size_one(self, keys)
        seq = keys.shape[2]
        routing = kwargs.get(ROUTING_KWARG)
        if routing is None:
            if self.routing == "actual":
                raise ValueError(
                    f"{type(self).__name__}(routing='actual') needs the routing recorded by pikv-press's MoE-aware "
                    "hooks: use it as `with press(model):`, through the pipeline, or inside a press wrapped with "
                    "pikv_press.MoEAware; or set routing='predicted'."
                )
            predicted = self.anatomy.route(routing_source_layer(self.anatomy, module.layer_idx), hidden_states[0])
            order = predicted.topk_weights.argsort(dim=-1, descending=True, stable=True)
            ids = predicted.topk_ids.gather(-1, order)
        else:
            ids = routing.topk_ids
        if ids.shape[0] != seq:
            raise ValueError(
                f"{type(self).__name__} got routing for {ids.shape[0]} tokens and a cache of {seq}: an earlier press "
                "pruned the layer. Put routing presses first in a ComposedPress."
            )
        return ids.to(keys.device)


def counted_experts(ids: torch.Tensor, experts_per_token: int | None) -> torch.Tensor:
    """``(seq, m)``: each token's first ``m`` routed experts (``m = experts_per_token``, all routed experts when
    ``None``), the experts a routing feature counts."""
    return ids if experts_per_token is None else ids[:, :experts_per_token]


def membership(ids: torch.Tensor, num_experts: int, experts_per_token: int | None) -> torch.Tensor:
    """``(seq, num_experts)`` float32: each token's share of each expert, ``1 / m`` for each of its first ``m``
    routed experts (:func:`counted_experts`)."""
    chosen = counted_experts(ids, experts_per_token)
    member = torch.zeros(ids.shape[0], num_experts, device=ids.device, dtype=torch.float32)
    return member.scatter_(1, chosen, 1.0 / chosen.shape[1])


def quantiles(values: torch.Tensor) -> torch.Tensor:
    """Mid-rank quantiles in (0, 1] along the last dimension: ``(rank + 1) / n`` with ties sharing their mean rank
    (so that equal values stay equal and no order is invented)."""
    n = values.shape[-1]
    ordered = values.sort(dim=-1).values
    low = torch.searchsorted(ordered, values.contiguous(), right=False)
    high = torch.searchsorted(ordered, values.contiguous(), right=True)
    return (low + high + 1).to(torch.float32) / (2 * n)


def lexicographic_scores(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Scores that order tokens by ``primary`` descending, ties by ``secondary`` descending: ``n - position`` in
    that order (exact integers, float32; shapes ``(..., seq)``, broadcast)."""
    primary, secondary = torch.broadcast_tensors(primary, secondary)
    by_secondary = secondary.argsort(dim=-1, descending=True, stable=True)
    order = by_secondary.gather(-1, primary.gather(-1, by_secondary).argsort(dim=-1, descending=True, stable=True))
    n = primary.shape[-1]
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    return (n - ranks).to(torch.float32)


def combine(base: torch.Tensor | None, feature: torch.Tensor, weight: float) -> torch.Tensor:
    """A routing feature ``(seq,)`` (higher = keep) alone or multiplied into base scores ``(batch, heads, seq)``.

    Alone (``base`` None): tokens ordered by the feature, ties to the more recent token. Combined: the product of the
    base scores' quantile and the feature's quantile to the power ``weight`` (quantiles, so that neither score's
    scale matters); ``weight=0`` keeps the base ranking, larger weights let routing decide more. Tokens holding the
    base's maximum score (the window of SnapKV, the last token of TOVA, sinks and window of StreamingLLM: what a
    base press protects) stay above all others.
    """
    if base is None:
        position = torch.arange(feature.shape[-1], device=feature.device, dtype=torch.float32)
        return lexicographic_scores(feature[None, None], position[None, None])
    combined = quantiles(base.float()) * quantiles(feature.float())[None, None] ** weight
    protected = base == base.amax(dim=-1, keepdim=True)
    return combined.masked_fill(protected, 2.0)


@dataclass
class RoutingFeaturePress(RoutingScorerPress):
    """Base of presses that score tokens by a routing feature (``feature``, higher = keep), alone or multiplied into
    a base kvpress scorer (see :func:`combine`).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    press : a kvpress ``ScorerPress`` to combine with, or ``None`` for the feature alone (its own ratio is not used).
    weight : exponent of the feature's quantile when combined, >= 0 (0: the base press's ranking).
    experts_per_token : routed experts per token in the membership, >= 1, or ``None`` for all the model's top-k.
    routing : ``"actual"`` or ``"predicted"`` (see the module docstring).
    """

    press: ScorerPress | None = None
    weight: float = 0.5
    experts_per_token: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.press is not None and not isinstance(self.press, ScorerPress):
            raise ValueError(f"{name} combines with a kvpress ScorerPress or None, got {type(self.press).__name__}.")
        if not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"{name}: weight must be >= 0, got {self.weight!r}.")
        if self.experts_per_token is not None and (not isinstance(self.experts_per_token, int)
                                                   or self.experts_per_token < 1):
            raise ValueError(f"{name}: experts_per_token must be an integer >= 1 or None, got "
                             f"{self.experts_per_token!r}.")

    def post_init_from_model(self, model: nn.Module) -> None:
        super().post_init_from_model(model)
        if self.press is not None:
            self.press.post_init_from_model(model)

    def feature(self, ids: torch.Tensor) -> torch.Tensor:
        """The feature ``(seq,)`` of tokens routed to ``ids`` ``(seq, top_k)``; higher = keep."""
        raise NotImplementedError

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        ids = self.context_experts(module, hidden_states, keys, kwargs)
        base = None if self.press is None else self.press.score(module, hidden_states, keys, values, attentions,
                                                                 kwargs)
        return combine(base, self.feature(ids), self.weight)
