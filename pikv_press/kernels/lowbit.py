"""Low-bit quantization and bit packing: the torch reference (CPU path and test oracle).

The agreed format (KIVI, arXiv 2402.02750, asymmetric min/max quantization in groups):

* groups of ``group_size`` consecutive elements along one ``axis``; per group
  ``scale = (max - min) / (2**bits - 1)`` (a group whose range is zero gets ``scale = 1``), ``zero = min``,
  ``q = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and ``x_hat = q * scale + zero``;
* ``scale`` and ``zero`` keep the input's dtype and its shape, with the grouped axis reduced to
  ``length // group_size`` groups; ``q`` is computed in fp32 from the *stored* (dtype-rounded) scale and zero, so
  that ``|x - x_hat| <= scale / 2`` holds exactly in fp32 (plus the output dtype's rounding otherwise);
* packing along the LAST dimension into ``uint8``: 8 bits = one value a byte, 4 bits = two (element ``2i`` in the
  low nibble, ``2i+1`` in the high nibble), 2 bits = four (element ``4i`` in bits 0-1, ``4i+1`` in bits 2-3, ...).
  A last dimension that is not a multiple of the values per byte is padded with zeros; ``unpack_bits`` takes the
  original length ``n`` back.

KIVI layout: keys are grouped per channel along the token axis (``axis=-2`` of ``(batch, kv_heads, seq,
head_dim)``), values per token along ``head_dim`` (``axis=-1``). Packing is along the last dimension in both cases.

This is the torch reference; :func:`quantize` dispatches to the Triton kernel of
:mod:`pikv_press.kernels.lowbit_triton` (same bits; ``backend``/``$PIKV_KERNELS``), and decode attention that
dequantizes on the fly is :mod:`pikv_press.kernels.lowbit_attention`. The kernels have run only through the Triton
interpreter on the CPU, never compiled on a GPU here.
"""

from __future__ import annotations

import torch

from pikv_press.kernels._dispatch import requested_backend, triton_module, true_divide, use_triton

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: packed low-bit storage takes bits in {SUPPORTED_BITS} (8 bits = one "
            "value a byte, 4 = two, 2 = four). Choose one of these."
        )
    return bits


def values_per_byte(bits: int) -> int:
    """How many ``bits``-bit values one ``uint8`` holds (1, 2 or 4)."""
    return 8 // _check_bits(bits)


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits take along the packed last dimension: ``ceil(n / values_per_byte)``."""
    per_byte = values_per_byte(bits)
    return -(-int(n) // per_byte)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``q`` (``uint8`` codes in ``[0, 2**bits)``) along its last dimension into ``uint8`` bytes.

    Returns a tensor whose last dimension is ``packed_length(q.shape[-1], bits)``; the other dimensions are unchanged.
    """
    _check_bits(bits)
    if q.dtype != torch.uint8:
        raise TypeError(f"pack_bits takes uint8 codes, got {q.dtype}: quantize first (or .to(torch.uint8)).")
    if q.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension to pack along (the last one).")
    if bits == 8:
        return q.contiguous()
    if q.numel() and int(q.max()) >= 1 << bits:
        raise ValueError(f"pack_bits got codes up to {int(q.max())}, which do not fit in {bits} bits (max "
                         f"{(1 << bits) - 1}).")
    per_byte = 8 // bits
    n = q.shape[-1]
    pad = packed_length(n, bits) * per_byte - n
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.reshape(*q.shape[:-1], -1, per_byte)
    packed = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for j in range(per_byte):
        packed |= q[..., j] << (bits * j)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` ``uint8`` codes along the last dimension."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits takes packed uint8 bytes, got {packed.dtype}.")
    if packed.dim() == 0:
        raise ValueError("unpack_bits needs at least one dimension (the packed last one).")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{n} values of {bits} bits take {packed_length(n, bits)} bytes, but the packed last "
                         f"dimension has {packed.shape[-1]}: pass the length the tensor had before packing.")
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def _check_group(length: int, group_size: int, axis: int, shape: tuple[int, ...]) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
    if length % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the length {length} of axis {axis} of a tensor of shape "
            f"{shape}: quantization groups must tile the axis. Choose a group size that divides {length} "
            "(for values grouped along head_dim, a divisor of head_dim)."
        )


def quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``axis`` and pack the codes.

    Returns ``(packed, scale, zero)``: ``packed`` is ``uint8`` with the last dimension packed
    (``packed_length(x.shape[-1], bits)`` bytes); ``scale`` and ``zero`` have ``x``'s dtype and shape except
    ``axis``, which has ``x.shape[axis] // group_size`` groups. ``ValueError`` if ``bits`` is not 2, 4 or 8 or
    ``group_size`` does not divide the axis. ``backend``: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or
    ``"triton"`` (:mod:`pikv_press.kernels.lowbit_triton`: the same bits; axes -1 with a power-of-two group size and
    -2 only, others take this reference under ``auto``).
    """
    _check_bits(bits)
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize takes a floating-point tensor, got {x.dtype}.")
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension.")
    axis = axis % x.dim() if -x.dim() <= axis < x.dim() else _bad_axis(axis, x.dim())
    length = x.shape[axis]
    _check_group(length, group_size, axis, tuple(x.shape))
    if use_triton(x, backend=backend):
        kernel = triton_module("lowbit_triton")
        supported, why = kernel.quantize_supported(x, group_size, axis)
        if supported:
            return kernel.quantize(x, bits, group_size, axis)
        if requested_backend(backend) == "triton":
            raise RuntimeError(f"the Triton quantize kernel does not handle {why}: use the torch reference "
                               "(PIKV_KERNELS=auto or torch).")
    levels = (1 << bits) - 1
    moved = x.movedim(axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], length // group_size, group_size)
    lo = grouped.amin(dim=-1)
    hi = grouped.amax(dim=-1)
    span = true_divide(hi.float() - lo.float(), levels)
    scale = torch.where(span > 0, span, torch.ones_like(span)).to(x.dtype)
    zero = lo
    # codes from the stored (dtype-rounded) scale and zero, in fp32
    q = torch.round((grouped.float() - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1))
    q = q.clamp_(0, levels).to(torch.uint8).reshape(moved.shape).movedim(-1, axis)
    return pack_bits(q.contiguous(), bits), scale.movedim(-1, axis).contiguous(), zero.movedim(-1, axis).contiguous()


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    length: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``q * scale + zero`` (in fp32, returned in ``dtype``, default ``scale.dtype``).

    ``length`` is the size of the LAST dimension before packing (``x.shape[-1]``); ``axis`` and ``group_size`` are
    those given to :func:`quantize`.
    """
    _check_bits(bits)
    q = unpack_bits(packed, bits, length)
    axis = axis % q.dim() if -q.dim() <= axis < q.dim() else _bad_axis(axis, q.dim())
    _check_group(q.shape[axis], group_size, axis, tuple(q.shape))
    groups = q.shape[axis] // group_size
    expected = list(q.shape)
    expected[axis] = groups
    if list(scale.shape) != expected or list(zero.shape) != expected:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} do not match codes "
                         f"{tuple(q.shape)} grouped by {group_size} along axis {axis} (expected {tuple(expected)}).")
    scale_full = scale.float().repeat_interleave(group_size, dim=axis)
    zero_full = zero.float().repeat_interleave(group_size, dim=axis)
    return (q.float() * scale_full + zero_full).to(dtype or scale.dtype)


def _bad_axis(axis: int, ndim: int) -> int:
    raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions.")
