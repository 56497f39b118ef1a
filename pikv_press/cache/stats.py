"""What a KV cache really holds: token counts per layer and bytes of tensor storage."""

from __future__ import annotations

from transformers import Cache

from pikv_press.cache.layers import layer_access


def cache_nbytes(cache: Cache) -> int:
    """Bytes of storage the cache's tensors keep alive (each storage counted once).

    Storage, not ``numel * element_size``: a view that trims a tensor (kvpress's pipeline slices answers off the
    cache) still holds its whole storage, and quantized or packed tensors count at their real size, with their scales
    and zero points (quanto's packed tensors, HQQ's ``(qtensor, meta)``). Layers are read through
    :func:`pikv_press.cache.layer_access`.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for layer in cache.layers:
        for tensor in layer_access(layer).storage_tensors():
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen and storage.nbytes() > 0:
                seen.add(key)
                total += storage.nbytes()
    return total


def cache_lengths(cache: Cache) -> list[int]:
    """Tokens held by each layer (quantized layers count their quantized part and their residual)."""
    return [layer_access(layer).seq_length() for layer in cache.layers]
