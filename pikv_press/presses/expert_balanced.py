"""``ExpertBalancedPress``: the kept budget split across the experts that the context tokens are routed to."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress import KnormPress, ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from pikv_press.presses.base import RoutingScorerPress, lexicographic_scores, membership


def expert_budgets(sizes: torch.Tensor, capacities: torch.Tensor, n_kept: int, power: float,
                   min_tokens: int) -> torch.Tensor:
    """Integer budgets ``(num_experts,)`` int64 that add up to ``min(n_kept, capacities.sum())``.

    Every expert with tokens first gets ``min(min_tokens, capacity)`` (the floor; dropped when the floors alone
    exceed ``n_kept``); the rest is shared in proportion to ``sizes ** power``, no expert above its ``capacity``
    (capped shares are handed to the others), and rounded by largest remainder.

    Parameters
    ----------
    sizes : (num_experts,) float, the weight of each expert's group (its token count, or fractional membership).
    capacities : (num_experts,) int, the tokens each group holds (a budget never exceeds it).
    n_kept : tokens to keep in all.
    power : exponent of the group sizes, >= 0 (1: proportional, 0: equal shares).
    min_tokens : floor per expert with tokens, >= 0.
    """
    # a few dozen numbers and a loop of small steps: on the CPU, so that a GPU is synchronised once, not at every step
    # (and the budgets are the same on every device)
    out_device = sizes.device
    device, dtype = torch.device("cpu"), torch.float64
    sizes = sizes.detach().to(device)
    capacities = capacities.to(device=device, dtype=torch.int64)
    total = int(min(n_kept, int(capacities.sum())))
    floors = capacities.clamp(max=min_tokens)
    if int(floors.sum()) > total:
        floors = torch.zeros_like(capacities)
    alloc = floors.to(dtype)
    cap = capacities.to(dtype)
    weights = torch.where(capacities > 0, sizes.to(dtype).clamp_min(0) ** power, torch.zeros((), dtype=dtype,
                                                                                              device=device))
    remaining = float(total - int(floors.sum()))
    for _ in range(sizes.shape[0] + 1):  # water-filling: each round caps at least one expert, or finishes
        active = (alloc < cap) & (weights > 0)
        if remaining <= 0 or not bool(active.any()):
            break
        share = torch.where(active, weights, torch.zeros_like(weights))
        quota = remaining * share / share.sum()
        over = active & (alloc + quota > cap)
        if not bool(over.any()):
            alloc = alloc + quota
            break
        remaining -= float((cap - alloc)[over].sum())
        alloc = torch.where(over, cap, alloc)
    budgets = alloc.floor().to(torch.int64).minimum(capacities)
    missing = total - int(budgets.sum())
    if missing > 0:  # largest remainders first, among experts with room left
        remainder = torch.where(budgets < capacities, alloc - budgets.to(dtype), torch.full_like(alloc, -1.0))
        order = remainder.argsort(descending=True, stable=True)
        room = (capacities - budgets)[order]
        # hand one token at a time down the order (several rounds only if few experts have room)
        while missing > 0:
            give = torch.zeros_like(budgets)
            take = (room > 0).to(torch.int64).cumsum(0) <= missing
            step = ((room > 0) & take).to(torch.int64)
            give[order] = step
            budgets += give
            room -= step
            missing -= int(step.sum())
    return budgets.to(out_device)


@dataclass
class ExpertBalancedPress(RoutingScorerPress):
    """Keeps the best tokens of every expert's group: the kept budget is split across the experts the context tokens
    are routed to, and each group keeps its best-scored tokens.

    PiKV's idea of expert-sharded KV storage applied to eviction (the budget split is pikv-press's own, no published
    algorithm). Per layer (and per KV head, with that head's scores), tokens are grouped by their
    routed expert (the top-1, or their first ``experts_per_token`` experts with membership ``1 / m`` each); each
    expert gets a budget in proportion to its group's size to the power ``power``, at least ``min_tokens_per_expert``
    tokens of every expert that has tokens, and at most its group; a token is kept when it ranks within the budget of
    one of its experts by the base press's score. For top-1 grouping the budgets add up to the kept count exactly;
    with several experts per token, groups overlap and the remaining places go to the tokens closest to their
    groups' budgets. Exactly ``compute_n_kept(seq, compression_ratio)`` tokens are kept (the keys and values are
    physically smaller), as for any kvpress ``ScorerPress``; the press's scores order every token, so it composes
    with kvpress wrappers.

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    press : the kvpress ``ScorerPress`` that ranks tokens inside each group (its own ratio is not used).
    power : budget exponent on group sizes, >= 0: 1 splits in proportion to group sizes (close to the base press
        alone), 0 gives every expert the same budget, 0.5 is in between.
    min_tokens_per_expert : floor of every expert that has tokens, >= 0 (dropped in layers where the floors alone
        exceed the kept count).
    experts_per_token : routed experts per token used for grouping, >= 1 (1: top-1 grouping); capped at the model's
        top-k.
    routing : ``"actual"`` or ``"predicted"`` (see :mod:`pikv_press.presses.base`).
    """

    press: ScorerPress = field(default_factory=KnormPress)
    power: float = 0.5
    min_tokens_per_expert: int = 1
    experts_per_token: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"ExpertBalancedPress wraps a kvpress ScorerPress (SnapKVPress, TOVAPress, ...), got "
                             f"{type(self.press).__name__}.")
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise ValueError(f"ExpertBalancedPress: power must be >= 0, got {self.power!r}.")
        if not isinstance(self.min_tokens_per_expert, int) or self.min_tokens_per_expert < 0:
            raise ValueError(f"ExpertBalancedPress: min_tokens_per_expert must be an integer >= 0, got "
                             f"{self.min_tokens_per_expert!r}.")
        if not isinstance(self.experts_per_token, int) or self.experts_per_token < 1:
            raise ValueError(f"ExpertBalancedPress: experts_per_token must be an integer >= 1, got "
                             f"{self.experts_per_token!r}.")

    def post_init_from_model(self, model: nn.Module) -> None:
        super().post_init_from_model(model)
        self.press.post_init_from_model(model)

    def budgets(self, ids: torch.Tensor, n_kept: int) -> torch.Tensor:
        """The budget of every expert ``(num_experts,)`` int64 for a layer whose tokens route to ``ids``
        ``(seq, top_k)``."""
        member = membership(ids, self.anatomy.num_experts, self.experts_per_token)
        return expert_budgets(member.sum(0), (member > 0).sum(0), n_kept, self.power, self.min_tokens_per_expert)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        ids = self.context_experts(module, hidden_states, keys, kwargs)  # (seq, top_k)
        base = self.press.score(module, hidden_states, keys, values, attentions, kwargs)  # (1, heads, seq)
        seq = keys.shape[2]
        n_kept = compute_n_kept(seq, self.compression_ratio)
        member = membership(ids, self.anatomy.num_experts, self.experts_per_token) > 0  # (seq, experts)
        budgets = self.budgets(ids, n_kept).to(torch.float32)  # (experts,)
        # rank of each token inside each of its groups, by the head's base score (best = 0)
        order = base.argsort(dim=-1, descending=True, stable=True)  # (1, heads, seq)
        in_order = member[order].to(torch.int32)  # (1, heads, seq, experts)
        ranks_in_order = in_order.cumsum(dim=-2) - 1
        ranks = torch.empty_like(ranks_in_order).scatter_(
            -2, order.unsqueeze(-1).expand_as(ranks_in_order), ranks_in_order)  # (1, heads, seq, experts)
        # how far into its budget a token ranks: < 1 means within it; the smallest over the token's experts counts
        depth = torch.where(member & (budgets > 0), (ranks.to(torch.float32) + 0.5) / budgets.clamp_min(1),
                            torch.tensor(float("inf"), device=keys.device))
        depth = depth.amin(dim=-1)  # (1, heads, seq)
        # keep by depth, ties (and tokens beyond every budget) by the base score
        return lexicographic_scores(-depth, base.float())
