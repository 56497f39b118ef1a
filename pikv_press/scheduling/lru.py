"""``LRUPolicy``: evict the least recently *accessed* tokens (a cache-replacement baseline, no paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.scheduling.base import AttentionStatsPolicy
from pikv_press.scheduling.state import LayerState


@dataclass
class LRUPolicy(AttentionStatsPolicy):
    """Least recently used, with attention as the access: keep the tokens accessed most recently.

    A query *accesses* a key when some query head of the KV head's group gives it at least ``access_threshold``
    times the uniform weight ``1 / keys the query sees`` (1.0: above-average attention). A token's last access is the
    stream index of the last query that accessed it, or its own index when nothing has (a token counts as accessed
    when it is written). The kept slots are the last ``round(recent_fraction * n_kept)`` slots and the slots of most
    recent last access (ties to the more recent token). Classic LRU replacement applied to a KV cache, per KV head;
    not a published KV-cache method.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    recent_fraction : share of the kept slots for the recent window, in [0, 1] (default 0: LRU alone).
    access_threshold : multiple of the uniform attention weight that counts as an access, > 0.
    """

    recent_fraction: float = 0.0

    def slot_scores(self, state: LayerState) -> torch.Tensor:
        return state.last_access.float()
