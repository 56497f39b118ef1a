"""Attention over a KV cache split into shards, merged exactly with log-sum-exp (torch reference).

Softmax attention over keys ``K = K_1 ∪ ... ∪ K_n`` (any split of the keys into disjoint shards) is recovered from
per-shard partial results: each shard returns its normalised output ``o_i = softmax(q K_i^T) V_i`` and the natural
log of its softmax denominator ``lse_i = log sum_j exp(q k_j)``; then

    lse = log sum_i exp(lse_i),   o = sum_i exp(lse_i - lse) * o_i

which equals attention over all keys up to rounding. This is the merge of flash-decoding / split-K attention and of
PiKV's expert-sharded cache, where each shard may sit on its own device or rank.

* :func:`partial_attention` computes ``(out, lse)`` of one shard, with grouped-query attention (query heads
  ``Hq`` a multiple of the key/value heads ``Hkv``; query head ``h`` reads kv head ``h // (Hq // Hkv)``, as
  transformers' ``repeat_kv`` does), keys wider than values (``D != Dv``, DeepSeek's MLA in its expanded form), and an
  optional boolean or additive mask (causal, sliding window, padding). A shard with no keys, or a query row whose keys
  are all masked, gives ``out = 0`` and ``lse = -inf``.
* :func:`sink_partial` is the partial of attention sinks (GPT-OSS: a learned per-head logit in the softmax denominator
  with no value): ``out = 0`` and ``lse = sink``. Merging it with the key shards gives sink attention exactly.
* :func:`merge_partials` merges any number of partials; shards with ``lse = -inf`` are ignored.

This module is the CPU path and the test oracle of the Triton kernels (split-K decode attention and the merge,
:mod:`pikv_press.kernels.sharded_attention_triton`, chosen by ``backend``/``$PIKV_KERNELS``; run so far only through the
Triton interpreter on the CPU, never compiled on a GPU here). Dropout and soft-capping are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pikv_press.kernels._dispatch import triton_module, use_triton

__all__ = ["partial_attention", "merge_partials", "sink_partial"]


def _check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int]:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "partial_attention expects query (batch, q_heads, q_len, head_dim) and key/value (batch, kv_heads, "
            f"k_len, dim) 4-D tensors; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}."
        )
    batch, q_heads, _, dim = query.shape
    kb, kv_heads, k_len, kdim = key.shape
    if kb != batch or value.shape[0] != batch or value.shape[1] != kv_heads or value.shape[2] != k_len:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must share batch, kv_heads and k_len with each "
            f"other and the batch of query {tuple(query.shape)}."
        )
    if kdim != dim:
        raise ValueError(f"query head_dim {dim} differs from key head_dim {kdim}: project them to one width first.")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads}) for grouped-query attention."
        )
    return kv_heads, q_heads // kv_heads


def partial_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query`` over one shard of keys, with the log of its softmax denominator.

    Args:
        query: ``(batch, q_heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, k_len, head_dim)``; ``q_heads`` must be a multiple of ``kv_heads`` (GQA).
        value: ``(batch, kv_heads, k_len, value_dim)``.
        scaling: multiplier of the logits (usually ``head_dim ** -0.5``).
        mask: optional, broadcastable to ``(batch, q_heads, q_len, k_len)``: boolean (True = attend) or additive
            float (0 = attend, ``-inf`` or a large negative number = masked).
        backend: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or ``"triton"``
            (:mod:`pikv_press.kernels._dispatch`; the Triton path is split-K decode attention,
            :mod:`pikv_press.kernels.sharded_attention_triton`).

    Returns:
        ``out`` ``(batch, q_heads, q_len, value_dim)`` in the dtype of ``query`` and ``lse`` ``(batch, q_heads,
        q_len)`` in float32 (natural log). Rows with no key to attend to give ``out = 0`` and ``lse = -inf``.
        The arithmetic is done in float32 whatever the input dtype.
    """
    kv_heads, group = _check_shapes(query, key, value)
    if use_triton(query, key, value, backend=backend):
        return triton_module("sharded_attention_triton").partial_attention(query, key, value, scaling, mask)
    batch, q_heads, q_len, _ = query.shape
    k_len, value_dim = key.shape[2], value.shape[-1]
    out_dtype = query.dtype
    if k_len == 0:
        out = query.new_zeros(batch, q_heads, q_len, value_dim)
        lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
        return out, lse

    # (batch, kv_heads, group * q_len, dim): query heads of one kv head side by side, so keys are never repeated
    q = query.to(torch.float32).reshape(batch, kv_heads, group * q_len, -1)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)) * scaling
    logits = logits.view(batch, kv_heads, group, q_len, k_len)
    if mask is not None:
        full = mask.to(query.device).expand(batch, q_heads, q_len, k_len).reshape(batch, kv_heads, group, q_len, k_len)
        if full.dtype == torch.bool:
            logits = logits.masked_fill(~full, float("-inf"))
        else:
            logits = logits + full.to(torch.float32)
    lse = torch.logsumexp(logits, dim=-1)  # (batch, kv_heads, group, q_len)
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.zeros_like(lse))
    probs = torch.exp(logits - shift.unsqueeze(-1))  # rows with lse = -inf become exp(-inf) = 0
    probs = probs.view(batch, kv_heads, group * q_len, k_len)
    out = torch.matmul(probs, value.to(torch.float32)).view(batch, q_heads, q_len, value_dim)
    return out.to(out_dtype), lse.reshape(batch, q_heads, q_len)


def sink_partial(sinks: torch.Tensor, like_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of attention sinks: a per-head logit that enters the softmax denominator and carries no value.

    Args:
        sinks: ``(q_heads,)`` sink logits (GPT-OSS's ``module.sinks``), not scaled.
        like_out: an output ``(batch, q_heads, q_len, value_dim)`` whose shape, dtype and device the partial takes.

    Returns:
        ``(zeros like like_out, lse)`` with ``lse[b, h, q] = sinks[h]`` in float32.
    """
    batch, q_heads, q_len, _ = like_out.shape
    if sinks.dim() != 1 or sinks.shape[0] != q_heads:
        raise ValueError(f"sinks must be (q_heads,) = ({q_heads},); got {tuple(sinks.shape)}.")
    lse = sinks.to(device=like_out.device, dtype=torch.float32).view(1, q_heads, 1).expand(batch, q_heads, q_len)
    return torch.zeros_like(like_out), lse.contiguous()


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of partial attention results over disjoint key shards.

    Args:
        outs: ``(batch, q_heads, q_len, value_dim)`` per shard (may sit on different devices: everything is moved
            to the device of the first one).
        lses: ``(batch, q_heads, q_len)`` per shard, natural log; ``-inf`` marks an empty shard or row, ignored.

    Returns:
        ``(out, lse)``: the merged output in the dtype of ``outs[0]`` (accumulated in float32) and the merged lse in
        float32. Rows where every shard is empty give ``out = 0`` and ``lse = -inf``.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_partials needs as many lses as outs, at least one; got {len(outs)} and {len(lses)}.")
    if use_triton(*outs, *lses, backend=backend):  # backend: as partial_attention's
        return triton_module("sharded_attention_triton").merge_partials(outs, lses)
    device, out_dtype = outs[0].device, outs[0].dtype
    lse_stack = torch.stack([lse.to(device=device, dtype=torch.float32) for lse in lses])  # (n, B, H, Q)
    merged = torch.logsumexp(lse_stack, dim=0)
    finite = torch.isfinite(merged)
    shift = torch.where(finite, merged, torch.zeros_like(merged))
    weights = torch.exp(lse_stack - shift)  # empty shards: exp(-inf) = 0
    out = torch.zeros(outs[0].shape, dtype=torch.float32, device=device)
    for weight, part in zip(weights, outs, strict=True):
        out = out + weight.unsqueeze(-1) * part.to(device=device, dtype=torch.float32)
    return out.to(out_dtype), merged
