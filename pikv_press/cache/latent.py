"""The latent cache of multi-head latent attention (DeepSeek-V2/V3): the compressed latent instead of per-head K/V.

transformers 5.2 runs DeepSeek-V2/V3 attention by decompressing every token's latent into per-head keys and values and
caching those: ``num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)`` numbers per token and layer (the
shared rotary key is stored once per head). The model needs only the latent ``c`` (``kv_lora_rank`` numbers, after
``kv_a_layernorm``) and the rotary key (``qk_rope_head_dim`` numbers, after RoPE): for DeepSeek-V2-Lite in bf16 that
is 30.4 KiB per token instead of 270 KiB (8.9x), losslessly, since keys and values are linear in ``c``.

* :class:`LatentCache` (``make_cache("latent", config)``): a ``DynamicCache`` whose layers are :class:`LatentLayer`.
  A layer keeps the latent in ``keys`` ``(batch, 1, seq, kv_lora_rank)`` and the rotary key in ``values``
  ``(batch, 1, seq, qk_rope_head_dim)`` (aliases :attr:`LatentLayer.latent` / :attr:`LatentLayer.rope_key`), so that
  transformers' cropping, beam reordering and mask sizing work unchanged. The model must run with
  :func:`pikv_press.attention.latent.enable_latent_attention`, which computes attention from the latent with absorbed
  projections; the stock attention writing per-head keys into a latent layer gets a ``ValueError`` saying so.
* :class:`LatentLayerAccess` (registered for :class:`LatentLayer` with
  :func:`~pikv_press.cache.register_layer_adapter`): presses read per-head keys and values *reconstructed* through
  ``kv_b_proj`` (the very tensors the stock cache would hold, in its layout) and score them as on the stock cache.
  Writing back keeps rows *of the latent*: each kept row is identified exactly (bit for bit) among the rows read, and
  the latent and rotary key of those tokens are gathered. The latent stores one set of tokens per layer shared by all
  heads, so a press that keeps different tokens in different heads (KnormPress, SnapKV, ...) cannot be represented
  exactly: the layer then keeps the ``n`` tokens kept by the most heads (ties: the higher Borda count of the heads'
  kept orders, in which kvpress lists rows best first; then the earlier token). A press that keeps the same tokens
  in every head (StreamingLLM, or any press whose scores are shared by the heads) gives exactly the stock cache's
  result. Kept tokens are stored in position order. Not supported: presses with their own forward hook
  (``DecodingPress``, ...), which read per-head tensors from the cache directly (compat raises), head-wise masking
  (AdaKV: it masks per head and writes nothing), the prefill replay (it refills caches with per-head keys).
* :func:`latent_bytes_per_token`: stored bytes per token of the stock cache and of the latent cache, from a config.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from pikv_press.cache.factory import register_cache
from pikv_press.cache.layers import KVLayerAccess, register_layer_adapter, tensors_in
from pikv_press.moe.families import MOE_FAMILIES, AttentionKind, family_for_config


def require_latent_attention(config: PretrainedConfig) -> PretrainedConfig:
    """The text config of a model with multi-head latent attention; ``ValueError`` saying what to do otherwise.

    Detection goes through the family registry (:class:`~pikv_press.moe.families.AttentionKind` ``MLA``).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = family_for_config(text_config)
    if family.attention is not AttentionKind.MLA:
        mla = ", ".join(spec.name for spec in MOE_FAMILIES if spec.attention is AttentionKind.MLA)
        raise ValueError(
            f"The latent cache stores the compressed latent of multi-head latent attention, which {family.name} "
            f"models do not have (families with it: {mla}). Use make_cache('dynamic') or another cache of "
            "pikv_press.make_cache for this model."
        )
    return text_config


_SHARED_ATTRS = ("kv_b_proj", "_last_read")


class LatentLayer(DynamicLayer):
    """One layer of the latent cache: ``keys`` is the latent ``(batch, 1, seq, kv_lora_rank)``, ``values`` the
    rotary key ``(batch, 1, seq, qk_rope_head_dim)``, both in the model's dtype.

    The latent attention binds the layer to its attention module (:meth:`bind`) so that per-head keys and values can
    be reconstructed for presses (:meth:`decompress`).
    """

    def __init__(self, kv_lora_rank: int, rope_dim: int):
        super().__init__()
        self.kv_lora_rank = int(kv_lora_rank)
        self.rope_dim = int(rope_dim)
        self.kv_b_proj: nn.Linear | None = None
        self.num_heads = self.nope_dim = self.v_dim = 0
        self._last_read: weakref.ref | None = None

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.values

    def bind(self, module: nn.Module) -> None:
        """Remember ``module``'s ``kv_b_proj`` and head sizes (called by the latent attention at every update)."""
        if module.kv_lora_rank != self.kv_lora_rank or module.qk_rope_head_dim != self.rope_dim:
            raise ValueError(
                f"Latent cache layer of kv_lora_rank {self.kv_lora_rank} and rope dim {self.rope_dim} used by an "
                f"attention module of {module.kv_lora_rank} and {module.qk_rope_head_dim}: build the LatentCache from "
                "this model's config (LatentCache(model.config))."
            )
        self.kv_b_proj = module.kv_b_proj
        self.num_heads, self.nope_dim, self.v_dim = module.num_heads, module.qk_nope_head_dim, module.v_head_dim

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None):
        """Append ``key_states`` = latent ``(batch, 1, new, kv_lora_rank)`` and ``value_states`` = rotary key
        ``(batch, 1, new, qk_rope_head_dim)``; returns the whole latent and rotary key."""
        expected = ((self.kv_lora_rank, "kv_lora_rank"), (self.rope_dim, "qk_rope_head_dim"))
        for tensor, (width, what) in zip((key_states, value_states), expected, strict=True):
            if tensor.dim() != 4 or tensor.shape[1] != 1 or tensor.shape[-1] != width:
                raise ValueError(
                    f"A LatentCache layer stores the latent (batch, 1, seq, kv_lora_rank={self.kv_lora_rank}) and the "
                    f"rotary key (batch, 1, seq, {self.rope_dim}); it was given {tuple(tensor.shape)} where "
                    f"{what}={width} was expected. Per-head keys and values come from the stock attention: run the "
                    "model inside pikv_press.attention.latent.enable_latent_attention(model)."
                )
        self._last_read = None
        return super().update(key_states, value_states, cache_kwargs)

    def __deepcopy__(self, memo: dict) -> LatentLayer:
        """A copy of the latent and rotary key that shares the model's ``kv_b_proj`` (no copy of the weights)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = value if name in _SHARED_ATTRS else copy.deepcopy(value, memo)
        clone._last_read = None
        return clone

    def decompress(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``(batch, heads, seq, qk_nope + qk_rope)`` and values ``(batch, heads, seq, v_head_dim)``
        as transformers' own attention computes and caches them (``kv_b_proj`` of the latent, rotary key repeated)."""
        if self.get_seq_length() == 0:
            raise ValueError("This latent cache layer holds no tokens yet.")
        if self.kv_b_proj is None:
            raise ValueError("This latent cache layer was filled without the latent attention and cannot be "
                             "decompressed: fill it inside enable_latent_attention(model).")
        batch, _, seq, _ = self.keys.shape
        kv = self.kv_b_proj(self.keys[:, 0]).view(batch, seq, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, values = torch.split(kv.transpose(1, 2), [self.nope_dim, self.v_dim], dim=-1)
        keys = torch.cat([k_nope, self.values.expand(-1, self.num_heads, -1, -1)], dim=-1)
        return keys, values

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the tokens ``rows`` ``(batch, n)`` (indices into the held tokens) of the latent and rotary key."""
        index = rows.to(self.keys.device)[:, None, :, None]
        self.keys = self.keys.gather(2, index.expand(-1, -1, -1, self.kv_lora_rank)).contiguous()
        self.values = self.values.gather(2, index.expand(-1, -1, -1, self.rope_dim)).contiguous()
        self._last_read = None


class LatentLayerAccess(KVLayerAccess):
    """Presses' view of a :class:`LatentLayer`: reconstructed per-head keys and values; writes keep latent rows."""

    def __init__(self, layer: LatentLayer):
        self.layer = layer

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layer.decompress()
        self.layer._last_read = weakref.ref(keys)  # the rows a write is matched against, while the reader holds them
        return keys, values

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the tokens whose reconstructed keys are the rows of ``keys`` ``(batch, heads, n, qk_dim)`` (rows a
        press selected from :meth:`read`); see the module docstring for heads that disagree. ``values`` must hold
        the same rows (they are not read back)."""
        layer = self.layer
        last = getattr(layer, "_last_read", None)
        full = last() if last is not None else None
        if full is None or full.shape[-2] != layer.get_seq_length():
            full = layer.decompress()[0]
        if keys.dim() != 4 or keys.shape[:2] != full.shape[:2] or keys.shape[-1] != full.shape[-1]:
            raise ValueError(f"A latent cache layer keeps rows of its reconstructed keys {tuple(full.shape)}; got "
                             f"{tuple(keys.shape)}.")
        if values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must hold the same rows.")
        rows = shared_rows(match_rows(full, keys), full.shape[-2])
        layer.keep(rows)

    def seq_length(self) -> int:
        return int(self.layer.get_seq_length())

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        yield from tensors_in((getattr(self.layer, "keys", None), getattr(self.layer, "values", None)))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``tensor``'s numbers as integers (exact equality of rows, -0.0 and NaN included)."""
    size = tensor.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    bits = tensor.contiguous().view(as_int)
    return bits.to(torch.int64) if size == 8 else bits.to(torch.int32)


def match_rows(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For every row of ``kept`` ``(batch, heads, n, d)``, the index along ``seq`` of the identical row of ``full``
    ``(batch, heads, seq, d)`` in the same batch and head: ``(batch, heads, n)``. ``ValueError`` if a row is found
    nowhere (a press that writes new rows instead of keeping some).

    Exact: candidates come from an integer hash of the rows' bit patterns (sums of products, no rounding), every
    candidate is checked bit for bit, and hash collisions fall back to a lexicographic match of whole rows."""
    batch, heads, seq, width = full.shape
    groups = batch * heads
    full_bits, kept_bits = _bits(full).reshape(groups, seq, width), _bits(kept).reshape(groups, -1, width)
    found = _hash_match(full_bits, kept_bits) if width < _HASH_MAX_WIDTH and full.element_size() <= 4 else None
    if found is None:
        found = _lexicographic_match(full_bits, kept_bits)
    if (found < 0).any():
        raise ValueError("A press wrote keys that are not rows of this latent cache layer: the latent cache can only "
                         "keep or drop tokens. Use a DynamicCache for presses that modify keys.")
    return found.view(batch, heads, -1)


_HASH_MAX_WIDTH = 4096  # |bits| < 2**31 and coefficients < 2**20: sums of fewer than 2**12 products fit in int64
_HASH_CHUNK = 4  # (batch x head) groups hashed at a time, to bound the int64 temporaries


def _hash_match(full_bits: torch.Tensor, kept_bits: torch.Tensor) -> torch.Tensor | None:
    """Row indices by hash, checked bit for bit; ``None`` when a hash collision leaves a row unmatched."""
    width = full_bits.shape[-1]
    coeff = torch.randint(1, 2**20, (width,), generator=torch.Generator().manual_seed(0)).to(full_bits.device)
    found = []
    for start in range(0, full_bits.shape[0], _HASH_CHUNK):
        full_chunk, kept_chunk = full_bits[start:start + _HASH_CHUNK], kept_bits[start:start + _HASH_CHUNK]
        full_hash = (full_chunk.to(torch.int64) * coeff).sum(-1)  # (chunk, seq)
        kept_hash = (kept_chunk.to(torch.int64) * coeff).sum(-1)  # (chunk, n)
        sorted_hash, order = full_hash.sort(dim=-1)
        position = torch.searchsorted(sorted_hash, kept_hash).clamp(max=full_hash.shape[-1] - 1)
        candidate = order.gather(-1, position)
        rows = full_chunk.gather(1, candidate.unsqueeze(-1).expand(-1, -1, width))
        if not bool((rows == kept_chunk).all()):
            return None
        found.append(candidate)
    return torch.cat(found)


def _lexicographic_match(full_bits: torch.Tensor, kept_bits: torch.Tensor) -> torch.Tensor:
    """Row indices ``(groups, n)`` by sorting whole rows (``-1`` where a kept row is nowhere in ``full``)."""
    groups, seq, width = full_bits.shape
    kept_len = kept_bits.shape[1]
    group_ids = torch.arange(groups, device=full_bits.device, dtype=full_bits.dtype)[:, None, None]
    rows = torch.cat([
        torch.cat([group_ids.expand(-1, seq, 1), full_bits], dim=-1).reshape(-1, width + 1),
        torch.cat([group_ids.expand(-1, kept_len, 1), kept_bits], dim=-1).reshape(-1, width + 1),
    ])
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    table = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device=full_bits.device)
    table[inverse[: groups * seq]] = torch.arange(seq, device=full_bits.device).repeat(groups)
    return table[inverse[groups * seq:]].view(groups, kept_len)


def shared_rows(per_head: torch.Tensor, seq: int) -> torch.Tensor:
    """One set of ``n`` tokens ``(batch, n)``, in position order, from per-head kept rows ``(batch, heads, n)``
    (rows listed best first): the heads' common set when they agree, else the tokens kept by the most heads, ties
    broken by the Borda count of the heads' orders, then by the earlier position."""
    batch, heads, kept = per_head.shape
    ordered = per_head.sort(dim=-1).values
    if bool((ordered == ordered[:, :1]).all()):
        return ordered[:, 0]
    flat = per_head.reshape(batch, -1)
    votes = torch.zeros(batch, seq, dtype=torch.long, device=per_head.device).scatter_add_(
        1, flat, torch.ones_like(flat))
    points = (kept - torch.arange(kept, device=per_head.device)).expand(batch, heads, kept).reshape(batch, -1)
    borda = torch.zeros(batch, seq, dtype=torch.long, device=per_head.device).scatter_add_(1, flat, points)
    earlier = seq - 1 - torch.arange(seq, device=per_head.device)
    key = (votes * (heads * kept + 1) + borda) * seq + earlier
    return key.topk(kept, dim=-1).indices.sort(dim=-1).values


class LatentCache(DynamicCache):
    """A cache holding, per layer and token, the latent and the rotary key of multi-head latent attention.

    ``LatentCache(model.config)``; use it inside :func:`pikv_press.attention.latent.enable_latent_attention`.
    ``ValueError`` for a model without multi-head latent attention.
    """

    def __init__(self, config: PretrainedConfig):
        text_config = require_latent_attention(config)
        layers = [LatentLayer(text_config.kv_lora_rank, text_config.qk_rope_head_dim)
                  for _ in range(text_config.num_hidden_layers)]
        super(DynamicCache, self).__init__(layers=layers)


@dataclass(frozen=True)
class LatentBytes:
    """Stored bytes per token (all layers) of transformers' stock MLA cache and of the latent cache."""

    stock: int
    latent: int

    @property
    def ratio(self) -> float:
        return self.stock / self.latent


def latent_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype | None = None) -> LatentBytes:
    """Bytes per token, all layers together, stored by transformers' own MLA cache (per-head keys ``qk_nope +
    qk_rope`` and values ``v_head_dim``, the rotary key repeated in every head) and by :class:`LatentCache`
    (``kv_lora_rank + qk_rope`` per layer), for numbers of ``dtype`` (default: the config's ``dtype``)."""
    text_config = require_latent_attention(config)
    dtype = dtype if dtype is not None else getattr(text_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError("The config names no dtype: pass dtype= (for example torch.bfloat16).")
    size = torch.empty((), dtype=dtype).element_size()
    layers, heads = text_config.num_hidden_layers, text_config.num_attention_heads
    per_head = text_config.qk_nope_head_dim + text_config.qk_rope_head_dim + text_config.v_head_dim
    return LatentBytes(stock=layers * heads * per_head * size,
                       latent=layers * (text_config.kv_lora_rank + text_config.qk_rope_head_dim) * size)


register_layer_adapter(LatentLayer, LatentLayerAccess)
register_cache("latent", LatentCache)
