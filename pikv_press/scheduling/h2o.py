"""``H2OPolicy``: Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048): accumulated attention plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.scheduling.base import AttentionStatsPolicy
from pikv_press.scheduling.state import LayerState


@dataclass
class H2OPolicy(AttentionStatsPolicy):
    """H2O: keep the most recent tokens and the *heavy hitters*, the tokens with the largest attention accumulated
    since they entered the cache (arXiv 2306.14048, Algorithm 1; the reference code's ``H2OKVCache_LayerWise``).

    What is implemented: every forward pass adds, for each KV head, the attention probability each cached key
    receives from every query of the pass (summed over the query heads that share the KV head, since grouped-query
    models share one KV cache per group), as the paper accumulates over decoding steps. When the cache is compressed
    to ``n_kept`` slots, the last ``round(recent_fraction * n_kept)`` slots are kept and the other places go to the
    slots of largest accumulated score (ties to the more recent). The state of evicted tokens is dropped, as in the
    paper. Differences: the paper evicts one token per decoding step; here the wrapper decides how often (every step
    with ``DecodingPress(compression_interval=1)``, every chunk in :func:`chunked_prefill`), and a chunk of queries
    is scored together before eviction.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    recent_fraction : share of the kept slots for the recent window, in [0, 1] (the paper's default splits the
        budget evenly between heavy hitters and recent tokens: 0.5).
    """

    recent_fraction: float = 0.5

    def slot_scores(self, state: LayerState) -> torch.Tensor:
        return state.attention
