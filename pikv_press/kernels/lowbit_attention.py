"""Decode attention over a low-bit KV cache in the agreed format (:mod:`pikv_press.kernels.lowbit`, KIVI layout).

Keys are quantized per channel in groups of ``key_group_size`` tokens (``axis=-2``), values per token in groups of
``value_group_size`` channels (``axis=-1``), both packed along the last dimension into ``uint8``. This module gives
the attention of queries over such a cache, ``(out, lse)`` exactly as
:func:`pikv_press.kernels.sharded_attention.partial_attention` returns them, so a quantized block merges with a
full-precision residual (KIVI's recent tokens) through ``merge_partials``.

* torch reference (the CPU path and the oracle): :func:`~pikv_press.kernels.lowbit.dequantize` both tensors (in the
  scales' dtype), then ``partial_attention``;
* Triton (:mod:`pikv_press.kernels.lowbit_triton`): split-K decode attention that unpacks and dequantizes key and
  value tiles in registers, never materialising full-precision keys or values.

Not implemented: other group axes (the kernel and this function take the KIVI layout only), a quantized residual.
"""

from __future__ import annotations

import torch

from pikv_press.kernels._dispatch import triton_module, use_triton
from pikv_press.kernels.lowbit import dequantize, packed_length
from pikv_press.kernels.sharded_attention import partial_attention

__all__ = ["quantized_attention"]


def _check(query, key_packed, key_scale, key_zero, value_packed, value_scale, value_zero, bits, value_bits,
           key_group_size, value_group_size, value_dim) -> None:
    batch, _, _, dim = query.shape
    if key_packed.dim() != 4 or value_packed.dim() != 4:
        raise ValueError(f"packed keys and values must be (batch, kv_heads, seq, bytes), got "
                         f"{tuple(key_packed.shape)} and {tuple(value_packed.shape)}.")
    _, kv_heads, seq, _ = key_packed.shape
    expected = {
        "key_packed": (key_packed, (batch, kv_heads, seq, packed_length(dim, bits))),
        "value_packed": (value_packed, (batch, kv_heads, seq, packed_length(value_dim, value_bits))),
        "key_scale": (key_scale, (batch, kv_heads, seq // key_group_size, dim)),
        "key_zero": (key_zero, (batch, kv_heads, seq // key_group_size, dim)),
        "value_scale": (value_scale, (batch, kv_heads, seq, value_dim // value_group_size)),
        "value_zero": (value_zero, (batch, kv_heads, seq, value_dim // value_group_size)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for keys grouped by "
                             f"{key_group_size} tokens ({bits} bits) and values by {value_group_size} channels "
                             f"({value_bits} bits) (KIVI layout of pikv_press.kernels.lowbit).")
    if seq % key_group_size or value_dim % value_group_size:
        raise ValueError(f"groups must tile: seq {seq} by key_group_size {key_group_size}, value_dim {value_dim} by "
                         f"value_group_size {value_group_size}.")
    if key_scale.dtype != value_scale.dtype:
        raise ValueError(f"key scales ({key_scale.dtype}) and value scales ({value_scale.dtype}) must share a dtype.")


def quantized_attention(
    query: torch.Tensor,
    key_packed: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor,
    value_packed: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
    *,
    bits: int,
    key_group_size: int,
    value_group_size: int,
    scaling: float,
    value_bits: int | None = None,
    value_dim: int | None = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``(batch, q_heads, q_len, head_dim)`` over packed keys and values.

    Args:
        key_packed, key_scale, key_zero: ``lowbit.quantize(keys, bits, key_group_size, axis=-2)`` of keys
            ``(batch, kv_heads, seq, head_dim)``.
        value_packed, value_scale, value_zero: ``lowbit.quantize(values, value_bits, value_group_size, axis=-1)``.
        value_bits: defaults to ``bits``; value_dim: the values' width, defaults to ``value_scale.shape[-1] *
            value_group_size``.
        scaling, mask: as :func:`~pikv_press.kernels.sharded_attention.partial_attention`.
        backend: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns ``(out, lse)`` as ``partial_attention`` over the dequantized cache (dequantized in the scales' dtype).
    """
    value_bits = bits if value_bits is None else value_bits
    value_dim = value_scale.shape[-1] * value_group_size if value_dim is None else value_dim
    if query.dim() != 4:
        raise ValueError(f"query must be (batch, q_heads, q_len, head_dim), got {tuple(query.shape)}.")
    _check(query, key_packed, key_scale, key_zero, value_packed, value_scale, value_zero, bits, value_bits,
           key_group_size, value_group_size, value_dim)
    dim = query.shape[-1]
    if use_triton(query, key_packed, value_packed, key_scale, value_scale, backend=backend,
                  supported=key_scale.dtype in (torch.float32, torch.float16, torch.bfloat16),
                  why_unsupported=f"scales of dtype {key_scale.dtype}"):
        return triton_module("lowbit_triton").quantized_attention(
            query, key_packed, key_scale, key_zero, value_packed, value_scale, value_zero, bits=bits,
            value_bits=value_bits, key_group_size=key_group_size, value_group_size=value_group_size, head_dim=dim,
            value_dim=value_dim, scaling=scaling, mask=mask)
    keys = dequantize(key_packed, key_scale, key_zero, bits, key_group_size, -2, dim)
    values = dequantize(value_packed, value_scale, value_zero, value_bits, value_group_size, -1, value_dim)
    return partial_attention(query, keys, values, scaling, mask, backend="torch")
