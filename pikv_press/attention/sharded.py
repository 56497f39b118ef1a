"""``attn_implementation="pikv_sharded"``: attention over an :class:`~pikv_press.cache.ExpertShardedCache`, shard by
shard, merged exactly with log-sum-exp.

Importing this module registers the function with transformers' ``AttentionInterface``::

    pikv_press.attention.register_sharded_attention()  # or import this module
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="pikv_sharded")

With ``ExpertShardedCache(distributed=True)`` the partials of each rank's shards are merged across ranks by one
collective (:mod:`pikv_press.attention.distributed`).

For each layer, every shard the queries read (all of them, or under routing-restricted decoding the local shard and
the shards of the predicted experts) gives a partial result ``(out, lse)`` computed on the shard's device by
:func:`pikv_press.kernels.sharded_attention.partial_attention`; attention sinks (GPT-OSS ``s_aux``) are one more
partial (:func:`~pikv_press.kernels.sharded_attention.sink_partial`); :func:`merge_partials` merges them. Causality
and sliding windows follow the order in which tokens entered the layer (the attention mask transformers builds is not
used); with contiguous positions this is exactly the causal / sliding-window mask of the dense model.

With any other cache (or none) the function is plain exact attention over the keys it is given, with the 4-D mask
transformers passes or, without one, a causal (and sliding-window) mask built from the shapes; a 2-D padding mask is
not available to it (no mask function is registered), so batched inputs with padding are refused.

Not implemented: dropout (training), attention weights output (``output_attentions``; ``None`` is returned).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import AttentionInterface

from pikv_press.cache.sharded import LAYER_TAG, SHARDED_ATTENTION, ExpertShardedLayer, Rows
from pikv_press.kernels.sharded_attention import merge_partials, partial_attention, sink_partial

__all__ = ["SHARDED_ATTENTION", "sharded_attention_forward", "shard_partial"]


QUERY_BLOCK = 256
"""Queries per block in multi-token forwards (prefill): logits are at most (group, QUERY_BLOCK, rows of one head)."""


def _allowed(rows: Rows, q_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """(q_len, rows) bool: causal in insertion order, within the sliding window when there is one."""
    index = rows.index.view(1, -1)
    q_index = q_index.to(index.device).view(-1, 1)
    allowed = index <= q_index
    if window is not None:
        allowed &= index > q_index - window
    return allowed


def shard_partial(rows: Rows, query: torch.Tensor, scaling: float, q_index: torch.Tensor, kv_heads: int,
                  window: int | None = None, readers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention ``(out, lse)`` of ``query`` (1, q_heads, q_len, key_dim) over one shard's rows, on the
    shard's device. Rows of kv head ``h`` are seen by query heads ``h * g ... (h + 1) * g - 1`` (GQA); ``readers``
    (q_len,) bool, when given, are the queries that read this shard (the others get ``lse = -inf``)."""
    device = rows.keys.device
    query = query.to(device)
    q_heads, q_len = query.shape[1], query.shape[2]
    group = q_heads // kv_heads
    if q_len == 1 and window is None:  # decoding: every stored row precedes the query
        allowed = torch.ones(1, rows.n, dtype=torch.bool, device=device)
    else:
        allowed = _allowed(rows, q_index, window)  # (q_len, n)
    if readers is not None:
        allowed &= readers.to(device).view(-1, 1)
    if q_len == 1:  # decoding: one product over all heads' rows, rows of other heads masked
        owner = torch.arange(q_heads, device=device).div(group, rounding_mode="floor")
        mask = (rows.heads.view(1, -1) == owner.view(-1, 1)) & allowed  # (q_heads, n)
        return partial_attention(query, rows.keys.view(1, 1, rows.n, rows.keys.shape[-1]),
                                 rows.values.view(1, 1, rows.n, rows.values.shape[-1]),
                                 scaling, mask.view(1, q_heads, 1, rows.n))
    head_outs, head_lses = [], []
    for head in range(kv_heads):  # prefill: per kv head, so that logits are (group, queries, rows of that head)
        which = torch.nonzero(rows.heads == head).flatten()
        keys = rows.keys[which].view(1, 1, which.numel(), rows.keys.shape[-1])
        values = rows.values[which].view(1, 1, which.numel(), rows.values.shape[-1])
        head_allowed = allowed[:, which]
        outs, lses = [], []
        for start in range(0, q_len, QUERY_BLOCK):  # blocks of queries bound the logits' memory
            block = slice(start, min(start + QUERY_BLOCK, q_len))
            out, lse = partial_attention(query[:, head * group:(head + 1) * group, block], keys, values, scaling,
                                         head_allowed[block].view(1, 1, block.stop - block.start, keys.shape[2]))
            outs.append(out)
            lses.append(lse)
        head_outs.append(torch.cat(outs, dim=2))
        head_lses.append(torch.cat(lses, dim=2))
    return torch.cat(head_outs, dim=1), torch.cat(head_lses, dim=1)


def _layer_partials(layer: ExpertShardedLayer, query: torch.Tensor, scaling: float, window: int | None):
    outs, lses = [], []
    selected = layer.selected_shards()
    if query.shape[2] == 1:
        # decoding: the shards read on one device are gathered into one product (one call instead of one per shard;
        # the gather reads exactly the selected rows). Every stored row precedes the query, and a sliding-window
        # layer holds only its window, so no causal mask is needed.
        by_device: dict[torch.device, list[Rows]] = {}
        for _, rows, _ in selected:
            by_device.setdefault(rows.keys.device, []).append(rows)
            layer.bytes_read += rows.kv_nbytes()
        for device, parts in by_device.items():
            rows = parts[0] if len(parts) == 1 else Rows.cat(parts, device)
            out, lse = shard_partial(rows, query, scaling, layer.query_index, layer.kv_heads, window)
            outs.append(out.to(query.device))
            lses.append(lse.to(query.device))
    else:
        for _, rows, readers in selected:
            out, lse = shard_partial(rows, query, scaling, layer.query_index, layer.kv_heads, window, readers)
            outs.append(out.to(query.device))
            lses.append(lse.to(query.device))
            layer.bytes_read += rows.kv_nbytes()
    layer.unconsumed = False
    if layer.world_size > 1:
        from pikv_press.attention.distributed import distributed_merge

        if outs:
            out, lse = merge_partials(outs, lses)
        else:  # this rank holds none of the shards read
            q_heads, q_len = query.shape[1], query.shape[2]
            out = query.new_zeros(1, q_heads, q_len, layer.value_dim)
            lse = torch.full((1, q_heads, q_len), float("-inf"), device=query.device)
        out, lse = distributed_merge(out, lse, layer.group)
        outs, lses = [out], [lse]
    return outs, lses


def _dense_mask(attention_mask, query: torch.Tensor, key: torch.Tensor, window: int | None):
    q_len, k_len = query.shape[2], key.shape[2]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return attention_mask[..., :k_len]
    if attention_mask is not None:
        raise ValueError("pikv_sharded attention expects a 4-D attention mask or none.")
    q_index = torch.arange(k_len - q_len, k_len, device=query.device).view(-1, 1)
    k_index = torch.arange(k_len, device=query.device).view(1, -1)
    allowed = k_index <= q_index
    if window is not None:
        allowed &= k_index > q_index - window
    return allowed.view(1, 1, q_len, k_len)


def sharded_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``(attn_output (batch, q_len, q_heads, value_dim), None)``."""
    if dropout and module.training:
        raise ValueError("pikv_sharded attention does not implement dropout: use it in eval mode.")
    if scaling is None:
        scaling = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
    layer = getattr(key, LAYER_TAG, None)
    if layer is not None:
        started = time.perf_counter()
        window = sliding_window if sliding_window is not None else layer.sliding_window
        outs, lses = _layer_partials(layer, query, scaling, window)
        layer.attention_seconds += time.perf_counter() - started
    else:
        out, lse = partial_attention(query, key, value, scaling, _dense_mask(attention_mask, query, key,
                                                                               sliding_window))
        outs, lses = [out], [lse]
    if s_aux is not None:
        sink_out, sink_lse = sink_partial(s_aux, outs[0])
        outs.append(sink_out)
        lses.append(sink_lse)
    out, _ = merge_partials(outs, lses)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARDED_ATTENTION, sharded_attention_forward)
