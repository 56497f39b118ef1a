"""Triton path of :mod:`pikv_press.kernels.sharded_attention` (import through ``_dispatch.triton_module``).

:func:`partial_attention` is split-K decode attention (flash-decoding: the shard's keys are cut into splits of
``split_size`` tokens that run in parallel, then merged exactly) and :func:`merge_partials` the exact log-sum-exp merge
of several shards, both from :mod:`pikv_press.kernels.attention_triton`. Same signatures and results as the torch
reference up to float32 rounding (the kernel's online softmax sums in another order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pikv_press.kernels._dispatch import interpreting, triton_module

INTERPRETED = interpreting()
attention_triton = triton_module("attention_triton")


def additive_mask(mask: torch.Tensor | None, shape: tuple[int, int, int, int], device) -> torch.Tensor | None:
    """A boolean (True = attend) or additive mask as an additive float32 view expanded to ``shape`` (no copy of the
    broadcast dimensions)."""
    if mask is None:
        return None
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf")).to(torch.float32)
    return mask.to(torch.float32).expand(shape)


def partial_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                      mask: torch.Tensor | None = None, split_size: int | None = None,
                      block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``query`` over one shard (shapes checked by the reference module's ``_check_shapes``)."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    if k_len == 0:
        return (query.new_zeros(batch, q_heads, q_len, value_dim),
                torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device))
    return attention_triton.decode_attention(
        query, key, value, scaling, kv_heads=kv_heads, num_keys=k_len, value_dim=value_dim,
        mask=additive_mask(mask, (batch, q_heads, q_len, k_len), query.device), split_size=split_size,
        block_n=block_n)


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of shards' ``(out, lse)`` (every tensor moved to the first output's device, as the reference)."""
    device, out_dtype = outs[0].device, outs[0].dtype
    shape = outs[0].shape
    parts = torch.stack([o.to(device=device, dtype=torch.float32).reshape(-1, shape[-1]) for o in outs])
    lse_stack = torch.stack([lse.to(device=device, dtype=torch.float32).reshape(-1) for lse in lses])
    out, lse = attention_triton.merge(parts, lse_stack, out_dtype)
    return out.view(shape), lse.view(shape[:-1])
