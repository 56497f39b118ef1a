"""Triton path of :mod:`pikv_press.kernels.lowbit` (import through ``_dispatch.triton_module``).

* :func:`quantize`: quantize-and-pack in one kernel, the agreed format exactly (same codes, scales and zero points as
  the torch reference, bit for bit): groups along the last axis (``axis=-1``, KIVI's values; the group size must be a
  power of two) or along the second-to-last (``axis=-2``, KIVI's keys: groups of tokens, any group size), packing
  along the last dimension. Other axes take the reference (``supported`` tells the dispatcher).
* :func:`quantized_attention`: decode attention over keys packed per channel (``axis=-2``) and values packed per token
  (``axis=-1``), dequantized in registers tile by tile (:mod:`pikv_press.kernels.attention_triton`); its torch
  reference is :func:`pikv_press.kernels.lowbit_attention.quantized_attention` with ``backend="torch"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pikv_press.kernels._dispatch import interpreting, triton_module

INTERPRETED = interpreting()
attention_triton = triton_module("attention_triton")
cast_rtne = attention_triton.cast_rtne


@triton.jit
def _round_half_even(v):
    """``torch.round``: to the nearest integer, halves to the even one."""
    f = tl.floor(v)
    diff = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(diff > 0.5, f + 1.0, tl.where(diff < 0.5, f, f + odd))


@triton.jit
def _quantize_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr,
    T, D, PD, NG_D,
    BITS: tl.constexpr, GROUP: tl.constexpr, ALONG_LAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``x`` (M, T, D) contiguous -> packed (M, T, PD) uint8; scale/zero (M, T, D // GROUP) when ``ALONG_LAST``,
    else (M, T // GROUP, D). A program quantizes rows ``[pid_t * BLOCK_T, ...)`` of matrix ``pid_m``."""
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    m = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    if ALONG_LAST:
        t_ok = t < T
    else:  # one group of GROUP tokens per program (BLOCK_T = next power of two >= GROUP)
        t = tl.program_id(1) * GROUP + tl.arange(0, BLOCK_T)
        t_ok = tl.arange(0, BLOCK_T) < GROUP
    mask = t_ok[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + m * T * D + t[:, None].to(tl.int64) * D + d[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if ALONG_LAST:
        grouped = tl.reshape(xf, (BLOCK_T, BLOCK_D // GROUP, GROUP))
        lo = tl.min(grouped, axis=2)
        hi = tl.max(grouped, axis=2)
        span = tl.div_rn(hi - lo, LEVELS * 1.0)
        scale = cast_rtne(tl.where(span > 0.0, span, 1.0), x_ptr.dtype.element_ty)
        zero = lo.to(x_ptr.dtype.element_ty)
        gj = tl.arange(0, BLOCK_D // GROUP)
        s_mask = t_ok[:, None] & (gj < NG_D)[None, :]
        s_off = m * T * NG_D + t[:, None].to(tl.int64) * NG_D + gj[None, :]
        tl.store(scale_ptr + s_off, scale, mask=s_mask)
        tl.store(zero_ptr + s_off, zero, mask=s_mask)
        codes = _round_half_even(tl.div_rn(grouped - lo.to(tl.float32)[:, :, None],
                                           scale.to(tl.float32)[:, :, None]))
        codes = tl.reshape(codes, (BLOCK_T, BLOCK_D))
    else:
        lo = tl.where(d < D, tl.min(tl.where(mask, xf, float("inf")), axis=0), 0.0)  # padded columns: 0, not inf
        hi = tl.where(d < D, tl.max(tl.where(mask, xf, float("-inf")), axis=0), 0.0)
        span = tl.div_rn(hi - lo, LEVELS * 1.0)
        scale = cast_rtne(tl.where(span > 0.0, span, 1.0), x_ptr.dtype.element_ty)
        zero = lo.to(x_ptr.dtype.element_ty)
        s_off = m * (T // GROUP) * D + tl.program_id(1).to(tl.int64) * D + d
        tl.store(scale_ptr + s_off, scale, mask=d < D)
        tl.store(zero_ptr + s_off, zero, mask=d < D)
        codes = _round_half_even(tl.div_rn(xf - lo.to(tl.float32)[None, :], scale.to(tl.float32)[None, :]))
    codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS * 1.0).to(tl.int32)
    codes = tl.where(mask, codes, 0)
    shifts = tl.arange(0, PER_BYTE) * BITS
    packed = tl.sum(tl.reshape(codes, (BLOCK_T, BLOCK_D // PER_BYTE, PER_BYTE)) << shifts[None, None, :], axis=2)
    pd = tl.arange(0, BLOCK_D // PER_BYTE)
    tl.store(packed_ptr + m * T * PD + t[:, None].to(tl.int64) * PD + pd[None, :], packed.to(tl.uint8),
             mask=t_ok[:, None] & (pd < PD)[None, :])


NUM_WARPS = 4
_TILE_ELEMENTS = 4096  # elements of a program's tile


def block_tokens(block_d: int, group_size: int, along_last: bool, seq: int) -> int:
    """Tokens a program quantizes: a group of tokens (``axis=-2``) or up to ``4096 / head_dim`` rows."""
    if not along_last:
        return triton.next_power_of_2(group_size)
    return max(1, min(triton.next_power_of_2(seq), _TILE_ELEMENTS // block_d))


def quantize_supported(x: torch.Tensor, group_size: int, axis: int) -> tuple[bool, str]:
    """Whether the kernel handles this call, and why not."""
    if x.dim() < 2 or axis % x.dim() not in (x.dim() - 1, x.dim() - 2):
        return False, f"axis {axis} of a {x.dim()}-D tensor (the kernel groups along the last two axes)"
    if axis % x.dim() == x.dim() - 1 and group_size & (group_size - 1):
        return False, f"group_size {group_size} along the last axis is not a power of two"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"dtype {x.dtype}"
    return True, ""


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int,
             block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`pikv_press.kernels.lowbit.quantize` (inputs checked there)."""
    from pikv_press.kernels.lowbit import packed_length

    along_last = axis % x.dim() == x.dim() - 1
    *lead, seq, dim = x.shape
    flat = x.contiguous().reshape(-1, seq, dim)
    mats = flat.shape[0]
    pdim = packed_length(dim, bits)
    packed = torch.empty(mats, seq, pdim, dtype=torch.uint8, device=x.device)
    if along_last:
        stats_shape = (mats, seq, dim // group_size)
    else:
        stats_shape = (mats, seq // group_size, dim)
    scale = torch.empty(stats_shape, dtype=x.dtype, device=x.device)
    zero = torch.empty(stats_shape, dtype=x.dtype, device=x.device)
    per_byte = 8 // bits
    block_d = max(triton.next_power_of_2(dim), group_size if along_last else 1, per_byte)
    if along_last:
        block_t = block_t or block_tokens(block_d, group_size, True, seq)
        grid_t = triton.cdiv(seq, block_t)
    else:
        block_t = block_tokens(block_d, group_size, False, seq)
        grid_t = seq // group_size
    if mats and grid_t:
        _quantize_kernel[(mats, grid_t)](
            flat, packed, scale, zero, seq, dim, pdim, stats_shape[-1] if along_last else 1,
            BITS=bits, GROUP=group_size, ALONG_LAST=along_last, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
    return (packed.view(*lead, seq, pdim), scale.view(*lead, *stats_shape[1:]), zero.view(*lead, *stats_shape[1:]))


def quantized_attention(query: torch.Tensor, key_packed: torch.Tensor, key_scale: torch.Tensor,
                        key_zero: torch.Tensor, value_packed: torch.Tensor, value_scale: torch.Tensor,
                        value_zero: torch.Tensor, *, bits: int, value_bits: int, key_group_size: int,
                        value_group_size: int, head_dim: int, value_dim: int, scaling: float,
                        mask: torch.Tensor | None = None, split_size: int | None = None,
                        block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`pikv_press.kernels.lowbit_attention.quantized_attention` (inputs checked there)."""
    from pikv_press.kernels.sharded_attention_triton import additive_mask

    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key_packed.shape[1], key_packed.shape[2]
    if k_len == 0:
        return (query.new_zeros(batch, q_heads, q_len, value_dim),
                torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device))
    return attention_triton.decode_attention(
        query, key_packed, value_packed, scaling, kv_heads=kv_heads, num_keys=k_len, value_dim=value_dim,
        key_quant=(key_scale.contiguous(), key_zero.contiguous(), bits, key_group_size),
        value_quant=(value_scale.contiguous(), value_zero.contiguous(), value_bits, value_group_size),
        kv_dtype=key_scale.dtype, mask=additive_mask(mask, (batch, q_heads, q_len, k_len), query.device),
        split_size=split_size, block_n=block_n)
