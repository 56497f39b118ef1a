"""Routing features batched over layers: the Triton kernel (Triton interpreter on the CPU) equals the torch reference
(counts, window counts and affinity exactly; novelty up to float32 log rounding), and the reference agrees with the
routing presses' own features to float32 rounding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pikv_press.kernels.routing_features import routing_features
from pikv_press.presses import RouterAffinityPress, RoutingNoveltyPress
from tests.triton_interpreter import DEVICE, assert_same, interpreter  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("interpreter")


def random_ids(layers, seq, top_k, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, seq, num_experts, generator=gen)
    return scores.topk(top_k, dim=-1).indices  # distinct experts per token, best first


CASES = [  # layers, seq, top_k, num_experts, experts_per_token, window, seed
    (3, 37, 4, 16, None, 8, 0),
    (2, 101, 2, 60, 1, 64, 1),
    (4, 129, 8, 128, 3, 200, 2),
]


@pytest.mark.parametrize("layers,seq,top_k,num_experts,per_token,window,seed", CASES)
def test_kernel_equals_reference(layers, seq, top_k, num_experts, per_token, window, seed):
    ids = random_ids(layers, seq, top_k, num_experts, seed).to(DEVICE)
    ref = routing_features(ids, num_experts, per_token, window, backend="torch")
    tri = routing_features(ids, num_experts, per_token, window, backend="triton")
    for name in ("counts", "window_counts", "affinity"):
        assert_same(getattr(ref, name), getattr(tri, name))
    torch.testing.assert_close(tri.novelty, ref.novelty, rtol=1e-6, atol=0)
    m = top_k if per_token is None else per_token
    assert ref.counts.sum(1).tolist() == [seq * m] * layers
    assert ref.window_counts.sum(1).tolist() == [min(window, seq) * m] * layers
    tri32 = routing_features(ids.int(), num_experts, per_token, window, backend="triton")  # int32 ids
    assert_same(tri32.affinity, ref.affinity)


@pytest.mark.parametrize("layers,seq,top_k,num_experts,per_token,window,seed", CASES)
def test_reference_matches_the_presses_features(layers, seq, top_k, num_experts, per_token, window, seed):
    ids = random_ids(layers, seq, top_k, num_experts, seed)
    features = routing_features(ids, num_experts, per_token, window, backend="torch")
    anatomy = SimpleNamespace(num_experts=num_experts)
    affinity = RouterAffinityPress(experts_per_token=per_token, window_size=window)
    novelty = RoutingNoveltyPress(experts_per_token=per_token)
    affinity._anatomy = novelty._anatomy = anatomy
    for layer in range(layers):
        assert torch.equal(features.affinity[layer], affinity.feature(ids[layer]))  # both from integer counts
        torch.testing.assert_close(features.novelty[layer], novelty.feature(ids[layer]), rtol=1e-6, atol=1e-7)


def test_equal_memberships_give_equal_features():
    ids = torch.tensor([[[0, 1], [1, 0], [2, 3], [0, 1], [3, 2]]])
    features = routing_features(ids, 4, None, 2)
    assert features.affinity[0, 0] == features.affinity[0, 1] == features.affinity[0, 3]
    assert features.novelty[0, 0] == features.novelty[0, 1] and features.novelty[0, 2] == features.novelty[0, 4]
    assert features.counts.tolist() == [[3, 3, 2, 2]]
    assert features.window_counts.tolist() == [[1, 1, 1, 1]]


def test_bad_input():
    with pytest.raises(ValueError, match="layers, seq, top_k"):
        routing_features(torch.zeros(5, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        routing_features(torch.full((1, 3, 2), 4), 4)
    with pytest.raises(TypeError, match="integer"):
        routing_features(torch.zeros(1, 3, 2), 4)
    with pytest.raises(ValueError, match="window_size"):
        routing_features(torch.zeros(1, 3, 2, dtype=torch.long), 4, window_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("seq", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (64, 8), (256, 8)])
def test_sweep(seq, num_experts, top_k):
    ids = random_ids(2, seq, top_k, num_experts, seq).to(DEVICE)
    for per_token in (1, None):
        ref = routing_features(ids, num_experts, per_token, 64, backend="torch")
        tri = routing_features(ids, num_experts, per_token, 64, backend="triton")
        for name in ("counts", "window_counts", "affinity"):
            assert_same(getattr(ref, name), getattr(tri, name))
        torch.testing.assert_close(tri.novelty, ref.novelty, rtol=1e-6, atol=0)
