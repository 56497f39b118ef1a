"""``ExpertAwarePolicy``: evict from the experts most over-represented in the cache (pikv-press's own rule)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pikv_press.moe import RoutingRecorder, get_anatomy
from pikv_press.presses.base import lexicographic_scores
from pikv_press.presses.expert_balanced import expert_budgets
from pikv_press.scheduling.base import AttentionStatsPolicy, recent_mask
from pikv_press.scheduling.state import UNKNOWN_EXPERT, LayerState


@dataclass
class ExpertAwarePolicy(AttentionStatsPolicy):
    """Keeps the cache's mix of experts close to the stream's: evictions come from the experts that are
    over-represented in the cache relative to their share of all tokens seen so far.

    PiKV's scheduling idea made concrete (no published algorithm; the rule is pikv-press's own). Per layer, every
    token belongs to its top-1 routed expert in the MoE layer that routes it (the layer itself, or the nearest MoE
    layer for a dense one), recorded with :class:`~pikv_press.moe.RoutingRecorder`. When a layer is compressed to
    ``n_kept`` slots:

    1. the last ``round(recent_fraction * n_kept)`` slots are kept, and so are tokens whose routing is not recorded
       yet (those of the forward pass in progress: a layer's MoE block runs after its attention);
    2. the remaining places are split across experts in proportion to each expert's share of *all* tokens routed so
       far in the stream (:func:`~pikv_press.presses.expert_balanced.expert_budgets` with ``power``; an expert never
       gets more than it holds in the cache, and its surplus goes to the others), so an expert holding more of the
       cache than its share loses tokens first;
    3. inside each expert, the tokens with the largest accumulated attention (H2O's score) are kept.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    recent_fraction : share of the kept slots for the recent window, in [0, 1].
    power : exponent on the experts' stream shares, >= 0 (1: proportional; 0: equal shares for experts in the cache).
    """

    recent_fraction: float = 0.5
    power: float = 1.0
    uses_routing: ClassVar[bool] = True
    seen: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise ValueError(f"ExpertAwarePolicy: power must be >= 0, got {self.power!r}.")

    def reset(self) -> None:
        super().reset()
        self.seen.clear()

    # -- routing ---------------------------------------------------------------------------------------------------
    def record_routing(self, layer_idx: int, start: int, experts: torch.Tensor) -> None:
        """Top-1 experts ``(n,)`` of the stream tokens ``start .. start + n - 1`` for layer ``layer_idx``: counted in
        the stream's shares and written to the slots of those tokens that are still cached."""
        experts = experts.long().flatten()
        if experts.numel() and int(experts.min()) < 0:
            raise ValueError("Expert ids must be >= 0.")
        counts = torch.bincount(experts.cpu(), minlength=1).double()
        seen = self.seen.get(layer_idx, torch.zeros(0, dtype=torch.float64))
        size = max(seen.numel(), counts.numel())
        self.seen[layer_idx] = torch.nn.functional.pad(seen, (0, size - seen.numel())) + \
            torch.nn.functional.pad(counts, (0, size - counts.numel()))
        state = self.states.get(layer_idx)
        if state is None or not experts.numel():
            return
        offset = state.positions - start
        inside = (offset >= 0) & (offset < experts.numel())
        looked_up = experts.to(state.positions.device)[offset.clamp(0, experts.numel() - 1)]
        state.experts = torch.where(inside, looked_up, state.experts)

    @contextmanager
    def routing_scope(self, model: nn.Module) -> Iterator[None]:
        """Record the routing of every forward pass of ``model`` and hand it to the policy at the start of the next
        pass (and on exit); entered by :func:`~pikv_press.scheduling.attention.track`."""
        from pikv_press.compat import routing_source_layer

        anatomy = get_anatomy(model)
        if not anatomy.has_router:
            raise ValueError(f"ExpertAwarePolicy reads the routing of a Mixture-of-Experts model; {anatomy.describe()}."
                             " Use H2OPolicy on dense models.")
        sources = {idx: routing_source_layer(anatomy, idx) for idx in anatomy.compressible_layers}
        recorder = RoutingRecorder(model)
        stream = {"start": None, "next": 0}

        def flush() -> None:
            if stream["start"] is None:
                return
            for idx, source in sources.items():
                try:
                    routing = recorder.routing(source)
                except ValueError:  # nothing recorded (the pass raised before this layer)
                    continue
                self.record_routing(idx, stream["start"], routing.topk_ids[:, 0])
            recorder.reset()
            stream["start"] = None

        def start_pass(module, args, kwargs) -> None:
            flush()
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if ids is not None and ids.shape[0] != 1:
                raise ValueError(f"ExpertAwarePolicy follows one sequence (batch size 1), got a batch of "
                                 f"{ids.shape[0]}.")
            stream["start"] = stream["next"]
            stream["next"] += 0 if ids is None else ids.shape[1]

        handle = anatomy.language_model.register_forward_pre_hook(start_pass, with_kwargs=True)
        try:
            with recorder:
                yield
                flush()
        finally:
            handle.remove()

    # -- selection -------------------------------------------------------------------------------------------------
    def slot_scores(self, state: LayerState) -> torch.Tensor:
        return state.attention

    def select(self, layer_idx: int, scores: torch.Tensor, n_kept: int) -> torch.Tensor:
        state = self.state(layer_idx, scores.shape[-1])
        length = scores.shape[-1]
        protected = recent_mask(length, self.n_recent(n_kept), scores) | (state.experts == UNKNOWN_EXPERT)
        seen = self.seen.get(layer_idx)
        in_quota = torch.zeros_like(protected)
        for b in range(scores.shape[0]):
            for h in range(scores.shape[1]):
                free = ~protected[b, h]
                n_free = n_kept - int((~free).sum())
                if n_free <= 0 or not bool(free.any()):
                    continue
                experts = state.experts[b, h][free]
                num_experts = max(int(experts.max()) + 1, 0 if seen is None else seen.numel())
                capacities = torch.bincount(experts, minlength=num_experts)
                shares = torch.zeros(num_experts, dtype=torch.float64) if seen is None else \
                    torch.nn.functional.pad(seen, (0, num_experts - seen.numel()))
                shares = shares.to(capacities.device)
                if float(shares[capacities > 0].sum()) == 0:  # no stream counts: shares of the cache itself
                    shares = capacities.double()
                budgets = expert_budgets(shares, capacities, n_free, float(self.power), 0)
                # rank of every free slot inside its expert, by accumulated attention (best = 0)
                attention = scores[b, h][free].float()
                order = lexicographic_scores(attention[None], torch.arange(attention.numel(), device=attention.device,
                                                                           dtype=torch.float32)[None])[0]
                by_score = order.argsort(descending=True)
                ranked_experts = experts[by_score]
                member = torch.nn.functional.one_hot(ranked_experts, num_experts)
                rank = (member.cumsum(0) - 1).gather(1, ranked_experts[:, None])[:, 0]
                keep = torch.zeros_like(free[free])
                keep[by_score] = rank < budgets[ranked_experts]
                row = in_quota[b, h]
                row[free.nonzero()[:, 0]] = keep
        priority = protected.float() * 2 + in_quota.float()
        return top_in_order_by(priority, scores.float(), n_kept)


def top_in_order_by(primary: torch.Tensor, secondary: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Ascending indices of the ``n_kept`` slots first by ``primary``, then ``secondary``, then the later slot."""
    slot = torch.arange(primary.shape[-1], device=primary.device, dtype=torch.float32).expand_as(primary)
    ranked = lexicographic_scores(secondary, slot)
    ranked = lexicographic_scores(primary, ranked)
    return ranked.topk(n_kept, dim=-1).indices.sort(dim=-1).values
