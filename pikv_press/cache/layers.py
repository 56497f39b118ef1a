"""One interface to a KV cache layer: read and write its keys and values, its length and its storage.

Presses, the prefill replay and the cache statistics never touch ``layer.keys`` directly; they go through
:func:`layer_access`, which returns a :class:`KVLayerAccess` for any supported layer:

* transformers' ``DynamicLayer`` and ``DynamicSlidingWindowLayer`` (keys and values are plain tensors);
* transformers' ``QuantizedLayer`` (quanto and HQQ backends): reading dequantizes the quantized part and appends the
  full-precision residual; writing quantizes everything, as kvpress does after a press;
* any layer that implements :class:`KVLayerAccess` itself (the sharded, packed low-bit and latent caches of
  pikv-press do).

Other layouts register an adapter with :func:`register_layer_adapter`. Shapes: keys ``(batch, kv_heads, seq,
key_dim)``, values ``(batch, kv_heads, seq, value_dim)``, in the cache's own layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, QuantizedLayer


class KVLayerAccess:
    """Read and write one cache layer's keys and values in full precision, its token count and its storage."""

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of every token the layer holds, in full precision, in the cache's own layout."""
        raise NotImplementedError

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the layer's contents by ``keys`` and ``values`` (for example the rows a press kept)."""
        raise NotImplementedError

    def seq_length(self) -> int:
        """Tokens the layer holds."""
        raise NotImplementedError

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor that keeps storage alive for this layer (packed, quantized, scales and zero points too)."""
        raise NotImplementedError


class DynamicLayerAccess(KVLayerAccess):
    """transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``: keys and values are plain tensors."""

    def __init__(self, layer: DynamicLayer):
        self.layer = layer

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.keys, self.layer.values

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer.keys, self.layer.values = keys, values

    def seq_length(self) -> int:
        return int(self.layer.get_seq_length()) if getattr(self.layer, "keys", None) is not None else 0

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        yield from tensors_in((getattr(self.layer, "keys", None), getattr(self.layer, "values", None)))


class QuantizedLayerAccess(KVLayerAccess):
    """transformers' ``QuantizedLayer`` (quanto or HQQ): a quantized part plus a full-precision residual."""

    def __init__(self, layer: QuantizedLayer):
        self.layer = layer

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layer
        keys = layer._dequantize(layer._quantized_keys)
        values = layer._dequantize(layer._quantized_values)
        if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2] > 0:
            keys = torch.cat([keys.to(layer.keys.dtype), layer.keys], dim=-2)
            values = torch.cat([values.to(layer.values.dtype), layer.values], dim=-2)
        return keys, values

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        layer = self.layer
        for name, tensor in (("keys", keys), ("values", values)):
            if tensor.numel() % layer.q_group_size:
                raise ValueError(
                    f"transformers' QuantizedCache quantizes a layer's whole {name} in groups of {layer.q_group_size} "
                    f"numbers, and the {tuple(tensor.shape)} kept here do not divide into them: keep a number of "
                    "tokens that does (another compression ratio) or use a cache with a smaller q_group_size."
                )
        # the HQQ backend reads the device and dtype of `layer.keys` when it quantizes: set them first
        layer.keys = torch.zeros(0, dtype=keys.dtype, device=keys.device)
        layer.values = torch.zeros(0, dtype=values.dtype, device=values.device)
        layer._quantized_keys = layer._quantize(keys.contiguous(), axis=layer.axis_key)
        layer._quantized_values = layer._quantize(values.contiguous(), axis=layer.axis_value)
        layer.cumulative_length = keys.shape[-2]

    def seq_length(self) -> int:
        return int(self.layer.get_seq_length())

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        layer = self.layer
        yield from tensors_in((layer.keys, layer.values, getattr(layer, "_quantized_keys", None),
                               getattr(layer, "_quantized_values", None)))


_ADAPTERS: dict[type, Callable[[Any], KVLayerAccess]] = {
    QuantizedLayer: QuantizedLayerAccess,
    DynamicLayer: DynamicLayerAccess,
}


def register_layer_adapter(layer_type: type, adapter: Callable[[Any], KVLayerAccess]) -> None:
    """Teach :func:`layer_access` a new cache-layer type (subclasses are matched through their MRO)."""
    _ADAPTERS[layer_type] = adapter


def layer_access(layer: Any) -> KVLayerAccess:
    """The :class:`KVLayerAccess` of a cache layer; ``TypeError`` naming the supported layouts otherwise."""
    if isinstance(layer, KVLayerAccess):
        return layer
    for cls in type(layer).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None:
            return adapter(layer)
    supported = ", ".join(sorted(t.__name__ for t in _ADAPTERS))
    raise TypeError(
        f"pikv-press cannot read cache layers of type {type(layer).__name__} (supported: {supported}, or a layer "
        "implementing pikv_press.cache.KVLayerAccess). Use a DynamicCache, or register an adapter with "
        "pikv_press.cache.register_layer_adapter."
    )


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Plain tensors inside ``obj``: tensors, tensor subclasses that wrap inner tensors (quanto's packed tensors,
    through ``__tensor_flatten__``), and tuples, lists and dicts of them (HQQ's ``(qtensor, meta)``)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from tensors_in(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from tensors_in(value)
