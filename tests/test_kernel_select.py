"""Score, select and compact: the Triton kernel (run by the Triton interpreter on the CPU) equals the torch reference
exactly (indices, gathered keys and values, offsets), uniform and ragged budgets, ties, signed zeros, odd lengths;
the reference keeps what a stable descending sort keeps."""

from __future__ import annotations

import pytest
import torch

from pikv_press.kernels import select
from pikv_press.kernels._dispatch import triton_module
from tests.triton_interpreter import DEVICE, assert_all_same, assert_same, interpreter  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("interpreter")


def scores_with_ties(batch, heads, seq, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq, generator=gen).to(dtype)
    scores[0, 0, seq // 4: seq // 2] = 0.5  # a run of ties straddling most cuts
    scores[-1, -1] = torch.where(torch.arange(seq) % 3 == 0, 0.0, -0.0)  # a head of signed zeros only
    if seq > 4:
        scores[0, -1, :4] = float("-inf")
        scores[0, -1, 4] = float("inf")
    return scores.to(DEVICE)


def kv(batch, heads, seq, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, heads, seq, dim, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("seq,dim,vdim,score_dtype,kv_dtype,seed", [
    (37, 64, 64, torch.float32, torch.float32, 0),
    (300, 128, 128, torch.bfloat16, torch.bfloat16, 1),
    (129, 64, 48, torch.float16, torch.float16, 2),
])
def test_uniform_budget_equals_reference(seq, dim, vdim, score_dtype, kv_dtype, seed):
    scores = scores_with_ties(2, 2, seq, score_dtype, seed)
    keys, values = kv(2, 2, seq, dim, kv_dtype, seed), kv(2, 2, seq, vdim, kv_dtype, seed + 7)
    for n in (0, seq // 3, seq):
        ref = select.select_and_compact(scores, keys, values, n, backend="torch")
        tri = select.select_and_compact(scores, keys, values, n, backend="triton")
        assert_all_same(ref, tri)
    assert_same(select.select_indices(scores, 1, backend="triton"), select.select_indices(scores, 1, backend="torch"))


@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_budgets_equal_reference_over_several_blocks(seed):
    seq = 71  # odd, several blocks of 32
    scores = scores_with_ties(2, 2, seq, torch.float32, seed)
    keys, values = kv(2, 2, seq, 64, torch.bfloat16, seed), kv(2, 2, seq, 64, torch.bfloat16, seed + 3)
    gen = torch.Generator().manual_seed(seed)
    budgets = torch.randint(0, seq + 1, (2, 2), generator=gen)
    budgets[0, 0], budgets[1, 1] = 0, seq
    ref = select.select_and_compact_ragged(scores, keys, values, budgets, backend="torch")
    tri = triton_module("select_triton").select_and_compact_ragged(scores, keys, values, budgets, block=32)
    assert_all_same(ref, tri)
    assert_all_same(ref, select.select_and_compact_ragged(scores, keys, values, budgets, backend="triton"))
    assert ref.offsets.tolist() == [0, *budgets.reshape(-1).cumsum(0).tolist()]


def test_non_contiguous_inputs():
    seq = 45
    scores = scores_with_ties(3, 2, seq, torch.float32, 5).transpose(0, 1).contiguous().transpose(0, 1)
    keys = kv(2, 3, seq, 64, torch.float32, 5).transpose(0, 1)  # (3, 2, seq, 64), strided
    values = kv(3, 2, 64, seq, torch.float32, 6).transpose(-1, -2)
    ref = select.select_and_compact(scores, keys, values, 11, backend="torch")  # 6 heads
    tri = select.select_and_compact(scores, keys, values, 11, backend="triton")
    assert_all_same(ref, tri)


def test_reference_rule():
    """Kept = fewer than n tokens score higher or the same at a lower index; position order; -0.0 == 0.0."""
    scores = torch.tensor([[[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, 2.0]]])
    values = torch.arange(7.0).view(1, 1, 7, 1)
    indices, keys, _ = select.select_and_compact(scores, values, values, 4, backend="torch")
    assert indices.tolist() == [[[1, 2, 5, 6]]] and keys.flatten().tolist() == [1.0, 2.0, 5.0, 6.0]
    assert select.select_indices(scores, 2, backend="torch").tolist() == [[[1, 2]]]
    assert select.select_indices(scores, 6, backend="torch").tolist() == [[[0, 1, 2, 3, 5, 6]]]
    rand = torch.randn(2, 3, 50)
    kept = select.select_indices(rand, 13, backend="torch")
    assert torch.equal(kept, rand.topk(13, dim=-1).indices.sort(dim=-1).values)  # no ties: topk's set


def test_bad_input():
    scores, keys = torch.randn(1, 2, 8), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="NaN"):
        select.select_and_compact(scores.index_fill(-1, torch.tensor([3]), float("nan")), keys, keys, 2)
    with pytest.raises(ValueError, match=r"\[0, seq=8\]"):
        select.select_and_compact(scores, keys, keys, 9)
    with pytest.raises(ValueError, match="kv_heads"):
        select.select_and_compact_ragged(scores, keys, keys, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="like the scores"):
        select.select_and_compact(scores, keys[:, :1], keys, 2)
    with pytest.raises(TypeError, match="float32"):
        select.select_and_compact(scores.double(), keys, keys, 2)
    with pytest.raises(TypeError, match="ragged"):
        select.select_and_compact(scores, keys, keys, torch.tensor([1, 2]))


@pytest.mark.slow
@pytest.mark.parametrize("seq", [1, 2, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_sweep(seq, dtype):
    scores = scores_with_ties(2, 2, seq, dtype, seq)
    keys, values = kv(2, 2, seq, 128, dtype, seq), kv(2, 2, seq, 64, dtype, seq + 1)
    budgets = torch.tensor([[0, seq // 2], [seq, max(seq - 1, 0)]])
    assert_all_same(select.select_and_compact_ragged(scores, keys, values, budgets, backend="torch"),
                        select.select_and_compact_ragged(scores, keys, values, budgets, backend="triton"))
