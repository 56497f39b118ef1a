"""Shared machinery of pikv-press's compressed cache layers (packed low-bit, low-rank keys).

A :class:`CompressedLayer` keeps its keys and values in its own storage (named tensor attributes, batch first) and
offers three views of them:

* transformers' protocol (``update``, ``get_seq_length``, ``crop``, beam-search reordering, ...);
* pikv-press's cache-layer interface, through :class:`CompressedLayerAccess` (registered for every subclass with
  :func:`pikv_press.cache.register_layer_adapter`): ``read`` reconstructs full-precision keys and values, ``write``
  re-encodes the rows a press kept;
* kvpress's direct attribute access: ``layer.keys`` / ``layer.values`` read the reconstructed tensors, and assigning
  both (keys first, then values, as kvpress's presses with their own hook and its pipeline do) re-encodes them. An
  assignment that is a prefix of what the layer holds (the pipeline trimming an answer off the cache) crops the
  storage instead, exactly.

Every method replaces tensors instead of writing into them, so :func:`pikv_press.answer.save_cache` (a shallow copy of
the layer's attributes) restores a layer exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from pikv_press.cache.layers import KVLayerAccess, register_layer_adapter


class CompressedLayer(CacheLayerMixin):
    """Base of layers that store keys and values in an encoded form; subclasses implement the ``_`` methods."""

    is_sliding = False
    is_compileable = False
    #: names of the tensor attributes holding the layer's storage (batch on dimension 0); ``None`` when empty
    _storage_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._pending_keys: torch.Tensor | None = None
        self._pending_values: torch.Tensor | None = None
        for name in self._storage_names:
            setattr(self, name, None)
        self._length = 0

    # -- what subclasses implement --------------------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens; return the keys and values attention reads for this step."""
        raise NotImplementedError

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values of every stored token."""
        raise NotImplementedError

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents by ``keys`` and ``values`` (re-encoded)."""
        raise NotImplementedError

    def _crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (``0 < length < self._length``)."""
        raise NotImplementedError

    # -- transformers' layer protocol ------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states`` / ``value_states`` ``(batch, kv_heads, new, dim)``; return what attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._append(key_states, value_states)
        self._length += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self._length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._length + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def storage(self) -> Iterator[torch.Tensor]:
        """The tensors that hold this layer's contents."""
        for name in self._storage_names:
            tensor = getattr(self, name)
            if tensor is not None:
                yield tensor

    def _map_storage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in self._storage_names:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reset(self) -> None:
        for name in self._storage_names:
            setattr(self, name, None)
        self._length = 0
        self.is_initialized = False

    def offload(self) -> None:
        self._map_storage(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_storage(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_storage(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_storage(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_storage(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many from the end), as ``DynamicLayer.crop``."""
        if max_length < 0:
            max_length = self._length + max_length
        if max_length >= self._length:
            return
        if max_length <= 0:
            self.reset()
            return
        self._crop(max_length)
        self._length = max_length

    # -- full-precision access (presses) ---------------------------------------------------------------------------
    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed ``(keys, values)`` of every token the layer holds."""
        if self._length == 0:
            raise ValueError(f"This {type(self).__name__} is empty: run a forward pass with the cache first.")
        return self._read()

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the layer's contents by ``keys`` and ``values`` ``(batch, kv_heads, seq, dim)``, re-encoded."""
        if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"{type(self).__name__}.write takes keys and values of shape (batch, kv_heads, seq, dim) with the "
                f"same first three sizes, got {tuple(keys.shape)} and {tuple(values.shape)}."
            )
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        if keys.shape[-2] == 0:
            self.reset()
            return
        self._write(keys, values)
        self._length = keys.shape[-2]

    # -- kvpress's direct attribute access -----------------------------------------------------------------------
    def _get_pending_or_read(self, index: int) -> torch.Tensor | None:
        pending = getattr(self, ("_pending_keys", "_pending_values")[index], None)
        if pending is not None:
            return pending
        return self._read()[index] if getattr(self, "_length", 0) else None

    def _set_pending(self, index: int, tensor: torch.Tensor | None) -> None:
        if tensor is None:  # CacheLayerMixin.__init__ sets both to None
            return
        setattr(self, ("_pending_keys", "_pending_values")[index], tensor)
        self._assign_pending()

    keys = property(lambda self: self._get_pending_or_read(0), lambda self, t: self._set_pending(0, t),
                    doc="Reconstructed keys (kvpress reads them); assign keys then values to replace the contents.")
    values = property(lambda self: self._get_pending_or_read(1), lambda self, t: self._set_pending(1, t),
                      doc="Reconstructed values; see ``keys``.")

    def _assign_pending(self) -> None:
        keys, values = self._pending_keys, self._pending_values
        if keys is None or values is None:
            return
        self._pending_keys = self._pending_values = None
        length = keys.shape[-2]
        if 0 < length <= self._length:
            current_keys, current_values = self._read()
            if torch.equal(current_keys[..., :length, :], keys) and torch.equal(current_values[..., :length, :],
                                                                                values):
                self.crop(length)  # trimming an answer off the cache: exact
                return
        self.write(keys, values)


class CompressedLayerAccess(KVLayerAccess):
    """The cache-layer interface of a :class:`CompressedLayer` (registered for every subclass)."""

    def __init__(self, layer: CompressedLayer):
        self.layer = layer

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.read()

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer.write(keys, values)

    def seq_length(self) -> int:
        return self.layer.get_seq_length()

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        return self.layer.storage()


register_layer_adapter(CompressedLayer, CompressedLayerAccess)
