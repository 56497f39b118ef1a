"""``RouterAffinityPress``: keep the tokens routed like the end of the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.kernels._dispatch import true_divide
from pikv_press.presses.base import RoutingFeaturePress, counted_experts


@dataclass
class RouterAffinityPress(RoutingFeaturePress):
    """Keeps the tokens whose routing matches the routing of an observation window at the end of the context.

    The window plays the role of SnapKV's observation window (the last tokens stand in for the queries to come), but
    the match is measured in expert space instead of attention: with ``m_t`` the token's membership (``1 / m`` on
    each of its first ``m`` routed experts) and ``w`` the mean membership of the window's tokens, a token's affinity
    is ``m_t . w`` (per layer; the same for every KV head). Alone, tokens are kept by affinity (ties to the more
    recent); with a base ``press``, the affinity's quantile to the power ``weight`` multiplies the base score's
    quantile (tokens the base press protects with its maximum score stay kept). pikv-press's own feature, no
    published algorithm.

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    press : a kvpress ``ScorerPress`` to combine with, or ``None`` for affinity alone (its own ratio is not used).
    weight : exponent of the affinity's quantile when combined, >= 0 (0: the base press's ranking).
    experts_per_token : routed experts per token in the membership, >= 1, or ``None`` (default) for all the model's
        top-k.
    routing : ``"actual"`` or ``"predicted"`` (see :mod:`pikv_press.presses.base`).
    window_size : tokens at the end of the context whose routing is the target, >= 1 (the whole context when
        shorter).
    """

    window_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"RouterAffinityPress: window_size must be an integer >= 1, got {self.window_size!r}.")

    def feature(self, ids: torch.Tensor) -> torch.Tensor:
        """Affinity ``(seq,)`` float32 in [0, 1] of tokens routed to ``ids`` ``(seq, top_k)``: ``m_t . w`` computed
        from integer counts (the window's tokens on each of the token's experts) and one final division, so that
        equal affinities are equal bit for bit on every device (a float product ``member @ target`` rounds
        differently on a GPU, which split ties and changed the kept tokens)."""
        chosen = counted_experts(ids, self.experts_per_token).long()
        m = chosen.shape[1]
        window = chosen[-self.window_size:]
        counts = torch.bincount(window.reshape(-1), minlength=self.anatomy.num_experts)
        hits = counts[chosen].sum(dim=1)
        return true_divide(hits.to(torch.float32), m * m * window.shape[0])
