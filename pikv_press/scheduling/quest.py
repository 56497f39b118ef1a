"""Quest-style page selection (Tang et al., arXiv 2406.10774): every page is kept, each query reads the top pages.

``with quest_attention(model, token_budget=1024, page_size=16):`` switches the model's attention (through
:func:`~pikv_press.scheduling.attention.override_attention`) so that, in every layer from ``dense_layers`` on,
each query head reads only ``token_budget // page_size`` pages of the cached tokens that precede the forward pass,
plus every token of the pass itself (causally). Pages are ``page_size`` consecutive cache slots; a page's
*criticality* for a query ``q`` is Quest's upper bound of ``q . k`` over the page's keys from their element-wise
minimum and maximum, ``sum_d max(q_d * min_d, q_d * max_d)``; the pages of largest bound are read. The cache is not
changed: memory stays that of the full cache, only the tokens each query reads are bounded (Quest reduces reads,
not storage). With fewer cached tokens than the budget, attention is the model's own, unchanged.

Differences from the paper: page bounds are recomputed from the cached keys on every pass instead of being
maintained incrementally (same values); a pass of several tokens (a chunk) selects pages per query over the tokens
cached before the pass; the paper applies Quest to decoding steps and leaves the first two layers dense
(``dense_layers=2``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pikv_press.moe import get_anatomy
from pikv_press.scheduling.attention import _repeat_kv, override_attention


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(min, max)`` of the keys ``(batch, kv_heads, slots, dim)`` of each page of ``page_size`` slots:
    ``(batch, kv_heads, pages, dim)`` each (the last page may be partial)."""
    b, h, slots, d = keys.shape
    pages = -(-slots // page_size)
    pad = pages * page_size - slots
    keys = keys.float()
    low = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).view(b, h, pages, page_size, d).amin(3)
    high = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).view(b, h, pages, page_size, d).amax(3)
    return low, high


def page_criticality(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound ``sum_d max(q_d * min_d, q_d * max_d)`` of every query ``(batch, heads, q, dim)`` over every
    page ``(batch, kv_heads, pages, dim)``: ``(batch, heads, q, pages)`` (``q+ . max + q- . min``)."""
    groups = query.shape[1] // low.shape[1]
    query = query.float()
    return (torch.matmul(query.clamp_min(0), _repeat_kv(high, groups).transpose(2, 3))
            + torch.matmul(query.clamp_max(0), _repeat_kv(low, groups).transpose(2, 3)))


def selected_slots(query: torch.Tensor, keys: torch.Tensor, token_budget: int, page_size: int) -> torch.Tensor:
    """Bool ``(batch, heads, q, slots)``: the slots of ``keys`` each query head reads (its top
    ``token_budget // page_size`` pages by :func:`page_criticality`; all slots when they fit in the budget)."""
    b, heads, q_len, _ = query.shape
    slots = keys.shape[2]
    n_pages = max(1, token_budget // page_size)
    low, high = page_bounds(keys, page_size)
    if low.shape[2] <= n_pages:
        return torch.ones(b, heads, q_len, slots, dtype=torch.bool, device=query.device)
    top = page_criticality(query, low, high).topk(n_pages, dim=-1).indices
    pages = torch.zeros(b, heads, q_len, low.shape[2], dtype=torch.bool, device=query.device).scatter_(-1, top, True)
    return pages.repeat_interleave(page_size, dim=-1)[..., :slots]


def _quest_handler(token_budget: int, page_size: int):
    def handler(original, module, query, key, value, attention_mask, **kwargs):
        q_len, k_len = query.shape[2], key.shape[2]
        past = k_len - q_len
        if past <= token_budget:
            return original(module, query, key, value, attention_mask, **kwargs)
        with torch.no_grad():
            reads = selected_slots(query, key[:, :, :past], token_budget, page_size)
            allowed = torch.cat([reads, reads.new_ones(*reads.shape[:3], q_len)], dim=-1)  # (b, heads, q, keys)
            if attention_mask is None:  # causal, the queries being the last q_len keys
                rows = torch.arange(q_len, device=query.device).view(-1, 1) + past
                allowed = allowed & (torch.arange(k_len, device=query.device).view(1, -1) <= rows)
                mask = allowed
            elif attention_mask.dtype == torch.bool:
                mask = attention_mask[..., :k_len] & allowed
            else:
                blocked = torch.finfo(attention_mask.dtype).min
                mask = attention_mask[..., :k_len].masked_fill(~allowed, blocked)
        return original(module, query, key, value, mask, **kwargs)

    return handler


@contextmanager
def quest_attention(model: nn.Module, token_budget: int, page_size: int = 16, dense_layers: int = 2) -> Iterator[None]:
    """Quest page selection on ``model`` inside the block (see the module docstring).

    Parameters
    ----------
    token_budget : cached tokens each query reads, >= page_size (``token_budget // page_size`` pages).
    page_size : cache slots per page, >= 1 (the paper uses 16).
    dense_layers : the first layers keep dense attention, >= 0 (the paper: 2).
    """
    for name, value, low in (("token_budget", token_budget, 1), ("page_size", page_size, 1),
                             ("dense_layers", dense_layers, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"quest_attention: {name} must be an integer >= {low}, got {value!r}.")
    if token_budget < page_size:
        raise ValueError(f"quest_attention: token_budget ({token_budget}) must be at least one page ({page_size}).")
    anatomy = get_anatomy(model)
    handler = _quest_handler(token_budget, page_size)
    layers = {i: handler for i in anatomy.compressible_layers if i >= dense_layers}
    with override_attention(model, "quest", layers):
        yield
