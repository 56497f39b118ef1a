"""Triton path of :mod:`pikv_press.kernels.latent_attention` (import through ``_dispatch.triton_module``).

MLA decode over the latent cache with absorbed projections is grouped-query attention with one "KV head": keys are
``[latent, rope_key]`` (their logits add: ``q_latent . c + q_rope . k_rope``) and values are the latent itself, so
the split-K kernel of :mod:`pikv_press.kernels.attention_triton` runs with a second key piece and reads each latent
tile once for both the logits and the output. Same contract as :func:`~pikv_press.kernels.latent_attention.
latent_attention` (float32, float16, bfloat16; float64 inputs take the reference).
"""

from __future__ import annotations

import torch

from pikv_press.kernels._dispatch import interpreting, triton_module

INTERPRETED = interpreting()
attention_triton = triton_module("attention_triton")


def latent_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
                     scaling: float, mask: torch.Tensor | None = None, is_causal: bool = False,
                     split_size: int | None = None, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_latent (B, H, Q, R), lse (B, H, Q))``; ``latent``/``rope_key`` are ``(B, K, ·)`` (checked by the
    reference module)."""
    from pikv_press.kernels.sharded_attention_triton import additive_mask

    batch, heads, q_len, rank = q_latent.shape
    k_len = latent.shape[1]
    if k_len == 0:
        return (q_latent.new_zeros(batch, heads, q_len, rank),
                torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=q_latent.device))
    return attention_triton.decode_attention(
        q_latent, latent, None, scaling, kv_heads=1, num_keys=k_len, value_dim=rank, query2=q_rope, key2=rope_key,
        mask=additive_mask(mask, (batch, heads, q_len, k_len), q_latent.device), causal=is_causal,
        split_size=split_size, block_n=block_n)
