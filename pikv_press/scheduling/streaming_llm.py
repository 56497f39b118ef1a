"""``StreamingLLMPolicy``: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikv_press.scheduling.base import OrderedScorerPress


@dataclass
class StreamingLLMPolicy(OrderedScorerPress):
    """StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) and the most recent ones (arXiv 2309.17453).

    Stateless: the slots are kept in arrival order (:class:`~pikv_press.scheduling.base.OrderedScorerPress`), so the
    first ``n_sink`` slots stay the first tokens of the sequence and the last slots the most recent ones, however
    often the cache is compressed. (kvpress's ``StreamingLLMPress`` scores by slot index too, but kvpress's
    ``ScorerPress.compress`` stores the kept rows in score order, which for its ties is not arrival order.)

    Not implemented: the paper assigns positions *within the cache* (a token's rotary position is its slot, so
    positions never exceed the cache size); here keys keep the rotary positions they were cached with, as in every
    kvpress press (kvpress's ``KeyRerotationPress`` re-rotates them). So positions keep growing with the stream.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    n_sink : number of first tokens always kept, >= 0 (the paper uses 4).
    """

    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"StreamingLLMPolicy: n_sink must be an integer >= 0, got {self.n_sink!r}.")

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """``slot index + 1`` (recent first), sinks above everything: ``(batch, kv_heads, slots)``."""
        length = keys.shape[2]
        scores = torch.arange(1, length + 1, device=keys.device, dtype=torch.float32)
        scores[: self.n_sink] = float(length + 1)
        return scores.expand(keys.shape[0], keys.shape[1], length)
