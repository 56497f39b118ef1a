"""Packed low-bit KV cache following KIVI (Liu et al., 2024, https://arxiv.org/abs/2402.02750).

>>> cache = PackedKVCache(bits=4, group_size=32, residual_length=128, config=model.config)
>>> model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
>>> cache_nbytes(cache)  # packed codes + scales + zero points + the full-precision window, from tensor storage

Every layer (:class:`PackedKVLayer`) stores

* **keys quantized per channel**: groups of ``group_size`` consecutive *tokens* of one channel share a scale and a
  zero point (KIVI's per-channel key quantization, which follows the outlier channels of keys);
* **values quantized per token**: groups of ``value_group_size`` consecutive channels of one token;
* codes packed into ``uint8`` (8 bits: one value a byte, 4 bits: two, 2 bits: four), in the format of
  :mod:`pikv_press.kernels.lowbit` (asymmetric min/max; scales and zero points in the model's dtype);
* a **full-precision window** of the most recent tokens: new tokens enter it, and once it holds at least
  ``residual_length + group_size`` tokens its oldest ``group_size``-token groups are quantized (keys and values move
  together, so after ``T`` tokens ``group_size * floor(max(0, T - residual_length) / group_size)`` are quantized and
  the rest, between ``residual_length`` and ``residual_length + group_size - 1`` tokens once ``T`` is large enough,
  are kept in full precision).

Bytes per ``(batch, kv head)`` with ``Tq`` quantized tokens, ``R`` window tokens, key and value widths ``D`` and
``Dv`` and an ``s``-byte model dtype::

    Tq * ceil(D * bits / 8) + 2 * (Tq / group_size) * D * s           # key codes, key scales + zero points
    + Tq * ceil(Dv * bits / 8) + 2 * Tq * (Dv / value_group_size) * s  # value codes, value scales + zero points
    + R * (D + Dv) * s                                                 # full-precision window

Attention: ``update`` returns the dequantized stored tokens followed by the full-precision window and the new tokens
(a forward pass sees its own tokens unquantized, as KIVI's prefill does); any attention implementation reads them.
This is the torch path: it materializes the dequantized keys and values of a layer during its attention. A fused
dequantizing attention kernel is issue 14.

Presses: the layer is read and written through :func:`pikv_press.cache.layer_access` (an adapter is registered), so
every eviction press that pikv-press runs (kvpress presses through :func:`pikv_press.compat.MoEAware`, the routing
presses, :class:`~pikv_press.PiKVPress`, :class:`~pikv_press.AdaKVExpectedAttentionPress`, the prefill
replay) works on it. A press reads the dequantized keys and
values and its kept rows are **re-quantized**: values per token exactly as before up to rounding of the scale (a row
keeps its group), keys in new groups of ``group_size`` kept tokens, i.e. a second quantization whose error adds to the
first (each step is within half a quantization step of its input). The rows kept are stored in the order the press
returns them; the window then holds the last ``residual_length``-odd of them, which after a press are not necessarily
the most recent tokens (new decoded tokens are). kvpress's own attribute access (``layer.keys = ...``) also works: see
:mod:`pikv_press.cache._compressed`.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers import Cache, PretrainedConfig

from pikv_press.cache._compressed import CompressedLayer
from pikv_press.kernels.lowbit import SUPPORTED_BITS, dequantize, quantize

DEFAULT_GROUP_SIZE = 32
DEFAULT_RESIDUAL_LENGTH = 128


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


class PackedKVLayer(CompressedLayer):
    """One layer of a :class:`PackedKVCache` (see the module docstring for the layout and the byte count)."""

    _storage_names = ("_key_codes", "_key_scale", "_key_zero", "_value_codes", "_value_scale", "_value_zero",
                      "_window_keys", "_window_values")

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                 residual_length: int = DEFAULT_RESIDUAL_LENGTH, value_group_size: int | None = None):
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported by the packed cache: choose one of {SUPPORTED_BITS} "
                             "(8: one value a byte, 4: two, 2: four).")
        self.bits = bits
        self.group_size = _positive_int("group_size", group_size)
        self.residual_length = _positive_int("residual_length", residual_length, minimum=0)
        self.value_group_size = _positive_int("value_group_size", value_group_size or group_size)
        self.key_dim: int | None = None
        self.value_dim: int | None = None
        super().__init__()

    @property
    def quantized_length(self) -> int:
        """Tokens held in packed storage (a multiple of ``group_size``)."""
        return 0 if self._key_codes is None else self._key_codes.shape[-2]

    @property
    def window_length(self) -> int:
        """Tokens held in full precision."""
        return 0 if self._window_keys is None else self._window_keys.shape[-2]

    # -- encoding -------------------------------------------------------------------------------------------------
    def _check_widths(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.key_dim is None:
            if values.shape[-1] % self.value_group_size:
                raise ValueError(
                    f"value_group_size={self.value_group_size} does not divide the value head dimension "
                    f"{values.shape[-1]}: values are quantized per token in groups of channels. Choose a group size "
                    f"that divides {values.shape[-1]} (value_group_size, or group_size when it is not given)."
                )
            self.key_dim, self.value_dim = keys.shape[-1], values.shape[-1]
        elif (keys.shape[-1], values.shape[-1]) != (self.key_dim, self.value_dim):
            raise ValueError(
                f"This packed cache layer holds keys of width {self.key_dim} and values of width {self.value_dim}, "
                f"but was given {keys.shape[-1]} and {values.shape[-1]}: a press that changes the head dimension "
                "(rather than dropping tokens) cannot run on the packed cache; use a DynamicCache with it."
            )

    def _flush(self) -> None:
        """Quantize the oldest whole groups of the window while it holds ``residual_length + group_size`` or more."""
        excess = self.window_length - self.residual_length
        n = (excess // self.group_size) * self.group_size if excess >= self.group_size else 0
        if n == 0:
            return
        keys, values = self._window_keys[..., :n, :], self._window_values[..., :n, :]
        key_codes, key_scale, key_zero = quantize(keys, self.bits, self.group_size, axis=-2)
        value_codes, value_scale, value_zero = quantize(values, self.bits, self.value_group_size, axis=-1)
        if self._key_codes is None:
            self._key_codes, self._key_scale, self._key_zero = key_codes, key_scale, key_zero
            self._value_codes, self._value_scale, self._value_zero = value_codes, value_scale, value_zero
        else:
            self._key_codes = torch.cat([self._key_codes, key_codes], dim=-2)
            self._key_scale = torch.cat([self._key_scale, key_scale], dim=-2)
            self._key_zero = torch.cat([self._key_zero, key_zero], dim=-2)
            self._value_codes = torch.cat([self._value_codes, value_codes], dim=-2)
            self._value_scale = torch.cat([self._value_scale, value_scale], dim=-2)
            self._value_zero = torch.cat([self._value_zero, value_zero], dim=-2)
        # clones: a slice would keep the whole old window's storage alive
        self._window_keys = self._window_keys[..., n:, :].clone()
        self._window_values = self._window_values[..., n:, :].clone()

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._key_codes is None:
            return None
        keys = dequantize(self._key_codes, self._key_scale, self._key_zero, self.bits, self.group_size, -2,
                          self.key_dim, self.dtype)
        values = dequantize(self._value_codes, self._value_scale, self._value_zero, self.bits,
                            self.value_group_size, -1, self.value_dim, self.dtype)
        return keys, values

    def _with_quantized(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self._dequantized()
        if stored is None:
            return keys, values
        return torch.cat([stored[0], keys], dim=-2), torch.cat([stored[1], values], dim=-2)

    # -- CompressedLayer ------------------------------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_widths(key_states, value_states)
        if self._window_keys is None:
            window_keys = key_states.clone(memory_format=torch.contiguous_format)
            window_values = value_states.clone(memory_format=torch.contiguous_format)
        else:
            window_keys = torch.cat([self._window_keys, key_states], dim=-2)
            window_values = torch.cat([self._window_values, value_states], dim=-2)
        out = self._with_quantized(window_keys, window_values)
        self._window_keys, self._window_values = window_keys, window_values
        self._flush()
        return out

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._window_keys is None:
            window_keys = window_values = None
        else:
            window_keys, window_values = self._window_keys, self._window_values
        stored = self._dequantized()
        if stored is None:
            return window_keys, window_values
        if window_keys is None:
            return stored
        return torch.cat([stored[0], window_keys], dim=-2), torch.cat([stored[1], window_values], dim=-2)

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._check_widths(keys, values)
        for name in self._storage_names:
            setattr(self, name, None)
        self._window_keys = keys.to(self.dtype).clone(memory_format=torch.contiguous_format)
        self._window_values = values.to(self.dtype).clone(memory_format=torch.contiguous_format)
        self._flush()

    def _crop(self, length: int) -> None:
        quantized = self.quantized_length
        if length >= quantized:
            self._window_keys = self._window_keys[..., : length - quantized, :].clone()
            self._window_values = self._window_values[..., : length - quantized, :].clone()
            return
        groups = length // self.group_size
        kept = groups * self.group_size
        keys, values = self._dequantized()
        # the tokens of the cut group come back to the window as they were dequantized (what attention read)
        self._window_keys = keys[..., kept:length, :].clone()
        self._window_values = values[..., kept:length, :].clone()
        if kept == 0:
            for name in self._storage_names[:6]:
                setattr(self, name, None)
            return
        self._key_codes = self._key_codes[..., :kept, :].clone()
        self._key_scale = self._key_scale[..., :groups, :].clone()
        self._key_zero = self._key_zero[..., :groups, :].clone()
        self._value_codes = self._value_codes[..., :kept, :].clone()
        self._value_scale = self._value_scale[..., :kept, :].clone()
        self._value_zero = self._value_zero[..., :kept, :].clone()

    def __repr__(self) -> str:
        return (f"PackedKVLayer(bits={self.bits}, group_size={self.group_size}, value_group_size="
                f"{self.value_group_size}, residual_length={self.residual_length}, quantized={self.quantized_length}, "
                f"window={self.window_length})")


class PackedKVCache(Cache):
    """KIVI-style packed low-bit KV cache: int8, int4 or int2 codes plus scales and zero points, and a full-precision
    window of recent tokens (see the module docstring).

    Args:
        bits: 2, 4 or 8.
        group_size: tokens per key quantization group (per channel), and channels per value group unless
            ``value_group_size`` is given. KIVI uses 32.
        residual_length: tokens kept in full precision (at least this many, fewer than ``residual_length +
            group_size``, once the cache holds that many). KIVI uses 128 (its ``R``); 0 keeps only the tokens that do
            not fill a key group.
        value_group_size: channels per value group; must divide the value head dimension.
        config: the model's config; with it the cache has one layer per decoder layer from the start, without it
            layers are added as the model updates them.
    """

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                 residual_length: int = DEFAULT_RESIDUAL_LENGTH, value_group_size: int | None = None,
                 config: PretrainedConfig | None = None):
        make_layer = functools.partial(PackedKVLayer, bits, group_size, residual_length, value_group_size)
        make_layer()  # validates the arguments now rather than at the first forward pass
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.value_group_size = value_group_size or group_size
        if config is None:
            super().__init__(layer_class_to_replicate=make_layer)
        else:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[make_layer() for _ in range(num_layers)])


def value_width(config: PretrainedConfig) -> int:
    """Width of the values a model's attention caches: ``v_head_dim`` where the config has it (latent attention),
    else ``head_dim``, else ``hidden_size // num_attention_heads``."""
    config = config.get_text_config(decoder=True)
    for name in ("v_head_dim", "head_dim"):
        width = getattr(config, name, None)
        if width:
            return int(width)
    return config.hidden_size // config.num_attention_heads


def packed_cache_factory(bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                         residual_length: int = DEFAULT_RESIDUAL_LENGTH):
    """A factory for :func:`pikv_press.cache.register_cache`: ``PackedKVCache(bits, group_size, residual_length)``
    with value groups of ``gcd(group_size, value width)`` channels (the largest group that tiles the value width:
    ``group_size`` itself for head dimensions that are multiples of it)."""

    def factory(config: PretrainedConfig) -> PackedKVCache:
        return PackedKVCache(bits, group_size, residual_length, math.gcd(group_size, value_width(config)), config)

    return factory
