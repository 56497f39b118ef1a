"""Multi-head latent attention computed from the latent cache, with absorbed projections (DeepSeek-V2/V3).

>>> from pikv_press.attention.latent import enable_latent_attention
>>> from pikv_press.cache.latent import LatentCache
>>> with enable_latent_attention(model):
...     out = model.generate(ids, past_key_values=LatentCache(model.config), max_new_tokens=20)

Inside the block every MLA attention module of ``model`` runs :func:`latent_attention_forward` instead of its own
forward; the original forward is restored on exit, also when the block raises. The latent forward:

1. projects queries as the model does and splits them into ``q_nope`` and the rotary part (RoPE applied exactly as
   the family does: complex ``freqs_cis`` for DeepSeek-V2, de-interleaved halves for DeepSeek-V3 with
   ``rope_interleave``, read from the family registry's ``RopeStyle``);
2. caches the latent ``kv_a_layernorm(c)`` ``(batch, 1, seq, kv_lora_rank)`` and the rotary key after RoPE
   ``(batch, 1, seq, qk_rope_head_dim)`` in a :class:`~pikv_press.cache.latent.LatentLayer`;
3. absorbs ``q_nope`` through the key half of ``kv_b_proj`` (``q_latent[h] = W_uk[h]^T q_nope[h]``), attends over the
   latent with :func:`pikv_press.kernels.latent_attention.latent_attention` (output in latent space), expands the
   output through the value half of ``kv_b_proj`` and applies ``o_proj``.

The result equals the stock attention up to float rounding (keys and values are linear in the latent). A plain
``DynamicCache`` handed to the model (``generate``'s default, kvpress's pipeline) has its *empty* layers replaced by
latent layers on first use, so it holds latents too; a layer already holding per-head keys raises. Without a cache the
latent of the current tokens is attended directly.

Not implemented: attention weights as an output (``None`` is returned: presses that read them, such as
ObservedAttentionPress, get none), dropout (eval only), flex-attention block masks, static caches. Every query is
attended in latent space, also at prefill, where decompressing would be cheaper for long prompts (vLLM does that).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from pikv_press.cache.latent import LatentLayer, require_latent_attention
from pikv_press.kernels.latent_attention import latent_attention
from pikv_press.moe import AttentionLayout, MoEAnatomy, get_anatomy

_LATENT_MARK = "__pikv_latent_attention__"


def apply_rope(states: torch.Tensor, position_embeddings: Any, layout: AttentionLayout) -> torch.Tensor:
    """RoPE on the rotary slice ``states`` ``(batch, heads, seq, qk_rope_head_dim)`` exactly as the family does."""
    if layout.complex_rope:  # DeepSeek-V2: adjacent pairs as complex numbers times freqs_cis
        rotated = torch.view_as_complex(states.float().reshape(*states.shape[:-1], -1, 2))
        return torch.view_as_real(rotated * position_embeddings.unsqueeze(1).to(rotated.device)).flatten(3).type_as(
            states)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    if layout.interleaved:  # DeepSeek-V3 rope_interleave: de-interleave, then rotate halves
        b, h, s, d = states.shape
        states = states.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return states * cos + rotate_half(states) * sin


def _latent_layer(cache: Any, module: nn.Module) -> LatentLayer:
    """Layer ``module.layer_idx`` of ``cache`` as a latent layer (an empty dynamic layer is replaced by one)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"Latent attention needs a pikv_press LatentCache, got {type(cache).__name__}: pass "
                         "past_key_values=LatentCache(model.config).")
    idx = module.layer_idx
    while len(layers) <= idx:
        layers.append(LatentLayer(module.kv_lora_rank, module.qk_rope_head_dim))
    layer = layers[idx]
    if not isinstance(layer, LatentLayer):
        if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
            raise ValueError(
                f"Layer {idx} of the cache is a {type(layer).__name__} holding {layer.get_seq_length()} tokens of "
                "per-head keys, which latent attention cannot read: start from a new "
                "pikv_press.cache.latent.LatentCache(model.config) (or an empty DynamicCache) inside "
                "enable_latent_attention(model)."
            )
        layer = layers[idx] = LatentLayer(module.kv_lora_rank, module.qk_rope_head_dim)
    layer.bind(module)
    return layer


def _continues_cache(cache_position: torch.Tensor | None) -> bool:
    """Whether this forward pass continues a cache (kvpress resets its head-wise masks at every prefill)."""
    return cache_position is None or int(cache_position[0]) > 0


def _fit_mask(mask: Any, num_keys: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"Latent attention takes tensor masks (sdpa or eager attention), got {type(mask).__name__}: "
                         "load the model with attn_implementation='sdpa' or 'eager'.")
    return mask[..., :num_keys]


def latent_attention_forward(
    module: nn.Module,
    layout: AttentionLayout,
    hidden_states: torch.Tensor,
    position_embeddings: Any,
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    cache_position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """One MLA attention module's forward from the latent cache: ``(output (batch, seq, hidden), None)``."""
    m = module
    if getattr(m, "masked_key_indices", None) is not None and _continues_cache(cache_position):
        raise ValueError(
            "A head-wise press (AdaKVPress, CriticalAdaKVPress, ...) masked keys per head in this layer; the latent "
            "cache holds one latent per token for all heads and latent attention applies no per-head masks. Use a "
            "press that evicts tokens (KnormPress, SnapKVPress, ...) or the stock cache (outside "
            "enable_latent_attention)."
        )
    batch, seq, _ = hidden_states.shape
    heads, nope, rope, v_dim, rank = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    q = m.q_proj(hidden_states) if m.q_lora_rank is None else m.q_b_proj(m.q_a_layernorm(m.q_a_proj(hidden_states)))
    q_nope, q_rope = torch.split(q.view(batch, seq, heads, nope + rope).transpose(1, 2), [nope, rope], dim=-1)
    latent, k_rope = torch.split(m.kv_a_proj_with_mqa(hidden_states), [rank, rope], dim=-1)
    latent = m.kv_a_layernorm(latent).unsqueeze(1)  # (batch, 1, seq, kv_lora_rank)
    q_rope = apply_rope(q_rope, position_embeddings, layout)
    k_rope = apply_rope(k_rope.view(batch, 1, seq, rope), position_embeddings, layout)
    if past_key_values is not None:
        _latent_layer(past_key_values, m)
        latent, k_rope = past_key_values.update(latent, k_rope, m.layer_idx, {"cache_position": cache_position})
    weight = m.kv_b_proj.weight.view(heads, nope + v_dim, rank)  # (heads, nope + v, kv_lora_rank)
    w_uk, w_uv = weight[:, :nope], weight[:, nope:]
    compute = torch.promote_types(q_nope.dtype, torch.float32)  # absorption and expansion in float32 at least
    q_latent = torch.einsum("bhqd,hdr->bhqr", q_nope.to(compute), w_uk.to(compute))
    mask = _fit_mask(attention_mask, latent.shape[-2])
    out_latent, _ = latent_attention(q_latent, q_rope, latent, k_rope, m.scaling, mask=mask,
                                     is_causal=mask is None and seq > 1)
    out = torch.einsum("bhqr,hdr->bhqd", out_latent, w_uv.to(compute))  # (batch, heads, seq, v)
    out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, seq, heads * v_dim)
    return m.o_proj(out), None


def _make_forward(module: nn.Module, layout: AttentionLayout):
    signature = inspect.signature(module.forward)

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        given.update(given.pop("kwargs", {}) or {})
        return latent_attention_forward(module, layout, given["hidden_states"], given.get("position_embeddings"),
                                        given.get("attention_mask"), given.get("past_key_values"),
                                        given.get("cache_position"))

    setattr(forward, _LATENT_MARK, True)
    return forward


def is_latent_attention_enabled(model: nn.Module) -> bool:
    """Whether ``model``'s MLA attention modules currently run the latent forward."""
    anatomy = get_anatomy(model)
    return any(getattr(anatomy.attention(i).forward, _LATENT_MARK, False) for i in range(anatomy.num_layers))


@contextmanager
def enable_latent_attention(model: nn.Module) -> Iterator[MoEAnatomy]:
    """Run ``model``'s multi-head latent attention from the latent cache inside the block (see the module docstring).

    Yields the model's anatomy. ``ValueError`` for a model without multi-head latent attention. Nested blocks are
    allowed (the inner one changes nothing). Every module gets its own forward back on exit, also on errors.
    """
    anatomy = get_anatomy(model)
    require_latent_attention(anatomy.config)
    swapped: list[tuple[nn.Module, bool, Any]] = []
    try:
        for idx in range(anatomy.num_layers):
            module = anatomy.attention(idx)
            if getattr(module.forward, _LATENT_MARK, False):
                continue
            layout = AttentionLayout(module, anatomy.family, anatomy.config)
            swapped.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = _make_forward(module, layout)
        yield anatomy
    finally:
        for module, had_own, previous in reversed(swapped):
            if had_own:
                module.forward = previous
            else:
                del module.forward
