"""Exact head-wise masking of evicted keys for presses with head-wise budgets
(:class:`~pikv_press.AdaKVExpectedAttentionPress`).

kvpress stores AdaKV's evictions as ``module.masked_key_indices`` (batch, kv head, token) and, in its attention patch,
overwrites those keys with a fake key whose attention weight underflows to zero for every query of the step. The
fake key comes from an iterative search (``kvpress.attention_patch.search_hyperplane``) that can fail: on a model
whose queries of one step point in every direction (a tiny random MoE; a long multi-token question) it raises
``ValueError: Could not find fake keys ...`` in the middle of generation.

Here the masked entries are removed from attention exactly instead: the SDPA call gets a per-head mask (``-inf`` at
the masked (head, token) pairs, broadcast over each kv head's query group) combined with the causal mask that
transformers passes. The keys stay untouched. It acts only on attention modules that a press marked with
:data:`EXACT_MASK_TAG` (``AdaKVExpectedAttentionPress`` marks the modules it compresses) and only on
``attn_implementation="sdpa"``; every other module and attention function runs as before. :func:`install` wraps
transformers' registered ``sdpa`` function once (idempotent, on the first use of such a press).
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

EXACT_MASK_TAG = "_pikv_exact_headwise_mask"
"""Attribute set to ``True`` on an attention module whose ``masked_key_indices`` are applied as an exact mask."""
_WRAPPED = "__pikv_headwise__"


def headwise_mask(query: torch.Tensor, key: torch.Tensor, masked_key_indices, attention_mask: torch.Tensor | None
                  ) -> torch.Tensor:
    """The additive mask (batch, query heads, query tokens, key tokens) that removes ``masked_key_indices`` (batch,
    kv head, token) from attention, on top of ``attention_mask`` (boolean, True where attention is allowed, or
    additive; ``None``: every key is visible, as for one decoding token)."""
    bsz, num_heads, q_len, _ = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    batch_idx, head_idx, seq_idx = (t.to(query.device) for t in masked_key_indices)
    blocked = torch.zeros(bsz, num_kv_heads, k_len, dtype=torch.bool, device=query.device)
    blocked[batch_idx, head_idx, seq_idx] = True
    blocked = blocked.repeat_interleave(num_heads // num_kv_heads, dim=1)[:, :, None, :]  # (b, h, 1, k)
    low = torch.finfo(query.dtype).min
    if attention_mask is None:
        base = torch.zeros(bsz, 1, q_len, k_len, dtype=query.dtype, device=query.device)
    elif attention_mask.dtype == torch.bool:
        base = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, low)
    else:
        base = attention_mask.to(query.dtype)
    base = base[..., :k_len]
    return base.masked_fill(blocked, low)


def _wrap(func):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        masked = getattr(module, "masked_key_indices", None)
        if masked is None or not getattr(module, EXACT_MASK_TAG, False) or query.shape[2] == key.shape[2]:
            return func(module, query, key, value, attention_mask, *args, **kwargs)  # prefill clears the masks
        mask = headwise_mask(query, key, masked, attention_mask)
        module.masked_key_indices = None  # kvpress's patch (inside ``func``) must not write fake keys
        try:
            return func(module, query, key, value, mask, *args, **kwargs)
        finally:
            module.masked_key_indices = masked

    setattr(attention, _WRAPPED, func)
    return attention


def install() -> None:
    """Wrap the registered ``sdpa`` attention once (idempotent)."""
    func = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not hasattr(func, _WRAPPED):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _wrap(func)


def move_masks(module: torch.nn.Module, device: torch.device | None = None) -> None:
    """Put ``module.masked_key_indices`` on ``device`` (default: the module's own parameters' device, left alone
    when they are on the meta device, i.e. offloaded). kvpress builds the batch indices on the CPU (AdaKV) and
    KVzip's global ranking builds every layer's indices on one device; on a model split across devices each layer's
    masks then belong to its own."""
    masked = getattr(module, "masked_key_indices", None)
    if masked is None:
        return
    if device is None:
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
        if device is None:
            return
    module.masked_key_indices = tuple(t.to(device) for t in masked)


def clear_masks(modules) -> None:
    """Drop the head-wise masks (``masked_key_indices``) of every attention module in ``modules``: they belong to
    the context that set them, and a new prefill must not inherit them (kvpress's attention patch clears them at a
    prefill too)."""
    for module in modules:
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None


def mark(module: torch.nn.Module) -> None:
    """Apply ``module``'s head-wise masks exactly (:func:`install` included)."""
    install()
    setattr(module, EXACT_MASK_TAG, True)
