"""Triton kernel of :mod:`pikv_press.kernels.select` (import through ``_dispatch.triton_module``; not public).

One program per (batch, kv head) row:

1. radix search, 4 bits a pass (8 passes over the row's scores, 16 candidate thresholds counted at once): the
   ``n``-th largest order-preserving ``uint32`` key of the float32 scores, exactly, without sorting;
2. one pass that counts the keys above that threshold, then one pass (in smaller steps, so that a step's key and value
   rows fit in registers) that keeps every key above it and the first ties in index order, writes the kept positions
   at the row's offset (prefix sums) and copies the kept keys and values rows (masked loads: only kept rows are
   read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pikv_press.kernels._dispatch import interpreting

INTERPRETED = interpreting()
RADIX_BITS = 4


@triton.jit
def _order_key(x):
    """Order-preserving uint32 key of float32 ``x`` (``-0.0`` is first turned into ``0.0``)."""
    bits = (x + 0.0).to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _select_kernel(
    scores_ptr, s_sb, s_sh, s_st,
    budgets_ptr, offsets_ptr, idx_ptr,
    k_ptr, k_sb, k_sh, k_st, k_sd,
    v_ptr, v_sb, v_sh, v_st, v_sd,
    ko_ptr, vo_ptr,
    H, S, D, DV,
    GATHER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_KEEP: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    n = tl.load(budgets_ptr + row)
    out_start = tl.load(offsets_ptr + row)
    s_base = scores_ptr + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    lanes = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16).to(tl.uint32)

    # 1. the n-th largest key, 4 bits a pass from the top
    threshold = tl.zeros([1], dtype=tl.uint32)
    for p in tl.static_range(8):
        shift = 28 - 4 * p
        cand = threshold | (digits << shift)  # (16,)
        counts = tl.zeros([16], dtype=tl.int32)
        for start in range(0, S, BLOCK):
            offs = start + lanes
            inside = offs < S
            u = _order_key(tl.load(s_base + offs.to(tl.int64) * s_st, mask=inside, other=0.0).to(tl.float32))
            ge = (u[:, None] >= cand[None, :]) & inside[:, None]
            counts += tl.sum(ge.to(tl.int32), axis=0)
        # counts fall with the digit; counts[0] >= n always holds, so the best digit is (#digits with count >= n) - 1
        best = tl.sum((counts >= n).to(tl.int32), axis=0) - 1
        threshold = threshold | (best.to(tl.uint32) << shift)

    # 2. how many keys lie strictly above it; the rest of the budget goes to the first ties
    above = tl.zeros([1], dtype=tl.int32)
    for start in range(0, S, BLOCK):
        offs = start + lanes
        inside = offs < S
        u = _order_key(tl.load(s_base + offs.to(tl.int64) * s_st, mask=inside, other=0.0).to(tl.float32))
        above += tl.sum(((u > threshold) & inside).to(tl.int32), axis=0)
    ties_needed = n - above

    # 3. keep, write positions, gather rows
    kept_before = tl.zeros([1], dtype=tl.int32)
    ties_before = tl.zeros([1], dtype=tl.int32)
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    v_base = v_ptr + b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh
    for start in range(0, S, BLOCK_KEEP):
        offs = start + tl.arange(0, BLOCK_KEEP)
        inside = offs < S
        u = _order_key(tl.load(s_base + offs.to(tl.int64) * s_st, mask=inside, other=0.0).to(tl.float32))
        tie = ((u == threshold) & inside).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = ((u > threshold) & inside) | ((tie == 1) & (tie_rank < ties_needed))
        keep_i = keep.to(tl.int32)
        dst = out_start + (kept_before + tl.cumsum(keep_i, axis=0) - keep_i).to(tl.int64)
        tl.store(idx_ptr + dst, offs.to(tl.int64), mask=keep)
        if GATHER:
            t64 = offs.to(tl.int64)
            kmask = keep[:, None] & (dk < D)[None, :]
            krows = tl.load(k_base + t64[:, None] * k_st + dk[None, :] * k_sd, mask=kmask)
            tl.store(ko_ptr + dst[:, None] * D + dk[None, :], krows, mask=kmask)
            vmask = keep[:, None] & (dv < DV)[None, :]
            vrows = tl.load(v_base + t64[:, None] * v_st + dv[None, :] * v_sd, mask=vmask)
            tl.store(vo_ptr + dst[:, None] * DV + dv[None, :], vrows, mask=vmask)
        kept_before += tl.sum(keep_i, axis=0)
        ties_before += tl.sum(tie, axis=0)


SEARCH_BLOCK = 1024  # tokens a step of the radix search
GATHER_BLOCK = 32  # tokens a step of the keep-and-gather pass (a (32, head_dim) tile stays in registers)
NUM_WARPS = 4


def select_ragged(scores: torch.Tensor, budgets: torch.Tensor, keys: torch.Tensor | None,
                  values: torch.Tensor | None, block: int | None = None):
    """Launch the kernel; inputs are checked by :mod:`pikv_press.kernels.select`. ``block``: tokens per step of
    every pass (tests use a small one to cross many blocks)."""
    from pikv_press.kernels.select import RaggedKV

    batch, heads, seq = scores.shape
    rows = batch * heads
    budgets = budgets.to(device=scores.device, dtype=torch.int64)
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=scores.device)
    offsets[1:] = budgets.reshape(-1).cumsum(0)
    total = int(offsets[-1])
    indices = torch.empty(total, dtype=torch.int64, device=scores.device)
    gather = keys is not None
    if gather:
        out_k = keys.new_empty(total, keys.shape[-1])
        out_v = values.new_empty(total, values.shape[-1])
        k_args, v_args = (keys, *keys.stride()), (values, *values.stride())
        dim, vdim = keys.shape[-1], values.shape[-1]
    else:
        out_k = out_v = indices
        k_args = v_args = (indices, 0, 0, 0, 0)
        dim = vdim = 1
    if rows and seq and total:
        _select_kernel[(rows,)](
            scores, *scores.stride(), budgets.reshape(-1).contiguous(), offsets, indices,
            *k_args, *v_args, out_k, out_v, heads, seq, dim, vdim,
            GATHER=gather, BLOCK=block or SEARCH_BLOCK, BLOCK_KEEP=block or (GATHER_BLOCK if gather else SEARCH_BLOCK),
            BLOCK_D=triton.next_power_of_2(dim), BLOCK_DV=triton.next_power_of_2(vdim), num_warps=NUM_WARPS,
        )
    return RaggedKV(out_k if gather else None, out_v if gather else None, indices, offsets)


def select_and_compact_ragged(scores, keys, values, budgets, block: int | None = None):
    return select_ragged(scores, budgets, keys, values, block=block)
