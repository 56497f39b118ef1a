"""Attention in the reduced key space of :class:`pikv_press.cache.LowRankKeyCache`.

With keys stored as coefficients ``c = k P`` on an orthonormal basis ``P`` ``(head_dim, r)``, the scores of the
reconstructed keys are ``q . (c P^T) = (q P) . c``: queries are projected once per step (``r`` multiply-adds per
query dimension) and the scores are computed over ``r`` instead of ``head_dim`` numbers, without reconstructing keys.

>>> register_lowrank_attention()
>>> model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=LOWRANK_ATTENTION)
>>> model.generate(ids, past_key_values=LowRankKeyCache(rank=32, reduced_attention=True, config=model.config))

How the basis reaches the attention function: the cache returns the coefficients ``(batch, kv_heads, seq, r)`` as the
"keys" of the step, with the basis ``(batch, kv_heads, head_dim, r)`` attached as the tensor attribute
``pikv_key_basis`` (transformers' attention functions receive the keys, not the cache). Keys without that attribute
(any other cache) get plain SDPA, so the implementation is safe to load for every cache. The softmax scale is the
model's (``1 / sqrt(head_dim)``, passed by the attention module), not that of the reduced width. Masks are SDPA's.
Head-wise evictions (``module.masked_key_indices``: AdaKVExpectedAttentionPress, AdaKVPress) are applied as an
exact per-head mask (:func:`pikv_press.attention.headwise.headwise_mask`): kvpress's attention patch does not reach
this function.
Not supported: attention sinks (GPT-OSS), which this function would ignore (it raises), and returning attention
weights.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pikv_press.attention.headwise import headwise_mask

LOWRANK_ATTENTION = "pikv_lowrank"
BASIS_ATTRIBUTE = "pikv_key_basis"


def attach_basis(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``coefficients`` marked as reduced keys on ``basis`` for :func:`lowrank_attention_forward`."""
    setattr(coefficients, BASIS_ATTRIBUTE, basis)
    return coefficients


def lowrank_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over reduced keys: ``query (batch, heads, q, head_dim)`` is projected on the basis attached to ``key``
    (``(batch, kv_heads, seq, r)``); keys without a basis get plain SDPA."""
    basis = getattr(key, BASIS_ATTRIBUTE, None)
    if basis is not None:
        if getattr(module, "sinks", None) is not None:
            raise ValueError(f"{LOWRANK_ATTENTION} attention does not handle attention sinks: use "
                             "LowRankKeyCache(reduced_attention=False) with this model.")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        groups = query.shape[1] // basis.shape[1]
        query = query @ basis.repeat_interleave(groups, dim=1).to(query.dtype)
    masked = getattr(module, "masked_key_indices", None)
    if masked is not None and query.shape[2] != key.shape[2]:
        # head-wise evictions (AdaKVExpectedAttentionPress, AdaKVPress): kvpress's attention patch does not reach
        # this function, so
        # they are applied here, exactly, as pikv_press.attention.headwise does for SDPA
        attention_mask = headwise_mask(query, key, masked, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_lowrank_attention() -> str:
    """Register :func:`lowrank_attention_forward` (with SDPA's masks) under :data:`LOWRANK_ATTENTION`; returns the
    name to pass as ``attn_implementation``."""
    AttentionInterface.register(LOWRANK_ATTENTION, lowrank_attention_forward)
    AttentionMaskInterface.register(LOWRANK_ATTENTION, sdpa_mask)
    return LOWRANK_ATTENTION
