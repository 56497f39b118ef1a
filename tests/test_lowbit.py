"""pikv_press.kernels.lowbit: the agreed low-bit format (packing layout, round trip bounds, validation)."""

import pytest
import torch

from pikv_press.kernels.lowbit import dequantize, pack_bits, packed_length, quantize, unpack_bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 13])
def test_pack_unpack_round_trip(bits, n):
    gen = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(0, 1 << bits, (2, 3, n), generator=gen, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, -(-n * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, n), q)


def test_pack_layout_is_the_agreed_one():
    # int4: element 2i in the low nibble, 2i+1 in the high nibble
    q4 = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    assert pack_bits(q4, 4).tolist() == [1 | 2 << 4, 15, 7]
    # int2: element 4i in bits 0-1, 4i+1 in bits 2-3, ...
    q2 = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_bits(q2, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    assert pack_bits(q2, 8).tolist() == q2.tolist()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [1, 4, 16])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_round_trip_within_half_a_step(bits, group_size, axis):
    gen = torch.Generator().manual_seed(bits + group_size)
    x = torch.randn(2, 3, 32, 16, generator=gen) * 3
    packed, scale, zero = quantize(x, bits, group_size, axis)
    expected = list(x.shape)
    expected[axis] = x.shape[axis] // group_size
    assert list(scale.shape) == expected and list(zero.shape) == expected
    assert scale.dtype == zero.dtype == x.dtype
    assert packed.shape[-1] == packed_length(x.shape[-1], bits)
    x_hat = dequantize(packed, scale, zero, bits, group_size, axis, x.shape[-1], torch.float32)
    step = scale.repeat_interleave(group_size, dim=axis)
    err = (x - x_hat).abs()
    # the maths: |x - x_hat| <= scale / 2, with a few ulps of fp32 slack
    assert bool((err <= step / 2 + 1e-5 * x.abs().amax()).all())
    # the minimum of each group gets code 0 and comes back exactly
    moved = x_hat.movedim(axis, -1)
    group_min = moved.reshape(*moved.shape[:-1], -1, group_size).amin(dim=-1).movedim(-1, axis)
    assert torch.equal(group_min, zero)


def test_constant_group_gets_scale_one_and_is_exact():
    x = torch.full((1, 1, 4, 8), 2.5)
    packed, scale, zero = quantize(x, 4, 4, -1)
    assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(zero, torch.full_like(zero, 2.5))
    assert torch.equal(dequantize(packed, scale, zero, 4, 4, -1, 8), x)


def test_codes_match_the_formula_exactly():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 10.5, 11.0, 13.0]])
    packed, scale, zero = quantize(x, 2, 4, -1)
    assert scale.tolist() == [[1.0, 1.0]] and zero.tolist() == [[0.0, 10.0]]
    assert unpack_bits(packed, 2, 8).tolist() == [[0, 1, 2, 3, 0, 0, 1, 3]]  # round(0.5) = 0 (half to even)


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        quantize(x, 3, 2, -1)
    with pytest.raises(ValueError, match="does not divide the length 6"):
        quantize(x, 4, 4, -1)
    with pytest.raises(ValueError, match="fit in 2 bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.tensor([1]), 4)
    with pytest.raises(ValueError, match="pass the length"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="out of range"):
        quantize(x, 4, 2, 3)
