"""Triton split-K decode attention (flash-decoding) and the exact log-sum-exp merge; import through
``_dispatch.triton_module`` (not public: the dispatching functions live in ``sharded_attention_triton``,
``lowbit_triton`` and ``latent_attention_triton``).

One kernel serves three caches, chosen by compile-time flags:

* plain keys and values ``(B, Hkv, K, D)`` / ``(B, Hkv, K, Dv)``
  (:func:`pikv_press.kernels.sharded_attention.partial_attention`);
* a second key piece and a second query piece whose logits add to the first (``q . k + q2 . k2``) and values that are
  the first key piece (MLA's latent cache: ``latent`` is key and value, ``rope_key`` the second piece; one "KV head");
* keys and values packed in the agreed low-bit format (:mod:`pikv_press.kernels.lowbit`, KIVI layout: keys quantized
  per channel in groups of tokens, values per token in groups of channels), dequantized in registers tile by tile,
  rounded to the cache dtype as the reference's ``dequantize`` does, never written out in full precision.

Grid: (batch x kv heads, key splits, row blocks). A program holds up to 64 of the ``group x Q`` query rows of one kv
head (:func:`launch_config`; GQA without repeating keys; many queries, as in a prefill, take several row blocks), walks
its split of the keys in blocks with an online softmax in float32, and writes a partial output and log-sum-exp;
:func:`merge` combines the splits (and, for ``merge_partials``, shards) exactly. Products use ``tl.dot`` on float32
tiles with ``input_precision="ieee"`` (no TF32), so half-precision inputs are widened first. Made for decoding: a
prefill runs (every row block reads every key, no causal block skipping) but is not what it is tuned for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pikv_press.kernels._dispatch import interpreting

INTERPRETED = interpreting()
_DOT_MIN = 16  # tl.dot needs every tile side >= 16
NUM_WARPS = 8
_TILE_ELEMENTS = 8192  # float32 elements of the query-rows x head-dim tile and of the keys x head-dim tile


def launch_config(rows_per_head: int, block_d: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_N)``: query rows a program holds and keys a step, sized so that the float32 tiles fit in
    registers at ``NUM_WARPS`` warps (checked without a GPU by compiling for sm_90 with Triton's ptxas:
    ``tests/kernel_compile_check.py`` reports no spills for these sizes)."""
    block_r = min(max(triton.next_power_of_2(rows_per_head), _DOT_MIN), max(_DOT_MIN, _TILE_ELEMENTS // block_d))
    block_n = 32 if block_r * block_d <= _TILE_ELEMENTS // 2 else _DOT_MIN
    return block_r, block_n


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """``x`` (float32) in ``DTYPE``, rounded to nearest even also for bfloat16 (the interpreter truncates a plain
    float32 -> bfloat16 cast; compiled Triton rounds to nearest even, as torch does)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _load_codes(ptr, rows, cols, s_row, s_col, mask, BITS: tl.constexpr):
    """Unpacked codes of a ``(rows, cols)`` tile of a uint8 tensor packed along ``cols`` (agreed format)."""
    per_byte: tl.constexpr = 8 // BITS
    byte = tl.load(ptr + rows[:, None] * s_row + (cols // per_byte)[None, :] * s_col, mask=mask, other=0)
    return (byte.to(tl.int32) >> ((cols % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _decode_attention_kernel(
    q_ptr, q_sb, q_sh, q_sq, q_sd,
    q2_ptr, q2_sb, q2_sh, q2_sq, q2_sd,
    k_ptr, k_sb, k_sh, k_st, k_sd,
    ks_ptr, ks_sb, ks_sh, ks_st, ks_sd,
    kz_ptr,
    k2_ptr, k2_sb, k2_sh, k2_st, k2_sd,
    v_ptr, v_sb, v_sh, v_st, v_sd,
    vs_ptr, vs_sb, vs_sh, vs_st, vs_sd,
    vz_ptr,
    m_ptr, m_sb, m_sh, m_sq, m_sk,
    po_ptr, pl_ptr,
    HKV, GROUP, Q, K, D, D2, DV, SPLIT, ROWS_TOTAL, scaling, causal_offset,
    HAS_Q2: tl.constexpr, QUANT: tl.constexpr, VALUE_IS_KEY: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
    KV_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    g = (pid_bh % HKV).to(tl.int64)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < GROUP * Q
    head = g * GROUP + r // Q
    qi = r % Q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * q_sb + head[:, None] * q_sh + qi[:, None] * q_sq + d[None, :] * q_sd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    d2 = tl.arange(0, BLOCK_D2)
    if HAS_Q2:
        q2 = tl.load(q2_ptr + b * q2_sb + head[:, None] * q2_sh + qi[:, None] * q2_sq + d2[None, :] * q2_sd,
                     mask=row_ok[:, None] & (d2 < D2)[None, :], other=0.0).to(tl.float32)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_DV], 0.0, dtype=tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, K)
    for n0 in range(start, end, BLOCK_N):
        t = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        t_ok = t < end
        kmask = t_ok[:, None] & d_ok[None, :]
        if QUANT:
            codes = _load_codes(k_ptr + b * k_sb + g * k_sh, t, d, k_st, k_sd, kmask, K_BITS)
            s_off = b * ks_sb + g * ks_sh + (t // K_GROUP)[:, None] * ks_st + d[None, :] * ks_sd
            scale = tl.load(ks_ptr + s_off, mask=kmask, other=0.0).to(tl.float32)
            zero = tl.load(kz_ptr + s_off, mask=kmask, other=0.0).to(tl.float32)
            k = cast_rtne(codes.to(tl.float32) * scale + zero, KV_DTYPE).to(tl.float32)
        else:
            k = tl.load(k_ptr + b * k_sb + g * k_sh + t[:, None] * k_st + d[None, :] * k_sd, mask=kmask,
                        other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if HAS_Q2:
            k2 = tl.load(k2_ptr + b * k2_sb + g * k2_sh + t[:, None] * k2_st + d2[None, :] * k2_sd,
                         mask=t_ok[:, None] & (d2 < D2)[None, :], other=0.0).to(tl.float32)
            s = s + tl.dot(q2, tl.trans(k2), input_precision="ieee")
        s = s * scaling
        if HAS_MASK:
            s = s + tl.load(m_ptr + b * m_sb + head[:, None] * m_sh + qi[:, None] * m_sq + t[None, :] * m_sk,
                            mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        visible = t_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (t[None, :] <= causal_offset + qi[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        finite = m_new > float("-inf")
        alpha = tl.where(finite, tl.exp(m_i - tl.where(finite, m_new, 0.0)), 1.0)
        p = tl.where(finite[:, None], tl.exp(s - tl.where(finite, m_new, 0.0)[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vmask = t_ok[:, None] & dv_ok[None, :]
        if VALUE_IS_KEY:
            v = k
        elif QUANT:
            codes = _load_codes(v_ptr + b * v_sb + g * v_sh, t, dv, v_st, v_sd, vmask, V_BITS)
            s_off = b * vs_sb + g * vs_sh + t[:, None] * vs_st + (dv // V_GROUP)[None, :] * vs_sd
            scale = tl.load(vs_ptr + s_off, mask=vmask, other=0.0).to(tl.float32)
            zero = tl.load(vz_ptr + s_off, mask=vmask, other=0.0).to(tl.float32)
            v = cast_rtne(codes.to(tl.float32) * scale + zero, KV_DTYPE).to(tl.float32)
        else:
            v = tl.load(v_ptr + b * v_sb + g * v_sh + t[:, None] * v_st + dv[None, :] * v_sd, mask=vmask,
                        other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    rows = pid_bh.to(tl.int64) * GROUP * Q + r
    part = split.to(tl.int64) * ROWS_TOTAL + rows
    tl.store(po_ptr + part[:, None] * DV + dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(pl_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    po_ptr, p_sp, p_sr, p_sd, pl_ptr, l_sp, l_sr, out_ptr, o_sr, o_sd, lse_ptr,
    N_PART, ROWS, DV, BLOCK_ROWS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_ok = rows < ROWS
    dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (dv < DV)[None, :]
    top = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    for i in range(N_PART):
        top = tl.maximum(top, tl.load(pl_ptr + i * l_sp + rows * l_sr, mask=row_ok, other=float("-inf")))
    finite = top > float("-inf")
    shift = tl.where(finite, top, 0.0)
    total = tl.full([BLOCK_ROWS], 0.0, dtype=tl.float32)
    for i in range(N_PART):
        total += tl.exp(tl.load(pl_ptr + i * l_sp + rows * l_sr, mask=row_ok, other=float("-inf")) - shift)
    merged = tl.where(finite, shift + tl.log(tl.where(finite, total, 1.0)), float("-inf"))
    acc = tl.full([BLOCK_ROWS, BLOCK_DV], 0.0, dtype=tl.float32)
    for i in range(N_PART):
        lse_i = tl.load(pl_ptr + i * l_sp + rows * l_sr, mask=row_ok, other=float("-inf"))
        weight = tl.where(finite, tl.exp(lse_i - tl.where(finite, merged, 0.0)), 0.0)
        part = tl.load(po_ptr + i * p_sp + rows[:, None] * p_sr + dv[None, :] * p_sd, mask=mask, other=0.0)
        acc += weight[:, None] * part.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * o_sr + dv[None, :] * o_sd, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, merged, mask=row_ok)


def merge_block_rows(value_dim: int) -> int:
    """Rows a merge program combines: a (rows, value_dim) float32 tile of at most 2048 elements."""
    return max(2, min(16, 2048 // max(triton.next_power_of_2(value_dim), 1)))


def merge(parts: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype,
          block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials ``parts`` ``(n, rows, Dv)`` with ``lses`` ``(n, rows)`` float32: ``(out (rows, Dv), lse
    (rows,))``."""
    n, rows, dv = parts.shape
    out = torch.empty(rows, dv, dtype=out_dtype, device=parts.device)
    lse = torch.empty(rows, dtype=torch.float32, device=parts.device)
    block_rows = block_rows or merge_block_rows(dv)
    if rows:
        _merge_kernel[(triton.cdiv(rows, block_rows),)](
            parts, *parts.stride(), lses, *lses.stride(), out, *out.stride(), lse, n, rows, dv,
            BLOCK_ROWS=block_rows, BLOCK_DV=max(triton.next_power_of_2(dv), 1),
        )
    return out, lse


_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _args(t: torch.Tensor | None, dummy: torch.Tensor, ndim: int = 4) -> tuple:
    """``(tensor, *strides)`` of a 4-D view (a 3-D ``(B, K, D)`` tensor gets a zero head stride)."""
    if t is None:
        return (dummy, *([0] * ndim))
    if t.dim() == 3:
        return (t, t.stride(0), 0, t.stride(1), t.stride(2))
    return (t, *t.stride())


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    scaling: float,
    *,
    kv_heads: int,
    num_keys: int,
    value_dim: int,
    query2: torch.Tensor | None = None,
    key2: torch.Tensor | None = None,
    key_quant: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    value_quant: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    kv_dtype: torch.dtype = torch.float32,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    split_size: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch split-K attention then the merge; returns ``(out (B, Hq, Q, Dv) in query's dtype, lse (B, Hq, Q))``.

    ``key``/``value`` are ``(B, Hkv, K, ·)`` (or ``(B, K, ·)`` for one kv head), packed ``uint8`` when
    ``key_quant``/``value_quant`` = ``(scale, zero, bits, group_size)`` are given; ``value=None`` reads the values
    from ``key`` (``value_dim`` must equal its width). ``mask`` is additive float32, expanded to ``(B, Hq, Q, K)``
    (zero strides allowed). Inputs are checked by the callers.
    """
    batch, q_heads, q_len, dim = query.shape
    group = q_heads // kv_heads
    rows_per_head = group * q_len
    rows_total = batch * kv_heads * rows_per_head
    device = query.device
    if split_size is None:
        split_size = 512 if num_keys > 4096 else max(num_keys, 1)
    splits = max(triton.cdiv(num_keys, split_size), 1)
    dim2 = query2.shape[-1] if query2 is not None else 1
    block_d = max(triton.next_power_of_2(dim), _DOT_MIN)
    block_dv = max(triton.next_power_of_2(value_dim), _DOT_MIN)
    if value is None:
        block_dv = block_d
    parts = torch.empty(splits, rows_total, value_dim, dtype=torch.float32, device=device)
    lses = torch.empty(splits, rows_total, dtype=torch.float32, device=device)
    k_scale, k_zero, k_bits, k_group = key_quant if key_quant is not None else (None, None, 8, 1)
    v_scale, v_zero, v_bits, v_group = value_quant if value_quant is not None else (None, None, 8, 1)
    block_r, default_block_n = launch_config(rows_per_head, max(block_d, block_dv))
    block_n = default_block_n if block_n is None else block_n
    _decode_attention_kernel[(batch * kv_heads, splits, triton.cdiv(rows_per_head, block_r))](
        *_args(query, query), *_args(query2, query),
        *_args(key, query), *_args(k_scale, query), k_zero if k_zero is not None else query,
        *_args(key2, query),
        *_args(value, query), *_args(v_scale, query), v_zero if v_zero is not None else query,
        *_args(mask, query),
        parts, lses,
        kv_heads, group, q_len, num_keys, dim, dim2, value_dim, split_size, rows_total, float(scaling),
        num_keys - q_len,
        HAS_Q2=query2 is not None, QUANT=key_quant is not None, VALUE_IS_KEY=value is None,
        HAS_MASK=mask is not None, CAUSAL=bool(causal), K_BITS=k_bits, K_GROUP=k_group, V_BITS=v_bits,
        V_GROUP=v_group, KV_DTYPE=_TORCH_TO_TL[kv_dtype],
        BLOCK_R=block_r, BLOCK_N=max(block_n, _DOT_MIN),
        BLOCK_D=block_d, BLOCK_D2=max(triton.next_power_of_2(dim2), _DOT_MIN), BLOCK_DV=block_dv,
        num_warps=NUM_WARPS,
    )
    out, lse = merge(parts, lses, query.dtype)
    return out.view(batch, q_heads, q_len, value_dim), lse.view(batch, q_heads, q_len)
