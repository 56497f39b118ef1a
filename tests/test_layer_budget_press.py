"""RoutingLayerBudgetPress: per-layer budgets from measured routing that add up to the global ratio, kept tokens
that are each layer's best by the base press, the same caches live and in replay, and clear errors."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from kvpress import ComposedPress, KnormPress, StreamingLLMPress, TOVAPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

from pikv_press import MoEAware, get_anatomy
from pikv_press.compat import routing_source_layer
from pikv_press.prefill import PrefillRecorder
from pikv_press.presses import RoutingLayerBudgetPress
from pikv_press.presses.routing_layer_budget import routing_statistic
from pikv_press.testing import VOCAB
from tests.conftest import get_model
from tests.conftest import press_hooks as _press_hooks


def _ids(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_routing_statistic_exact_values():
    one_expert = torch.zeros(10, 2, dtype=torch.long)
    assert routing_statistic(one_expert, 8, "entropy") == 0.0
    assert routing_statistic(one_expert, 8, "experts_spanned") == 1 / 8
    even = torch.arange(8).repeat(2)[:, None]
    assert routing_statistic(even, 8, "entropy") == pytest.approx(1.0)
    assert routing_statistic(even, 8, "experts_spanned") == 1.0
    half = torch.tensor([[0], [0], [1], [1]])  # two experts of four, evenly: entropy log 2 / log 4
    assert routing_statistic(half, 4, "entropy") == pytest.approx(math.log(2) / math.log(4))
    # only the top-1 column counts
    assert routing_statistic(torch.tensor([[0, 1], [0, 2]]), 4, "experts_spanned") == 0.25
    with pytest.raises(ValueError, match="statistic"):
        routing_statistic(half, 4, "variance")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "glm4_moe", "deepseek_v3"])
@pytest.mark.parametrize("statistic", ["entropy", "experts_spanned"])
def test_budgets_add_up_and_follow_the_statistic(family, statistic):
    """Per layer the cache keeps exactly the planned budget, the budgets add up to the uniform total, each is within
    [floor, seq], and a layer with a larger statistic never gets fewer tokens."""
    model = get_model(family)
    anatomy = get_anatomy(model)
    seq, ratio = 48, 0.6
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=_ids(seq), past_key_values=DynamicCache())
    press = RoutingLayerBudgetPress(ratio, press=KnormPress(), statistic=statistic, strength=3.0, min_layer_share=0.5)
    cache = recorder.snapshot.replay(press)
    layers = list(anatomy.compressible_layers)
    uniform = compute_n_kept(seq, ratio)
    assert sum(press.layer_budgets.values()) == uniform * len(layers)
    for idx in layers:
        assert cache.layers[idx].keys.shape[2] == press.layer_budgets[idx]
        assert int(0.5 * uniform) <= press.layer_budgets[idx] <= seq
        expected = routing_statistic(recorder.snapshot.routing[routing_source_layer(anatomy, idx)].topk_ids,
                                     anatomy.num_experts, statistic)
        assert press.layer_statistics[idx] == expected
    for a in layers:
        for b in layers:
            if press.layer_statistics[a] > press.layer_statistics[b]:
                assert press.layer_budgets[a] >= press.layer_budgets[b]


def test_each_layer_keeps_its_best_tokens_by_the_base_press():
    """Knorm as the base: per head, the kept rows are the budget's smallest key norms of the full layer."""
    model = get_model("qwen3_moe")
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    press = RoutingLayerBudgetPress(0.5, press=KnormPress(), strength=4.0, min_layer_share=0.0)
    cache = recorder.snapshot.replay(press)
    assert len(set(press.layer_budgets.values())) > 1, "the tiny model's layers route differently"
    for idx, layer in enumerate(cache.layers):
        full = recorder.snapshot.layers[idx].keys
        n = press.layer_budgets[idx]
        for head in range(full.shape[1]):
            match = (layer.keys[0, head][:, None, :] == full[0, head][None, :, :]).all(-1)  # (kept, full)
            assert bool((match.sum(-1) == 1).all()) and layer.keys.shape[2] == n
            kept = torch.zeros(full.shape[2], dtype=torch.bool)
            kept[match.float().argmax(-1)] = True
            norms = full[0, head].norm(dim=-1)  # the kept are the smallest norms (up to rounding of near-ties)
            assert n == full.shape[2] or float(norms[kept].max()) <= float(norms[~kept].min()) + 1e-5


def test_strength_zero_is_the_base_press():
    model = get_model("mixtral")
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    uniform = recorder.snapshot.replay(RoutingLayerBudgetPress(0.5, press=TOVAPress(), strength=0.0))
    base = recorder.snapshot.replay(MoEAware(TOVAPress(0.5)))
    for a, b in zip(uniform.layers, base.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "qwen2_moe"])
def test_live_equals_replay_and_no_hooks_left(family):
    model = get_model(family)
    ids = _ids()
    live = DynamicCache()
    press = RoutingLayerBudgetPress(0.7, press=TOVAPress(), strength=2.0)
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=live)
    live_budgets = dict(press.layer_budgets)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    replayed = recorder.snapshot.replay(RoutingLayerBudgetPress(0.7, press=TOVAPress(), strength=2.0))
    for a, b in zip(live.layers, replayed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert [layer.keys.shape[2] for layer in live.layers] == [live_budgets[i] for i in range(len(live.layers))]
    del live, replayed  # a ragged cache keeps the mask fitting alive while it lives (pikv_press.compat)
    gc.collect()
    assert not _press_hooks(model)


def test_composes_first_in_a_composed_press():
    model = get_model("qwen3_moe")
    cache = DynamicCache()
    press = MoEAware(ComposedPress([RoutingLayerBudgetPress(0.5, press=KnormPress(), strength=2.0),
                                    StreamingLLMPress(0.5, n_sink=2)]))
    with torch.no_grad(), press(model):
        model.model(input_ids=_ids(), past_key_values=cache)
    inner = press.presses[0]
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        compute_n_kept(inner.layer_budgets[i], 0.5) for i in range(len(cache.layers))]


@pytest.mark.parametrize("make, message", [
    (lambda: RoutingLayerBudgetPress(1.0), "compression_ratio"),
    (lambda: RoutingLayerBudgetPress(0.5, routing="predicted"), "routing='actual'"),
    (lambda: RoutingLayerBudgetPress(0.5, press=StreamingLLMPress), "ScorerPress"),
    (lambda: RoutingLayerBudgetPress(0.5, statistic="variance"), "statistic"),
    (lambda: RoutingLayerBudgetPress(0.5, strength=-1), "strength"),
    (lambda: RoutingLayerBudgetPress(0.5, min_layer_share=1.5), "min_layer_share"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_refused_where_it_cannot_plan():
    model = get_model("qwen3_moe")
    press = RoutingLayerBudgetPress(0.5)
    with pytest.raises(ValueError, match="Mixture-of-Experts"), press(get_model("llama")):
        pass
    with pytest.raises(ValueError, match="no scores"):
        press.score(None, None, None, None, None, {})
    press.post_init_from_model(model)
    module = get_anatomy(model).attention(0)
    keys = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="no budget"):
        press.compress(module, None, keys, keys, None, {})
    batch = torch.cat([_ids(), _ids(seed=1)])
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), press(model):
        model.model(input_ids=batch, past_key_values=DynamicCache())
    assert not _press_hooks(model)
