"""``LFUPolicy``: evict the least frequently *accessed* tokens (a cache-replacement baseline, no paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.scheduling.base import AttentionStatsPolicy
from pikv_press.scheduling.state import LayerState


@dataclass
class LFUPolicy(AttentionStatsPolicy):
    """Least frequently used, with attention as the access: keep the tokens accessed by the most queries.

    Accesses are counted as in :class:`~pikv_press.scheduling.lru.LRUPolicy` (a query accesses a key when some head
    of the group gives it at least ``access_threshold`` times the uniform weight); a token's count is the number of
    queries that accessed it since it entered. New tokens have few accesses, so a recent window protects them: the
    kept slots are the last ``round(recent_fraction * n_kept)`` slots and the most accessed others (ties to the
    more recent token, as LRU breaks LFU's ties). Classic LFU replacement applied to a KV cache, per KV head; not a
    published KV-cache method. Unlike H2O it counts how often a token mattered, not how much attention it got.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    recent_fraction : share of the kept slots for the recent window, in [0, 1] (default 0.5, as H2O).
    access_threshold : multiple of the uniform attention weight that counts as an access, > 0.
    """

    recent_fraction: float = 0.5

    def slot_scores(self, state: LayerState) -> torch.Tensor:
        return state.accesses.float()
