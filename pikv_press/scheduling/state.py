"""What the decode-time policies know about each cached token: per-slot state, and one step of attention statistics.

Every tensor is ``(batch, kv_heads, slots)``, aligned with the slots of one cache layer (slot ``i`` of the state is
row ``i`` of the layer's keys and values). The policies keep the slots in the order the tokens arrived (oldest first),
so that "the most recent tokens" are the last slots and "the first tokens" the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNKNOWN_EXPERT = -1
"""Expert id of a slot whose routing has not been recorded yet (its MoE block has not run)."""


@dataclass
class AttentionStep:
    """Attention statistics of one forward pass of one layer, per KV head, over the layer's ``slots`` keys.

    ``received`` (batch, kv_heads, slots) float32: attention probability each key received, summed over the queries of
    the pass and the query heads that share the KV head (H2O's accumulated attention score);
    ``last_access`` (batch, kv_heads, slots) int64: index ``0..queries-1`` of the last query that *accessed* the key
    (``-1``: none); ``accesses`` (batch, kv_heads, slots) int64: how many queries accessed it. A query accesses a key
    when some head of the group gives it a probability of at least ``access_threshold`` times the uniform weight
    ``1 / visible keys`` of that query (see :meth:`from_probs`).
    """

    received: torch.Tensor
    last_access: torch.Tensor
    accesses: torch.Tensor
    num_queries: int

    @classmethod
    def from_probs(cls, probs: torch.Tensor, num_kv_heads: int, access_threshold: float = 1.0,
                   visible: torch.Tensor | None = None) -> AttentionStep:
        """Statistics of attention probabilities ``probs`` (batch, heads, queries, slots).

        ``visible`` (broadcastable to ``probs``, bool): keys each query may attend to (default: ``probs > 0``); the
        access threshold of a query is ``access_threshold / visible keys``. Query heads ``g * kv_heads ... `` are
        grouped as transformers' ``repeat_kv`` does (head ``h`` reads KV head ``h // (heads / kv_heads)``).
        """
        batch, heads, queries, slots = probs.shape
        if heads % num_kv_heads:
            raise ValueError(f"{heads} query heads do not divide into {num_kv_heads} KV heads.")
        groups = heads // num_kv_heads
        probs = probs.float()
        if visible is None:
            visible = probs > 0
        n_visible = visible.expand_as(probs).sum(-1, keepdim=True).clamp_min(1)  # (b, h, q, 1)
        accessed = (probs >= access_threshold / n_visible) & visible
        grouped = accessed.view(batch, num_kv_heads, groups, queries, slots).any(dim=2)  # (b, kv, q, slots)
        received = probs.view(batch, num_kv_heads, groups, queries, slots).sum(dim=(2, 3))
        query_index = torch.arange(queries, device=probs.device).view(1, 1, queries, 1)
        last = torch.where(grouped, query_index, torch.full_like(query_index, -1)).amax(dim=2)
        return cls(received=received, last_access=last, accesses=grouped.sum(dim=2), num_queries=queries)

    def __add__(self, other: AttentionStep) -> AttentionStep:
        """Two blocks of queries of the same pass (``other``'s queries come after ``self``'s)."""
        shifted = torch.where(other.last_access >= 0, other.last_access + self.num_queries, other.last_access)
        return AttentionStep(self.received + other.received, torch.maximum(self.last_access, shifted),
                             self.accesses + other.accesses, self.num_queries + other.num_queries)


@dataclass
class LayerState:
    """Per-slot state of one cache layer (all ``(batch, kv_heads, slots)``).

    ``positions`` int64: index of the token in the stream (0 for the first token the policy saw);
    ``attention`` float32: attention received since the token entered (:attr:`AttentionStep.received`, accumulated);
    ``last_access`` int64: stream index of the last query that accessed the token (its own index when it entered);
    ``accesses`` int64: number of queries that accessed it; ``experts`` int64: its top-1 routed expert
    (:data:`UNKNOWN_EXPERT` until recorded). ``next_position`` is the stream index of the next token.
    """

    positions: torch.Tensor
    attention: torch.Tensor
    last_access: torch.Tensor
    accesses: torch.Tensor
    experts: torch.Tensor
    next_position: int = 0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, device: torch.device | str) -> LayerState:
        def zeros(dtype):
            return torch.zeros(batch, kv_heads, 0, dtype=dtype, device=device)

        return cls(zeros(torch.int64), zeros(torch.float32), zeros(torch.int64), zeros(torch.int64),
                   zeros(torch.int64))

    @property
    def slots(self) -> int:
        return self.positions.shape[-1]

    def append(self, count: int) -> None:
        """``count`` new tokens at the end of the layer, the next ones of the stream."""
        if count <= 0:
            return
        b, h, _ = self.positions.shape
        device = self.positions.device
        new = torch.arange(self.next_position, self.next_position + count, device=device).expand(b, h, count)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.attention = torch.cat([self.attention, self.attention.new_zeros(b, h, count)], dim=-1)
        self.last_access = torch.cat([self.last_access, new], dim=-1)
        self.accesses = torch.cat([self.accesses, self.accesses.new_zeros(b, h, count)], dim=-1)
        self.experts = torch.cat([self.experts, self.experts.new_full((b, h, count), UNKNOWN_EXPERT)], dim=-1)
        self.next_position += count

    def observe(self, step: AttentionStep) -> None:
        """Add one pass's statistics; the layer holds ``step``'s slots, the last ``num_queries`` being the queries."""
        slots = step.received.shape[-1]
        if slots < self.slots or step.received.shape[:2] != self.positions.shape[:2]:
            raise ValueError(
                f"The attention statistics cover {tuple(step.received.shape)} keys but the policy tracks "
                f"{tuple(self.positions.shape)} slots: the cache was changed outside the policy (another press, or "
                "tokens removed by hand). Compress it with the policy only, or call policy.reset() with a new cache."
            )
        self.append(slots - self.slots)
        query_positions = self.positions[..., slots - step.num_queries:]  # (b, kv, q)
        accessed_at = query_positions.gather(-1, step.last_access.clamp_min(0))
        self.last_access = torch.where(step.last_access >= 0, torch.maximum(self.last_access, accessed_at),
                                       self.last_access)
        self.attention = self.attention + step.received
        self.accesses = self.accesses + step.accesses

    def keep(self, indices: torch.Tensor) -> None:
        """Keep the slots ``indices`` (batch, kv_heads, kept), in that order."""
        for name in ("positions", "attention", "last_access", "accesses", "experts"):
            setattr(self, name, getattr(self, name).gather(-1, indices))
