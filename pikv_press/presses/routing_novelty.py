"""``RoutingNoveltyPress``: keep the tokens whose routing is rare in their context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.presses.base import RoutingFeaturePress, membership


@dataclass
class RoutingNoveltyPress(RoutingFeaturePress):
    """Keeps the tokens whose routing is surprising under the context's own expert distribution.

    A token routed to experts that the rest of the context seldom uses carries information the rest does not (a
    needle in a haystack is such a token). With ``m_t`` the token's membership (``1 / m`` on each of its first ``m``
    routed experts) and ``p`` the context's mean membership, a token's novelty is the cross-entropy
    ``-sum_e m_t[e] log p[e]`` in nats (per layer; the same for every KV head). Alone, tokens are kept by novelty
    (ties to the more recent); with a base ``press``, the novelty's quantile to the power ``weight`` multiplies the
    base score's quantile (tokens the base press protects with its maximum score stay kept). pikv-press's own
    feature, no published algorithm.

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    press : a kvpress ``ScorerPress`` to combine with, or ``None`` for novelty alone (its own ratio is not used).
    weight : exponent of the novelty's quantile when combined, >= 0 (0: the base press's ranking).
    experts_per_token : routed experts per token in the membership, >= 1, or ``None`` for all the model's top-k
        (default 1: the top-1 expert, whose frequencies are the sharpest).
    routing : ``"actual"`` or ``"predicted"`` (see :mod:`pikv_press.presses.base`).
    """

    experts_per_token: int | None = 1

    def feature(self, ids: torch.Tensor) -> torch.Tensor:
        """Novelty ``(seq,)`` float32 >= 0 (nats) of tokens routed to ``ids`` ``(seq, top_k)``."""
        member = membership(ids, self.anatomy.num_experts, self.experts_per_token)
        frequency = member.mean(dim=0)
        surprise = torch.where(frequency > 0, -frequency.clamp_min(torch.finfo(torch.float32).tiny).log(),
                               torch.zeros_like(frequency))
        return member @ surprise
