"""Queries, keys and rotary embeddings of each family's attention, in one canonical layout.

kvpress's scorers rebuild queries as ``q_proj(h).view(b, s, heads, head_dim)``, rotate them with
``q * cos + rotate_half(q) * sin`` over the whole head and scale logits by ``1 / sqrt(head_dim)``. That is right for
Llama and wrong for most MoE families: Qwen3-MoE and OLMoE normalise queries, GPT-OSS has half-width rotary tables,
GLM-4-MoE may rotate only part of the head, DeepSeek's multi-head latent attention rotates a shared slice of keys that
are wider than values, Granite scales logits by ``attention_multiplier``.

:class:`AttentionLayout` describes one attention module exactly and maps it to a *canonical layout* in which kvpress's
formulas are exact: head dimensions are permuted so that every rotated pair ``(a, b)`` sits at ``(j, j + d/2)`` and
non-rotated dimensions pair up with ``cos = 1, sin = 0``; queries are pre-scaled so that ``q . k / sqrt(d)`` equals
the model's attention logit. Dot products are invariant under a permutation applied to both queries and keys, so
scores computed in the canonical layout are the model's own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pikv_press.moe.families import AttentionKind, FamilySpec, RopeStyle


class AttentionLayout:
    """Exact description of one attention module's queries, keys and rotary embedding.

    Shapes: hidden states ``(batch, seq, hidden)``; queries ``(batch, heads, seq, qk_dim)``; keys as stored in the
    cache ``(batch, kv_heads, seq, qk_dim)``, values ``(batch, kv_heads, seq, v_dim)``.
    """

    def __init__(self, module: nn.Module, family: FamilySpec, config):
        self.module = module
        self.family = family
        self.kind = family.attention
        if self.kind == AttentionKind.MLA:
            self.num_heads = module.num_heads
            self.num_kv_heads = module.num_heads  # MLA caches per-head keys and values
            self.qk_dim = module.qk_head_dim
            self.v_dim = module.v_head_dim
            self.nope_dim = module.qk_nope_head_dim
            self.rope_dim = module.qk_rope_head_dim
        else:
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.qk_dim = self.v_dim = module.head_dim
            self.nope_dim, self.rope_dim = 0, module.head_dim
        # The model's logits are q . k * scaling; kvpress divides by sqrt(head_dim): pre-scale queries to match.
        self.query_scale = float(module.scaling) * math.sqrt(self.qk_dim)
        self.complex_rope = family.rope_style == RopeStyle.COMPLEX
        """Complex ``freqs_cis`` instead of ``(cos, sin)``, rotating adjacent pairs (DeepSeek-V2)."""
        self.interleaved = family.rope_style == RopeStyle.INTERLEAVED_CONFIG and bool(
            getattr(module.config, "rope_interleave", False)
        )
        """Whether the RoPE slice is de-interleaved before rotation (DeepSeek-V3 ``rope_interleave``)."""
        self.pair_a, self.pair_b = self._rope_pairs(config)
        order = self._canonical_order(self.pair_a, self.pair_b)
        self.order = order
        """Permutation from cache layout to canonical layout: ``canonical = cache[..., order]`` (from the config)."""
        self._inverse = torch.argsort(order)
        self.identity = bool(torch.equal(order, torch.arange(self.qk_dim)))
        """Whether the cache layout already is the canonical one (Llama-like families)."""

    # -- rotary structure ------------------------------------------------------------------------------------------
    def _rope_pairs(self, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Head dims ``a[j], b[j]`` rotated together by pair ``j`` (``x_a' = x_a cos - x_b sin``,
        ``x_b' = x_b cos + x_a sin``), in cache layout, from the config alone."""
        if self.kind == AttentionKind.MLA:
            pairs = self.rope_dim // 2
            j = torch.arange(pairs)
            if self.complex_rope:
                return self.nope_dim + 2 * j, self.nope_dim + 2 * j + 1
            return self.nope_dim + j, self.nope_dim + j + pairs
        if self.kind == AttentionKind.HALF_ROPE:  # one table entry per pair; the halves of the head are paired
            j = torch.arange(self.qk_dim // 2)
            return j, j + self.qk_dim // 2
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        factor = rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        pairs = int(self.qk_dim * factor) // 2  # the rotated slice: whole head, or a partial prefix (GLM)
        j = torch.arange(pairs)
        return j, j + pairs

    @property
    def rope_pairs(self) -> int:
        return self.pair_a.numel()

    def rope_angles(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair ``(cos, sin)`` ``(batch, seq, pairs)`` of the rotary tables (pairs ``pair_a``/``pair_b``)."""
        if self.complex_rope:
            cos, sin = position_embeddings.real, position_embeddings.imag
        else:
            cos, sin = position_embeddings
            if self.kind != AttentionKind.HALF_ROPE:  # full tables repeat each pair's angle in both halves
                cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
        if cos.shape[-1] != self.rope_pairs:
            raise ValueError(
                f"{type(self.module).__name__}: the rotary tables rotate {cos.shape[-1]} pairs but the "
                f"{self.family.name} config says {self.rope_pairs}. This transformers version lays the model out "
                "differently from what pikv-press knows; please report it."
            )
        return cos, sin

    def _canonical_order(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rotated = torch.zeros(self.qk_dim, dtype=torch.bool)
        rotated[a] = True
        rotated[b] = True
        passive = torch.nonzero(~rotated).flatten()
        half = passive.numel() // 2
        return torch.cat([a, passive[:half], b, passive[half:]])

    def canonical_rope(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width ``(cos, sin)`` ``(batch, seq, qk_dim)`` for ``q * cos + rotate_half(q) * sin`` (canonical)."""
        cos, sin = self.rope_angles(position_embeddings)
        passive = (self.qk_dim - 2 * self.rope_pairs) // 2
        ones = cos.new_ones(*cos.shape[:-1], passive)
        zeros = sin.new_zeros(*sin.shape[:-1], passive)
        return torch.cat([cos, ones, cos, ones], dim=-1), torch.cat([sin, zeros, sin, zeros], dim=-1)

    @property
    def needs_cache_transform(self) -> bool:
        """Whether cached keys/values differ from the canonical layout (GLM partial RoPE, MLA)."""
        return not self.identity or self.v_dim != self.qk_dim

    def keys_to_canonical(self, keys: torch.Tensor) -> torch.Tensor:
        return keys if self.identity else keys[..., self.order.to(keys.device)]

    def keys_from_canonical(self, keys: torch.Tensor) -> torch.Tensor:
        return keys if self.identity else keys[..., self._inverse.to(keys.device)]

    def values_to_canonical(self, values: torch.Tensor) -> torch.Tensor:
        """Zero-pad values to the key width (gathers and norms are unchanged by zero padding)."""
        if self.v_dim == self.qk_dim:
            return values
        return nn.functional.pad(values, (0, self.qk_dim - self.v_dim))

    def values_from_canonical(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.v_dim == self.qk_dim else values[..., : self.v_dim].contiguous()

    # -- projections -----------------------------------------------------------------------------------------------
    def prerope_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries before RoPE, in cache layout, unscaled: ``(batch, heads, seq, qk_dim)``."""
        m = self.module
        bsz, seq, _ = hidden_states.shape
        if self.kind == AttentionKind.MLA:
            if getattr(m, "q_lora_rank", None) is None:
                q = m.q_proj(hidden_states)
            else:
                q = m.q_b_proj(m.q_a_layernorm(m.q_a_proj(hidden_states)))
            q = q.view(bsz, seq, -1, self.qk_dim).transpose(1, 2)
            return self._deinterleave(q)
        if self.kind == AttentionKind.QK_NORM_FULL:
            return m.q_norm(m.q_proj(hidden_states)).view(bsz, seq, -1, self.qk_dim).transpose(1, 2)
        q = m.q_proj(hidden_states).view(bsz, seq, -1, self.qk_dim)
        if self._has_head_norm():
            q = m.q_norm(q)
        return q.transpose(1, 2)

    def prerope_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Keys before RoPE, in cache layout: ``(batch, kv_heads, seq, qk_dim)``."""
        m = self.module
        bsz, seq, _ = hidden_states.shape
        if self.kind == AttentionKind.MLA:
            compressed = m.kv_a_proj_with_mqa(hidden_states)
            k_pass, k_rot = torch.split(compressed, [m.kv_lora_rank, self.rope_dim], dim=-1)
            k_pass = m.kv_b_proj(m.kv_a_layernorm(k_pass)).view(bsz, seq, -1, self.nope_dim + self.v_dim)
            k_pass = k_pass[..., : self.nope_dim].transpose(1, 2)
            k_rot = k_rot.view(bsz, 1, seq, self.rope_dim).expand(-1, k_pass.shape[1], -1, -1)
            return self._deinterleave(torch.cat([k_pass, k_rot], dim=-1))
        if self.kind == AttentionKind.QK_NORM_FULL:
            return m.k_norm(m.k_proj(hidden_states)).view(bsz, seq, -1, self.qk_dim).transpose(1, 2)
        k = m.k_proj(hidden_states).view(bsz, seq, -1, self.qk_dim)
        if self._has_head_norm():
            k = m.k_norm(k)
        return k.transpose(1, 2)

    def _has_head_norm(self) -> bool:
        if self.kind == AttentionKind.QK_NORM_HEAD:
            return getattr(self.module, "use_qk_norm", True) and hasattr(self.module, "q_norm")
        return getattr(self.module, "use_qk_norm", False) and hasattr(self.module, "q_norm")

    def _deinterleave(self, states: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 with ``rope_interleave`` de-interleaves the RoPE slice before rotating (cache layout)."""
        if not self.interleaved:
            return states
        nope, rot = states[..., : self.nope_dim], states[..., self.nope_dim :]
        b, h, s, d = rot.shape
        rot = rot.reshape(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
        return torch.cat([nope, rot], dim=-1)

    def canonical_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries in canonical layout, scaled so that ``q . k / sqrt(qk_dim)`` is the model's logit."""
        q = self.prerope_queries(hidden_states) * self.query_scale
        return self.keys_to_canonical(q)

    def canonical_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.keys_to_canonical(self.prerope_keys(hidden_states))
