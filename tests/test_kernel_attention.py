"""Triton attention kernels (run by the Triton interpreter on the CPU) against their torch references: sharded
partial attention (split-K) and the log-sum-exp merge, low-bit quantize-and-pack (bit-exact) and attention over the
packed cache, MLA latent decode. Odd lengths, GQA ratios, head dims 64/128 and 192/128, fp32/fp16/bf16, seeds."""

from __future__ import annotations

import pytest
import torch

from pikv_press.kernels import latent_attention as latent_ref
from pikv_press.kernels import lowbit
from pikv_press.kernels import sharded_attention as sharded_ref
from pikv_press.kernels._dispatch import triton_module
from pikv_press.kernels.lowbit_attention import quantized_attention
from tests.triton_interpreter import DEVICE, assert_all_same, interpreter  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("interpreter")


def randn(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def assert_close_attention(ref, tri):
    """Outputs equal up to float32 rounding (the online softmax sums in another order), then the output dtype's."""
    (out_r, lse_r), (out_t, lse_t) = ref, tri
    assert out_t.dtype == out_r.dtype and out_t.shape == out_r.shape and lse_t.dtype == torch.float32
    assert torch.equal(torch.isinf(lse_r), torch.isinf(lse_t))
    torch.testing.assert_close(lse_t, lse_r, atol=2e-5, rtol=1e-5)
    if out_r.dtype == torch.float32:
        torch.testing.assert_close(out_t, out_r, atol=2e-5, rtol=1e-5)
    else:  # one rounding of the output dtype apart at most
        torch.testing.assert_close(out_t.float(), out_r.float(), atol=1e-3, rtol=2 ** -7)


SHARDED = [  # batch, q_heads, kv_heads, q_len, k_len, dim, value_dim, dtype, seed
    (2, 4, 2, 1, 37, 64, 64, torch.float32, 0),
    (1, 8, 2, 3, 100, 128, 128, torch.bfloat16, 1),
    (1, 4, 4, 1, 51, 192, 128, torch.float16, 2),
    (1, 8, 1, 9, 40, 64, 64, torch.float32, 3),  # 72 query rows a kv head: two row blocks
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,k_len,dim,value_dim,dtype,seed", SHARDED)
def test_partial_attention_and_merge(batch, q_heads, kv_heads, q_len, k_len, dim, value_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    query = randn(batch, q_heads, q_len, dim, dtype=dtype, gen=gen)
    key = randn(batch, kv_heads, k_len, dim, dtype=dtype, gen=gen)
    value = randn(batch, kv_heads, k_len, value_dim, dtype=dtype, gen=gen)
    mask = torch.rand(batch, 1, q_len, k_len, generator=gen).to(DEVICE) > 0.3
    mask[..., 0, :] = False  # a query row that sees nothing: out 0, lse -inf
    kernel = triton_module("sharded_attention_triton")
    scaling = dim ** -0.5
    ref = sharded_ref.partial_attention(query, key, value, scaling, mask, backend="torch")
    assert_close_attention(ref, kernel.partial_attention(query, key, value, scaling, mask, split_size=16,
                                                         block_n=16))
    assert_close_attention(ref, sharded_ref.partial_attention(query, key, value, scaling, mask, backend="triton"))
    additive = torch.where(mask, 0.0, float("-inf")) + randn(1, q_heads, q_len, k_len, gen=gen)
    assert_close_attention(sharded_ref.partial_attention(query, key, value, scaling, additive, backend="torch"),
                           sharded_ref.partial_attention(query, key, value, scaling, additive, backend="triton"))
    # shards merged (an empty one among them) equal one attention over all keys
    cut = k_len // 3
    parts = [sharded_ref.partial_attention(query, key[:, :, a:b], value[:, :, a:b], scaling, mask[..., a:b],
                                           backend="triton") for a, b in ((0, cut), (cut, cut), (cut, k_len))]
    merged = sharded_ref.merge_partials([p[0] for p in parts], [p[1] for p in parts], backend="triton")
    ref_merge = sharded_ref.merge_partials([p[0] for p in parts], [p[1] for p in parts], backend="torch")
    assert_close_attention(ref_merge, merged)
    assert_close_attention(ref, merged)


def test_empty_shard():
    query, key = torch.randn(1, 2, 1, 64, device=DEVICE), torch.zeros(1, 1, 0, 64, device=DEVICE)
    out, lse = sharded_ref.partial_attention(query, key, key, 0.125, backend="triton")
    assert not out.any() and torch.isneginf(lse).all()


QUANT = [  # kv_heads, group, k_len, dim, bits, value_bits, key_group, value_group, dtype, seed
    (2, 2, 48, 64, 4, 4, 16, 32, torch.float32, 0),
    (1, 4, 32, 128, 2, 2, 32, 64, torch.bfloat16, 1),
    (2, 1, 24, 64, 8, 4, 8, 16, torch.float16, 2),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group,shape,dtype", [
    (-1, 32, (2, 3, 37, 64), torch.float32),
    (-2, 16, (2, 3, 48, 128), torch.float32),
    (-2, 5, (1, 2, 15, 40), torch.bfloat16),  # group size not a power of two, width not one
    (-1, 16, (3, 21, 48), torch.float16),
])
def test_quantize_is_bit_exact(bits, axis, group, shape, dtype):
    gen = torch.Generator().manual_seed(bits)
    x = randn(*shape, dtype=dtype, gen=gen)
    x[..., 0, :16] = 1.0  # constant groups: scale 1
    assert_all_same(lowbit.quantize(x, bits, group, axis, backend="torch"),
                    lowbit.quantize(x, bits, group, axis, backend="triton"))


def test_quantize_unsupported_axis():
    x = torch.randn(4, 6, 8, device=DEVICE)
    assert_all_same(lowbit.quantize(x, 4, 2, 0, backend="torch"), lowbit.quantize(x, 4, 2, 0, backend="auto"))
    with pytest.raises(RuntimeError, match="axis 0"):
        lowbit.quantize(x, 4, 2, 0, backend="triton")
    with pytest.raises(RuntimeError, match="power of two"):
        lowbit.quantize(torch.randn(2, 6, device=DEVICE), 4, 3, -1, backend="triton")


@pytest.mark.parametrize("kv_heads,group,k_len,dim,bits,value_bits,key_group,value_group,dtype,seed", QUANT)
def test_quantized_attention(kv_heads, group, k_len, dim, bits, value_bits, key_group, value_group, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    query = randn(1, kv_heads * group, 2, dim, dtype=dtype, gen=gen)
    keys = randn(1, kv_heads, k_len, dim, dtype=dtype, gen=gen)
    values = randn(1, kv_heads, k_len, dim, dtype=dtype, gen=gen)
    kq = lowbit.quantize(keys, bits, key_group, -2, backend="torch")
    vq = lowbit.quantize(values, value_bits, value_group, -1, backend="torch")
    mask = torch.rand(1, 1, 2, k_len, generator=gen).to(DEVICE) > 0.2
    kwargs = dict(bits=bits, value_bits=value_bits, key_group_size=key_group, value_group_size=value_group,
                  scaling=dim ** -0.5, mask=mask)
    ref = quantized_attention(query, *kq, *vq, backend="torch", **kwargs)
    assert_close_attention(ref, quantized_attention(query, *kq, *vq, backend="triton", **kwargs))
    kernel = triton_module("lowbit_triton")
    assert_close_attention(ref, kernel.quantized_attention(
        query, *kq, *vq, bits=bits, value_bits=value_bits, key_group_size=key_group, value_group_size=value_group,
        head_dim=dim, value_dim=dim, scaling=dim ** -0.5, mask=mask, split_size=16, block_n=16))


def test_quantized_attention_checks_shapes():
    keys = torch.randn(1, 1, 16, 64)
    kq, vq = lowbit.quantize(keys, 4, 8, -2), lowbit.quantize(keys, 4, 32, -1)
    with pytest.raises(ValueError, match="key_scale"):
        quantized_attention(torch.randn(1, 2, 1, 64), *kq, *vq, bits=4, key_group_size=16, value_group_size=32,
                            scaling=0.1)


LATENT = [  # batch, heads, q_len, k_len, rank, rope_dim, dtype, causal, seed
    (2, 4, 1, 37, 128, 64, torch.float32, False, 0),
    (1, 8, 3, 50, 128, 64, torch.bfloat16, True, 1),
    (1, 4, 2, 30, 64, 32, torch.float16, True, 2),
    (1, 16, 5, 23, 64, 32, torch.float32, True, 3),  # 80 query rows: two row blocks, causal per query
]


@pytest.mark.parametrize("batch,heads,q_len,k_len,rank,rope_dim,dtype,causal,seed", LATENT)
def test_latent_attention(batch, heads, q_len, k_len, rank, rope_dim, dtype, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q_latent = randn(batch, heads, q_len, rank, dtype=dtype, gen=gen)
    q_rope = randn(batch, heads, q_len, rope_dim, dtype=dtype, gen=gen)
    latent = randn(batch, 1, k_len, rank, dtype=dtype, gen=gen)  # the cache layout (B, 1, K, R)
    rope_key = randn(batch, k_len, rope_dim, dtype=dtype, gen=gen)
    mask = torch.rand(batch, 1, q_len, k_len, generator=gen).to(DEVICE) > 0.3
    scaling = (rank + rope_dim) ** -0.5
    ref = latent_ref.latent_attention(q_latent, q_rope, latent, rope_key, scaling, mask, causal, backend="torch")
    assert_close_attention(ref, latent_ref.latent_attention(q_latent, q_rope, latent, rope_key, scaling, mask, causal,
                                                            backend="triton"))
    kernel = triton_module("latent_attention_triton")
    assert_close_attention(ref, kernel.latent_attention(q_latent, q_rope, latent[:, 0], rope_key, scaling, mask,
                                                        causal, split_size=16, block_n=16))


@pytest.mark.slow
@pytest.mark.parametrize("q_heads,kv_heads", [(8, 1), (6, 2), (4, 4)])
@pytest.mark.parametrize("k_len", [1, 17, 255, 1000])
@pytest.mark.parametrize("dim,value_dim", [(64, 64), (128, 128), (192, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_partial_attention_sweep(q_heads, kv_heads, k_len, dim, value_dim, dtype):
    gen = torch.Generator().manual_seed(k_len)
    query = randn(2, q_heads, 1, dim, dtype=dtype, gen=gen)
    key = randn(2, kv_heads, k_len, dim, dtype=dtype, gen=gen)
    value = randn(2, kv_heads, k_len, value_dim, dtype=dtype, gen=gen)
    ref = sharded_ref.partial_attention(query, key, value, dim ** -0.5, backend="torch")
    kernel = triton_module("sharded_attention_triton")
    assert_close_attention(ref, kernel.partial_attention(query, key, value, dim ** -0.5, split_size=64))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k_len,key_group", [(64, 32), (96, 16), (130, 13)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_sweep(bits, k_len, key_group, dim, dtype):
    gen = torch.Generator().manual_seed(k_len + bits)
    keys, values = randn(1, 2, k_len, dim, dtype=dtype, gen=gen), randn(1, 2, k_len, dim, dtype=dtype, gen=gen)
    kq = lowbit.quantize(keys, bits, key_group, -2, backend="triton")
    vq = lowbit.quantize(values, bits, 32, -1, backend="triton")
    assert_all_same(kq, lowbit.quantize(keys, bits, key_group, -2, backend="torch"))
    assert_all_same(vq, lowbit.quantize(values, bits, 32, -1, backend="torch"))
    query = randn(1, 8, 1, dim, dtype=dtype, gen=gen)
    kwargs = dict(bits=bits, key_group_size=key_group, value_group_size=32, scaling=dim ** -0.5)
    assert_close_attention(quantized_attention(query, *kq, *vq, backend="torch", **kwargs),
                           quantized_attention(query, *kq, *vq, backend="triton", **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("k_len", [1, 64, 513])
@pytest.mark.parametrize("heads,q_len", [(16, 1), (8, 4)])
def test_latent_sweep(k_len, heads, q_len):
    gen = torch.Generator().manual_seed(k_len)
    args = (randn(1, heads, q_len, 512, gen=gen), randn(1, heads, q_len, 64, gen=gen), randn(1, k_len, 512, gen=gen),
            randn(1, k_len, 64, gen=gen), 0.07)
    kernel = triton_module("latent_attention_triton")
    assert_close_attention(latent_ref.latent_attention(*args, is_causal=True, backend="torch"),
                           kernel.latent_attention(*args, is_causal=True, split_size=128))
