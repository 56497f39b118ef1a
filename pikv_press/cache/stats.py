"""What a KV cache really holds: token counts per layer and bytes of tensor storage."""

from __future__ import annotations

import torch
from transformers import Cache


def _layer_tensors(layer) -> list[torch.Tensor]:
    tensors = []
    for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
        value = getattr(layer, name, None)
        if isinstance(value, torch.Tensor):
            tensors.append(value)
    return tensors


def cache_nbytes(cache: Cache) -> int:
    """Bytes of storage the cache's tensors keep alive (each storage counted once).

    Storage, not ``numel * element_size``: a view that trims a tensor (kvpress's pipeline slices answers off the
    cache) still holds its whole storage, and quantized or packed tensors count at their real size.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for layer in cache.layers:
        for tensor in _layer_tensors(layer):
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen and storage.nbytes() > 0:
                seen.add(key)
                total += storage.nbytes()
    return total


def cache_lengths(cache: Cache) -> list[int]:
    """Tokens held by each layer (the key sequence length; 0 for an empty layer)."""
    lengths = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        lengths.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0)
    return lengths
