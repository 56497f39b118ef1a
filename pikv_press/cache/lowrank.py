"""Low-rank key cache: keys stored as coefficients on their top singular directions, per layer and KV head.

>>> cache = LowRankKeyCache(rank=32, config=model.config)          # or energy=0.99, or key_budget=0.5
>>> model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

What is stored, per layer and ``(batch, kv head)`` (:class:`LowRankKeyLayer`):

* a basis ``P`` of ``r`` orthonormal key directions ``(head_dim, r)``: the top-``r`` right singular vectors of the
  keys of the **first** ``update`` of the layer (the prefill: the context being compressed), computed in float64 as
  the eigenvectors of ``K^T K`` (so that ``r`` may exceed the number of prefill tokens);
* the coefficients ``K P`` ``(seq, r)`` of every key: the prefill's and those of **new decoding tokens, projected on
  the same basis** (the basis is not refitted; keys of later tokens outside its span lose that part);
* the values unchanged.

Keys read back as ``k_hat = (k P) P^T``, the orthogonal projection of ``k`` on the basis, and ``q . k_hat =
(q P) . (k P)``. Two attention paths:

* ``reduced_attention=False`` (default, any attention implementation): ``update`` reconstructs full-width keys in
  torch and hands them to the model's attention, which then costs what it costs with the full cache (the saving is
  in storage). A forward pass sees its own new tokens unprojected (as the packed cache does); later passes read
  their projection.
* ``reduced_attention=True``: ``update`` returns the coefficients ``(batch, kv_heads, seq, r)`` of every token, the
  new ones included, with the basis attached, and the model must run the attention of
  :mod:`pikv_press.attention.lowrank` (``attn_implementation="pikv_lowrank"`` after
  ``register_lowrank_attention()``), which projects the queries and computes the scores over ``r`` numbers. Any
  other attention implementation fails on the key width. Not for models with attention sinks.

The rank ``r`` (the same for every head of a layer, so that the storage is one tensor), from exactly one of:

* ``rank``: ``1 <= rank <= head_dim``;
* ``energy`` in ``(0, 1]``: the smallest ``r`` whose directions hold at least that fraction of the prefill keys'
  squared norm (``sum of the top r eigenvalues / trace``), the largest such ``r`` over the layer's heads;
* ``key_budget`` in ``(0, 1]``: the fraction of the keys' bytes per token to keep, ``r = max(1, floor(key_budget *
  head_dim))``.

Bytes per layer and ``(batch, kv head)``, with ``T`` tokens, width ``D``, value width ``Dv`` and an ``s``-byte dtype::

    T * r * s  +  D * r * s  +  T * Dv * s        # coefficients, basis, values

Presses read the reconstructed keys and write the kept rows back as their coefficients on the same basis (exact up
to rounding: kept keys lie in its span). Compare kvpress's ``ThinKPress``, which zeroes key channels in place and
saves no bytes.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers import Cache, PretrainedConfig

from pikv_press.attention.lowrank import attach_basis
from pikv_press.cache._compressed import CompressedLayer


def _check_choice(rank: int | None, energy: float | None, key_budget: float | None) -> None:
    given = [name for name, value in (("rank", rank), ("energy", energy), ("key_budget", key_budget))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of rank, energy or key_budget to the low-rank key cache (got "
                         f"{', '.join(given) or 'none'}).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (at most head_dim), got {rank!r}.")
    for name, value in (("energy", energy), ("key_budget", key_budget)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}.")


class LowRankKeyLayer(CompressedLayer):
    """One layer of a :class:`LowRankKeyCache` (see the module docstring)."""

    _storage_names = ("_coefficients", "_basis", "_values")

    def __init__(self, rank: int | None = None, energy: float | None = None, key_budget: float | None = None,
                 reduced_attention: bool = False):
        _check_choice(rank, energy, key_budget)
        self.requested_rank, self.energy, self.key_budget = rank, energy, key_budget
        self.reduced_attention = bool(reduced_attention)
        super().__init__()

    @property
    def rank(self) -> int | None:
        """Directions kept (``None`` before the first update)."""
        return None if self._basis is None else self._basis.shape[-1]

    def _fit(self, keys: torch.Tensor) -> None:
        """The basis from the keys ``(batch, kv_heads, seq, D)`` of the first update."""
        width = keys.shape[-1]
        if self.requested_rank is not None and self.requested_rank > width:
            raise ValueError(f"rank={self.requested_rank} exceeds the key head dimension {width}: choose a rank "
                             f"between 1 and {width}.")
        flat = keys.double()
        gram = flat.transpose(-1, -2) @ flat  # (batch, kv_heads, D, D)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(-1).clamp_min(0), eigenvectors.flip(-1)
        if self.requested_rank is not None:
            rank = self.requested_rank
        elif self.key_budget is not None:
            rank = max(1, math.floor(self.key_budget * width))
        else:
            share = eigenvalues.cumsum(-1) / eigenvalues.sum(-1, keepdim=True).clamp_min(1e-300)
            # directions needed per head: 1 + those whose cumulative share is still below the threshold
            needed = (share < self.energy - 1e-12).sum(-1) + 1
            rank = int(needed.max().clamp(max=width))
        self._basis = eigenvectors[..., :rank].to(keys.dtype).contiguous()

    def _project(self, keys: torch.Tensor) -> torch.Tensor:
        return (keys @ self._basis).contiguous()

    def _reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        return coefficients @ self._basis.transpose(-1, -2)

    # -- CompressedLayer ------------------------------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._basis is None:
            self._fit(key_states)
        if key_states.shape[-1] != self._basis.shape[-2]:
            raise ValueError(f"This low-rank key layer was fitted on keys of width {self._basis.shape[-2]}, got "
                             f"{key_states.shape[-1]}.")
        new = self._project(key_states)
        if self.reduced_attention:
            self._coefficients = new if self._coefficients is None else torch.cat([self._coefficients, new], dim=-2)
            self._values = (value_states.clone(memory_format=torch.contiguous_format) if self._values is None
                            else torch.cat([self._values, value_states], dim=-2))
            return attach_basis(self._coefficients[..., :, :], self._basis), self._values
        if self._coefficients is None:
            keys_out, values_out = key_states, value_states
            self._coefficients = new
            self._values = value_states.clone(memory_format=torch.contiguous_format)
        else:
            keys_out = torch.cat([self._reconstruct(self._coefficients), key_states], dim=-2)
            self._coefficients = torch.cat([self._coefficients, new], dim=-2)
            self._values = torch.cat([self._values, value_states], dim=-2)
            values_out = self._values
        return keys_out, values_out

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reconstruct(self._coefficients), self._values

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._basis is None:
            self._fit(keys)
        if keys.shape[-1] != self._basis.shape[-2]:
            raise ValueError(
                f"This low-rank key layer holds keys of width {self._basis.shape[-2]}, but a press wrote keys of "
                f"width {keys.shape[-1]}: presses that change the head dimension cannot run on it; use a "
                "DynamicCache with them."
            )
        self._coefficients = self._project(keys.to(self._basis.dtype))
        self._values = values.to(self._basis.dtype).clone(memory_format=torch.contiguous_format)

    def _crop(self, length: int) -> None:
        self._coefficients = self._coefficients[..., :length, :].clone()
        self._values = self._values[..., :length, :].clone()

    def reset(self) -> None:
        super().reset()  # the basis goes too: the next prefill fits a new one

    def __repr__(self) -> str:
        return f"LowRankKeyLayer(rank={self.rank}, tokens={self._length})"


class LowRankKeyCache(Cache):
    """Keys stored on their top singular directions per layer and KV head, values unchanged (see the module
    docstring). Give exactly one of ``rank``, ``energy`` or ``key_budget``; ``config`` as for
    :class:`~pikv_press.cache.packed.PackedKVCache`; ``reduced_attention``: attention over the coefficients (needs
    ``attn_implementation="pikv_lowrank"``, see the module docstring)."""

    def __init__(self, rank: int | None = None, energy: float | None = None, key_budget: float | None = None,
                 config: PretrainedConfig | None = None, reduced_attention: bool = False):
        make_layer = functools.partial(LowRankKeyLayer, rank, energy, key_budget, reduced_attention)
        make_layer()  # validates now
        if config is None:
            super().__init__(layer_class_to_replicate=make_layer)
        else:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[make_layer() for _ in range(num_layers)])

    @property
    def ranks(self) -> list[int | None]:
        """The rank of each layer (``None`` for layers not yet filled)."""
        return [layer.rank for layer in self.layers]
