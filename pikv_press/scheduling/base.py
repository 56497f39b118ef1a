"""Bases of the decode-time policies: kvpress ``ScorerPress``es that keep the cache in arrival order.

* :class:`OrderedScorerPress`: a ``ScorerPress`` whose ``compress`` keeps the ``n_kept`` best-scored rows **in their
  original order** (kvpress's ``ScorerPress.compress`` stores them in score order). Repeated compression during
  decoding needs that: the first slots stay the first tokens (attention sinks), the last slots the most recent ones.
* :class:`AttentionStatsPolicy`: an ordered scorer that also keeps per-slot state (:class:`~.state.LayerState`) fed by
  the attention statistics of every forward pass (:mod:`pikv_press.scheduling.attention` gathers them inside the
  attention computation). The state follows the cache: it is gathered with the same indices as the keys.

They run where any kvpress ``ScorerPress`` runs: as a prefill press (``with policy(model):``), inside kvpress's
``DecodingPress`` (:class:`~pikv_press.scheduling.decoding.DecodingPolicyPress` also gathers the statistics), and in
:func:`~pikv_press.scheduling.prefill.chunked_prefill`. ``compression_ratio`` is set by those wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from pikv_press.presses.base import lexicographic_scores
from pikv_press.scheduling.state import AttentionStep, LayerState


def check_fraction(owner: object, name: str, value: float, upper_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= float(value) and (
        float(value) <= 1.0 if upper_inclusive else float(value) < 1.0)
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{type(owner).__name__}: {name} must be in {bound}, got {value!r}.")


def recent_mask(length: int, n_recent: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, 1, length)`` bool, true on the last ``n_recent`` slots."""
    mask = torch.zeros(1, 1, length, dtype=torch.bool, device=like.device)
    if n_recent > 0:
        mask[..., length - n_recent:] = True
    return mask


def top_in_order(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Ascending indices ``(..., n_kept)`` of the ``n_kept`` largest ``scores`` ``(..., slots)``, ties to the later
    slot (the more recent token)."""
    slot = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32)
    ranked = lexicographic_scores(scores, slot.expand_as(scores))
    return ranked.topk(n_kept, dim=-1).indices.sort(dim=-1).values


@dataclass
class OrderedScorerPress(ScorerPress):
    """A kvpress ``ScorerPress`` that keeps the best-scored rows in their original (arrival) order.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by ``DecodingPress`` and ``chunked_prefill``).
    """

    compression_ratio: float = 0.0

    def __post_init__(self):
        check_fraction(self, "compression_ratio", self.compression_ratio, upper_inclusive=False)

    def select(self, layer_idx: int, scores: torch.Tensor, n_kept: int) -> torch.Tensor:
        """Indices ``(batch, kv_heads, n_kept)`` of the rows kept, ascending: the ``n_kept`` best ``scores``."""
        return top_in_order(scores.float(), n_kept)

    def kept(self, layer_idx: int, indices: torch.Tensor) -> None:
        """Called with the kept indices of layer ``layer_idx`` after each compression (stateful policies)."""

    def compress(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 attentions: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        indices = self.select(module.layer_idx, scores, n_kept)
        self.kept(module.layer_idx, indices)
        keys = keys.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])).contiguous()
        values = values.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])).contiguous()
        return keys, values


@dataclass
class AttentionStatsPolicy(OrderedScorerPress):
    """An ordered scorer with per-slot state fed by attention statistics (see the module docstring).

    The state of each layer is created on the first forward pass the policy observes and follows the cache from then
    on; :meth:`reset` forgets it (a new sequence). Use one policy object per sequence being generated.

    Parameters
    ----------
    compression_ratio : fraction of the layer removed, in [0, 1) (set by the wrappers).
    recent_fraction : fraction of the kept slots reserved for the most recent tokens, in [0, 1].
    access_threshold : a query *accesses* a key when it gives it at least ``access_threshold`` times the uniform
        weight (``1 / keys it sees``), > 0 (used by LRU and LFU).
    """

    recent_fraction: float = 0.5
    access_threshold: float = 1.0
    states: dict[int, LayerState] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        check_fraction(self, "recent_fraction", self.recent_fraction)
        if not isinstance(self.access_threshold, (int, float)) or self.access_threshold <= 0:
            raise ValueError(f"{type(self).__name__}: access_threshold must be > 0, got {self.access_threshold!r}.")

    # -- state -----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every layer's state (start of a new sequence)."""
        self.states.clear()

    def observe(self, layer_idx: int, step: AttentionStep) -> None:
        """Record one forward pass's attention statistics of layer ``layer_idx``."""
        state = self.states.get(layer_idx)
        if state is None:
            b, h, _ = step.received.shape
            state = self.states[layer_idx] = LayerState.empty(b, h, step.received.device)
        state.observe(step)

    def state(self, layer_idx: int, slots: int | None = None) -> LayerState:
        """The state of layer ``layer_idx``; ``ValueError`` when it is missing or does not match ``slots``."""
        state = self.states.get(layer_idx)
        if state is None:
            raise ValueError(
                f"{type(self).__name__} has no attention statistics for layer {layer_idx}: it must see every forward "
                "pass. Use it as `with policy(model):`, inside pikv_press.scheduling.DecodingPolicyPress, through "
                "chunked_prefill, or inside `with track(model, policy):`."
            )
        if slots is not None and state.slots != slots:
            raise ValueError(
                f"{type(self).__name__} tracks {state.slots} slots of layer {layer_idx} but the cache holds {slots}: "
                "the cache was changed outside the policy. Use one policy per sequence (policy.reset() between)."
            )
        return state

    def kept(self, layer_idx: int, indices: torch.Tensor) -> None:
        self.state(layer_idx).keep(indices)

    def n_recent(self, n_kept: int) -> int:
        return int(round(self.recent_fraction * n_kept))

    # -- scoring ---------------------------------------------------------------------------------------------------
    def slot_scores(self, state: LayerState) -> torch.Tensor:
        """Scores ``(batch, kv_heads, slots)`` of the slots outside the recent window, higher = keep."""
        raise NotImplementedError

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        state = self.state(module.layer_idx, keys.shape[2])
        return self.slot_scores(state)

    def select(self, layer_idx: int, scores: torch.Tensor, n_kept: int) -> torch.Tensor:
        """The last ``n_recent(n_kept)`` slots, and the best-scored others up to ``n_kept`` (ascending indices)."""
        length = scores.shape[-1]
        protected = recent_mask(length, self.n_recent(n_kept), scores)
        scores = scores.float().masked_fill(protected, float("inf"))
        return top_in_order(scores, n_kept)

    def keep_indices(self, layer_idx: int, n_kept: int) -> torch.Tensor:
        """The slots of layer ``layer_idx`` the policy keeps when it keeps ``n_kept`` (ascending), from its state."""
        state = self.state(layer_idx)
        return self.select(layer_idx, self.slot_scores(state), n_kept)

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """As a prefill press: kvpress's hooks (MoE-aware), with the attention statistics gathered."""
        from pikv_press.compat import attach
        from pikv_press.scheduling.attention import track

        self.reset()
        with track(model, self), attach(self, model):
            yield
