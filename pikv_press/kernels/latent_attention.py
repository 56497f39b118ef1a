"""Attention over the latent cache of multi-head latent attention (DeepSeek-V2/V3), torch reference.

Multi-head latent attention (MLA, DeepSeek-V2, arXiv 2405.04434) caches, per token, one compressed latent ``c``
(``kv_lora_rank`` numbers, after ``kv_a_layernorm``) and one rotary key ``k_rope`` (``qk_rope_head_dim`` numbers,
after RoPE) shared by every head. Head ``h``'s key is ``[W_uk[h] @ c, k_rope]`` and its value ``W_uv[h] @ c``, where
``W_uk``/``W_uv`` are the key and value halves of ``kv_b_proj``. With the projections *absorbed*,

    logit[h, q, t] = scaling * (q_latent[h, q] . c[t] + q_rope[h, q] . k_rope[t]),  q_latent[h] = W_uk[h]^T q_nope[h]
    out_latent[h, q] = sum_t softmax_t(logit[h, q, :]) c[t]                          (then W_uv[h] @ out_latent[h, q])

so attention reads the latent directly and never materialises per-head keys or values. This module computes the two
lines above (the absorption of the query and the value expansion are done by the caller,
:mod:`pikv_press.attention.latent`); it is the CPU path and the test oracle of the Triton kernel
(:mod:`pikv_press.kernels.latent_attention_triton`, split-K decode, chosen by ``backend``/``$PIKV_KERNELS``; run so far
only through the Triton interpreter on the CPU, never compiled on a GPU here).

Implemented: any number of queries (decoding and prefill), an optional boolean or additive mask, bottom-right
causal masking, rows with no visible key (output 0, ``lse = -inf``). Not implemented: dropout, attention weights as
an output (they are ``exp(logit - lse)`` if needed).
"""

from __future__ import annotations

import torch

from pikv_press.kernels._dispatch import triton_module, use_triton


def latent_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of absorbed queries over the latent cache: ``(out_latent, lse)``.

    Shapes (``B`` batch, ``H`` heads, ``Q`` queries, ``K`` cached tokens, ``R`` = ``kv_lora_rank``, ``Dr`` =
    ``qk_rope_head_dim``):

    * ``q_latent`` ``(B, H, Q, R)``: the no-RoPE part of the queries absorbed through the key half of ``kv_b_proj``;
    * ``q_rope`` ``(B, H, Q, Dr)``: the rotary part of the queries, after RoPE;
    * ``latent`` ``(B, K, R)`` (or ``(B, 1, K, R)``, the layout of :class:`pikv_press.cache.latent.LatentLayer`);
    * ``rope_key`` ``(B, K, Dr)`` (or ``(B, 1, K, Dr)``), after RoPE;
    * ``scaling``: the model's logit scale (``module.scaling``);
    * ``mask``: ``None``, a boolean mask (``True`` = attend) or an additive float mask, broadcastable to
      ``(B, H, Q, K)`` (transformers' 4-D masks ``(B, 1, Q, K)``);
    * ``is_causal``: query ``i`` sees keys ``0 .. K - Q + i`` (the queries are the last ``Q`` tokens), combined with
      ``mask`` when both are given.

    * ``backend``: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or ``"triton"``
      (:mod:`pikv_press.kernels._dispatch`; the Triton path is :mod:`pikv_press.kernels.latent_attention_triton`,
      float32/float16/bfloat16 inputs).

    Returns ``out_latent`` ``(B, H, Q, R)`` in the dtype of ``q_latent`` and ``lse`` ``(B, H, Q)`` in float32: the
    natural-log sum of ``exp(logit)`` over the visible keys (``-inf`` and an output of zeros where no key is visible).
    Logits and the softmax are computed in float32 (at least), whatever the input dtype.
    """
    if q_latent.dim() != 4 or q_rope.dim() != 4 or q_latent.shape[:3] != q_rope.shape[:3]:
        raise ValueError(f"q_latent (B, H, Q, R) and q_rope (B, H, Q, Dr) must agree on (B, H, Q), got "
                         f"{tuple(q_latent.shape)} and {tuple(q_rope.shape)}.")
    latent, rope_key = _tokens(latent, "latent"), _tokens(rope_key, "rope_key")
    if latent.shape[:2] != rope_key.shape[:2]:
        raise ValueError(f"latent (B, K, R) and rope_key (B, K, Dr) must agree on (B, K), got {tuple(latent.shape)} "
                         f"and {tuple(rope_key.shape)}.")
    if q_latent.shape[-1] != latent.shape[-1] or q_rope.shape[-1] != rope_key.shape[-1]:
        raise ValueError(f"query widths {q_latent.shape[-1]} + {q_rope.shape[-1]} do not match the cache's "
                         f"kv_lora_rank {latent.shape[-1]} + rope dim {rope_key.shape[-1]}.")
    half_or_single = all(t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                         for t in (q_latent, q_rope, latent, rope_key))
    if use_triton(q_latent, q_rope, latent, rope_key, backend=backend, supported=half_or_single,
                  why_unsupported="float64 inputs", faster_on_gpu=False):  # x4.8-x7.3 slower on an H200
        return triton_module("latent_attention_triton").latent_attention(q_latent, q_rope, latent, rope_key, scaling,
                                                                          mask, is_causal)
    compute = torch.promote_types(q_latent.dtype, torch.float32)
    # (B, H, Q, K): the latent and the rotary key are shared by every head (a single "KV head" of width R + Dr)
    logits = torch.einsum("bhqr,bkr->bhqk", q_latent.to(compute), latent.to(compute))
    logits = logits + torch.einsum("bhqd,bkd->bhqk", q_rope.to(compute), rope_key.to(compute))
    logits = logits * scaling
    num_queries, num_keys = logits.shape[-2], logits.shape[-1]
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(compute)
    if is_causal:
        future = torch.ones(num_queries, num_keys, dtype=torch.bool, device=logits.device).triu(
            diagonal=num_keys - num_queries + 1)
        logits = logits.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, Q); -inf where nothing is visible
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(compute).min))
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with every key masked: -inf - (-inf)
    out = torch.einsum("bhqk,bkr->bhqr", weights, latent.to(compute))
    return out.to(q_latent.dtype), lse.float()


def _tokens(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, K, D)`` from ``(B, K, D)`` or the cache layout ``(B, 1, K, D)``."""
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        return tensor[:, 0]
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be (B, K, D) or (B, 1, K, D), got {tuple(tensor.shape)}.")
    return tensor
