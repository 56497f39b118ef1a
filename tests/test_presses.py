"""pikv-press's routing presses on tiny random MoE models: budgets, exact ratio, routing source, scale invariance,
argument checks, hooks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from kvpress import AdaKVPress, ComposedPress, ExpectedAttentionPress, KnormPress, SnapKVPress, TOVAPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

from pikv_press import MoEAware, get_anatomy
from pikv_press.compat import ROUTING_KWARG, routing_source_layer
from pikv_press.moe import RoutingRecorder
from pikv_press.prefill import PrefillRecorder
from pikv_press.presses import (
    AdaKVExpectedAttentionPress,
    ExpertBalancedPress,
    PiKVPress,
    RouterAffinityPress,
    RoutingNoveltyPress,
)
from pikv_press.presses.base import combine, lexicographic_scores, membership, quantiles
from pikv_press.presses.expert_balanced import expert_budgets
from pikv_press.testing import VOCAB, build_model
from tests.conftest import get_model
from tests.conftest import press_hooks as _press_hooks

# families whose cache layout is kvpress's own (kept rows can be matched to the full cache as they are)
PLAIN_LAYOUT = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "phimoe"]


def _ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _kept_rows(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Per head, the indices of the full cache's rows that the compressed cache holds (exact matches)."""
    rows = []
    for head in range(full.shape[1]):
        match = (kept[0, head][:, None, :] == full[0, head][None, :, :]).all(-1)  # (kept, full)
        assert bool((match.sum(-1) == 1).all()), "every kept row is one original row"
        rows.append(match.float().argmax(-1).tolist())
    return rows


# -- budgets -------------------------------------------------------------------------------------------------------
def test_expert_budgets_exact_cases():
    # equal shares after the floor, the last token by largest remainder (ties: first expert)
    sizes = torch.tensor([6.0, 3.0, 1.0, 0.0])
    budgets = expert_budgets(sizes, sizes.long(), n_kept=5, power=0.0, min_tokens=1)
    assert budgets.tolist() == [2, 2, 1, 0]
    # a group smaller than its share is capped and the rest flows to the others
    sizes = torch.tensor([10.0, 1.0, 1.0])
    assert expert_budgets(sizes, sizes.long(), n_kept=9, power=0.0, min_tokens=0).tolist() == [7, 1, 1]
    # proportional
    sizes = torch.tensor([8.0, 4.0, 4.0])
    assert expert_budgets(sizes, sizes.long(), n_kept=8, power=1.0, min_tokens=0).tolist() == [4, 2, 2]
    # floors that do not fit are dropped; budgets still add up
    sizes = torch.ones(5)
    assert int(expert_budgets(sizes, sizes.long(), n_kept=3, power=1.0, min_tokens=1).sum()) == 3
    # more kept than tokens: every group whole
    sizes = torch.tensor([2.0, 3.0])
    assert expert_budgets(sizes, sizes.long(), n_kept=9, power=0.5, min_tokens=1).tolist() == [2, 3]


@pytest.mark.parametrize("seed", range(20))
def test_expert_budgets_add_up_within_floor_and_capacity(seed):
    gen = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(2, 40, (1,), generator=gen))
    capacities = torch.randint(0, 30, (experts,), generator=gen) * (torch.rand(experts, generator=gen) > 0.2)
    n_kept = int(torch.randint(1, int(capacities.sum()) + 5, (1,), generator=gen))
    power = float(torch.rand(1, generator=gen)) * 1.5
    floor = int(torch.randint(0, 3, (1,), generator=gen))
    budgets = expert_budgets(capacities.float(), capacities, n_kept, power, floor)
    assert int(budgets.sum()) == min(n_kept, int(capacities.sum()))
    assert bool((budgets <= capacities).all()) and bool((budgets >= 0).all())
    floors = capacities.clamp(max=floor)
    if int(floors.sum()) <= n_kept:
        assert bool((budgets >= floors).all())


# -- ExpertBalancedPress on models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", PLAIN_LAYOUT)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_expert_balanced_keeps_each_experts_budget_of_its_best_tokens(family, ratio):
    """Per layer and head: exactly compute_n_kept tokens, each expert's count equals its budget (which add up),
    every expert with tokens keeps at least the floor, and inside each group the kept tokens are its best by the
    base score (Knorm: smallest key norms)."""
    model = get_model(family)
    anatomy = get_anatomy(model)
    ids = _ids(48)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    press = ExpertBalancedPress(ratio, press=KnormPress(), power=0.5, min_tokens_per_expert=1)
    cache = recorder.snapshot.replay(press)
    n_kept = compute_n_kept(48, ratio)
    for idx in anatomy.compressible_layers:
        full_keys = recorder.snapshot.layers[idx].keys
        top1 = recorder.snapshot.routing[routing_source_layer(anatomy, idx)].topk_ids[:, 0]
        budgets = press.budgets(recorder.snapshot.routing[routing_source_layer(anatomy, idx)].topk_ids, n_kept)
        assert int(budgets.sum()) == n_kept
        groups = torch.bincount(top1, minlength=anatomy.num_experts)
        assert bool((budgets[groups > 0] >= 1).all()) or int((groups > 0).sum()) > n_kept
        assert cache.layers[idx].keys.shape[2] == n_kept
        for head, rows in enumerate(_kept_rows(full_keys, cache.layers[idx].keys)):
            kept = torch.tensor(rows)
            assert torch.equal(torch.bincount(top1[kept], minlength=anatomy.num_experts), budgets)
            norms = full_keys[0, head].norm(dim=-1)
            for expert in torch.nonzero(budgets).flatten().tolist():
                members = torch.nonzero(top1 == expert).flatten()
                best = members[norms[members].argsort()][: int(budgets[expert])]
                assert set(best.tolist()) == set(kept[top1[kept] == expert].tolist())


def test_expert_balanced_differs_from_its_base_and_power_one_top_k_still_exact():
    model = get_model("qwen3_moe")
    ids = _ids(48)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    base = recorder.snapshot.replay(MoEAware(KnormPress(0.75)))
    balanced = recorder.snapshot.replay(ExpertBalancedPress(0.75, press=KnormPress(), power=0.0))
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(base.layers, balanced.layers, strict=True))
    overlapping = recorder.snapshot.replay(ExpertBalancedPress(0.75, press=KnormPress(), experts_per_token=2))
    assert [layer.keys.shape[2] for layer in overlapping.layers] == [compute_n_kept(48, 0.75)] * 3


def test_pikv_press_is_its_documented_composition():
    """PiKVPress is MoE-correct TOVA (the RULER-4k headline's choice): the same caches as MoEAware(TOVAPress), every
    layer physically cut to the kept tokens (no masks), with argument checks and no hooks left behind."""
    model = get_model("qwen3_moe")  # a QK-norm family, where plain kvpress would score with the wrong queries
    ids = _ids(48)
    caches = []
    for press in (PiKVPress(0.75), MoEAware(TOVAPress(0.75))):
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
        caches.append(cache)
        assert all(getattr(layer.self_attn, "masked_key_indices", None) is None for layer in model.model.layers)
    for a, b in zip(*(c.layers for c in caches), strict=True):
        assert a.keys.shape[2] == compute_n_kept(48, 0.75)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    plain = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=plain)
    assert not torch.equal(plain.layers[0].keys[:, :, -compute_n_kept(48, 0.75):], caches[0].layers[0].keys)
    press = PiKVPress(0.5)
    press.compression_ratio = 0.25
    assert press.compression_ratio == 0.25
    with pytest.raises(ValueError, match="compression_ratio"):
        PiKVPress(1.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        press.compression_ratio = -0.1
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), PiKVPress(0.5)(model):
        model.model(input_ids=torch.cat([ids, ids]), past_key_values=DynamicCache())
    assert not _press_hooks(model)


def test_adakv_expected_attention_press_is_its_documented_composition():
    """AdaKVExpectedAttentionPress is MoE-correct AdaKV(ExpectedAttention) (the default before the 4k headline): the
    same caches and the same head-wise masks as MoEAware(AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)))."""
    model = get_model("qwen3_moe")  # a QK-norm family, where plain kvpress would score with the wrong queries
    ids = _ids(48)
    caches, masks = [], []
    for press in (AdaKVExpectedAttentionPress(0.75), MoEAware(AdaKVPress(ExpectedAttentionPress(0.75, epsilon=1e-2)))):
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
        caches.append(cache)
        masks.append([layer.self_attn.masked_key_indices for layer in model.model.layers])
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
    heads = model.config.num_key_value_heads
    for mask in masks[0]:  # 3/4 of every layer's (head, token) entries masked, not the same count per head
        assert mask[1].numel() == heads * (48 - compute_n_kept(48, 0.75))
    assert any(len(set(torch.bincount(mask[1], minlength=heads).tolist())) > 1 for mask in masks[0])
    for a, b in zip(*masks, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(*(c.layers for c in caches), strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    press = AdaKVExpectedAttentionPress(0.5)
    press.compression_ratio = 0.25
    assert press.press.compression_ratio == 0.25
    with pytest.raises(ValueError, match="compression_ratio"):
        AdaKVExpectedAttentionPress(1.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        press.compression_ratio = -0.1
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKVExpectedAttentionPress(0.5, alpha_safeguard=2.0)
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), AdaKVExpectedAttentionPress(0.5)(model):
        model.model(input_ids=torch.cat([ids, ids]), past_key_values=DynamicCache())
    assert not _press_hooks(model)
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


# -- routing features ----------------------------------------------------------------------------------------------
def _with_experts(press, num_experts: int):
    press._anatomy = SimpleNamespace(num_experts=num_experts)
    return press


def test_features_exact_values():
    ids = torch.tensor([[0, 1], [2, 3], [0, 2]])
    assert torch.equal(membership(ids, 4, None), torch.tensor([[.5, .5, 0, 0], [0, 0, .5, .5], [.5, 0, .5, 0]]))
    affinity = _with_experts(RouterAffinityPress(0.5, window_size=1), 4).feature(ids)
    assert torch.allclose(affinity, torch.tensor([0.25, 0.25, 0.5]))
    novelty = _with_experts(RoutingNoveltyPress(0.5, experts_per_token=1), 4).feature(ids)
    assert torch.allclose(novelty, -torch.tensor([2 / 3, 1 / 3, 2 / 3]).log())
    assert torch.equal(quantiles(torch.tensor([1.0, 1.0, 2.0])), torch.tensor([0.5, 0.5, 1.0]))
    scores = lexicographic_scores(torch.tensor([1.0, 2.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0, 1.0]))
    assert scores.tolist() == [1.0, 3.0, 2.0, 4.0]
    alone = combine(None, torch.tensor([1.0, 2.0, 1.0]), 1.0)  # feature first, ties to the most recent token
    assert alone.flatten().tolist() == [1.0, 3.0, 2.0]


def test_weight_zero_keeps_the_base_ranking_and_protected_tokens_stay():
    base = torch.randn(1, 2, 30, generator=torch.Generator().manual_seed(0))
    feature = torch.rand(30, generator=torch.Generator().manual_seed(1))
    n_kept = 12
    assert torch.equal(combine(base, feature, 0.0).topk(n_kept).indices.sort().values,
                       base.topk(n_kept).indices.sort().values)
    strong = combine(base, feature, 8.0)
    assert not torch.equal(strong.topk(n_kept).indices.sort().values, base.topk(n_kept).indices.sort().values)
    protected = base.clone()
    protected[..., -3:] = protected.amax() + 1  # a window the base press always keeps
    assert set(range(27, 30)) <= set(combine(protected, feature, 8.0).topk(n_kept).indices[0, 0].tolist())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "glm4_moe", "olmoe"])
def test_routing_features_ignore_the_router_scale(family):
    """Halving a router's weights (exact in floating point) halves its logits: softmax and bias-free
    sigmoid routing select the same experts in the same order, so every routing press keeps exactly the same tokens;
    the routing weights themselves do change. (Group-limited routing over several groups, DeepSeek's, ranks groups
    by sums of sigmoids, which a scale can reorder: no invariance there.)"""
    model = copy.deepcopy(build_model(family))
    anatomy = get_anatomy(model)
    last = anatomy.moe_layers[-1]
    for idx in anatomy.moe_layers:
        bias = getattr(anatomy.router(idx), "e_score_correction_bias", None)
        if bias is not None:
            bias.zero_()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        get_anatomy(scaled).router(last).weight.mul_(0.5)
    ids = _ids(40)
    caches = {}
    for name, m in (("plain", model), ("scaled", scaled)):
        with torch.no_grad(), RoutingRecorder(m) as recorder:
            m.model(input_ids=ids)
        caches[name, "weights"] = recorder.routing(last).topk_weights
        for press_name, factory in (
            ("balanced", lambda: ExpertBalancedPress(0.5, press=KnormPress(), experts_per_token=2)),
            ("affinity", lambda: RouterAffinityPress(0.5, window_size=8)),
            ("novelty", lambda: RoutingNoveltyPress(0.5, press=KnormPress(), weight=2.0)),
            ("predicted", lambda: ExpertBalancedPress(0.5, press=KnormPress(), routing="predicted")),
        ):
            cache = DynamicCache()
            with torch.no_grad(), factory()(m):
                m.model(input_ids=ids, past_key_values=cache)
            caches[name, press_name] = cache
    assert not torch.allclose(caches["plain", "weights"], caches["scaled", "weights"])
    for press_name in ("balanced", "affinity", "novelty", "predicted"):
        for a, b in zip(caches["plain", press_name].layers, caches["scaled", press_name].layers, strict=True):
            assert torch.equal(a.keys, b.keys), press_name


def test_actual_routing_is_what_the_experts_were_dispatched():
    """The press sees the recorded dispatch of the layer's MoE block (dense layers: the nearest MoE layer's)."""
    model = get_model("qwen2_moe")  # layer 1 is dense
    anatomy = get_anatomy(model)
    seen = {}

    class Spy(ExpertBalancedPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            seen[module.layer_idx] = kwargs[ROUTING_KWARG].topk_ids.clone()
            return super().score(module, hidden_states, keys, values, attentions, kwargs)

    ids = _ids()
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model.model(input_ids=ids)
    with torch.no_grad(), Spy(0.5)(model):
        model.model(input_ids=ids, past_key_values=DynamicCache())
    assert anatomy.dense_layers == (1,) and routing_source_layer(anatomy, 1) == 0
    for idx in range(anatomy.num_layers):
        assert torch.equal(seen[idx], recorder.routing(routing_source_layer(anatomy, idx)).topk_ids)


def test_predicted_routing_is_the_router_on_the_attention_input():
    model = get_model("mixtral")
    anatomy = get_anatomy(model)
    inputs = {}
    handles = [anatomy.attention(i).register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i in range(anatomy.num_layers)]
    press = ExpertBalancedPress(0.5, routing="predicted")
    got = {}
    original = press.context_experts

    def spy(module, hidden_states, keys, kwargs):
        got[module.layer_idx] = original(module, hidden_states, keys, kwargs)
        return got[module.layer_idx]

    press.context_experts = spy
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=_ids(), past_key_values=DynamicCache())
    finally:
        for handle in handles:
            handle.remove()
    for idx in range(anatomy.num_layers):
        routing = anatomy.route(idx, inputs[idx][0])
        assert torch.equal(got[idx].sort(-1).values, routing.topk_ids.sort(-1).values)
        best = routing.topk_weights.argmax(-1, keepdim=True)
        assert torch.equal(got[idx][:, 0], routing.topk_ids.gather(1, best)[:, 0])


# -- composition, dtype, hooks, errors -----------------------------------------------------------------------------
def test_composes_with_kvpress_presses_at_the_combined_ratio():
    model = get_model("olmoe")
    press = MoEAware(ComposedPress([ExpertBalancedPress(0.5, press=SnapKVPress(window_size=4)), KnormPress(0.5)]))
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=_ids(40), past_key_values=cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [10, 10, 10]
    adakv = MoEAware(AdaKVPress(RouterAffinityPress(0.5, press=TOVAPress())))
    cache = DynamicCache()
    with torch.no_grad(), adakv(model):
        model.model(input_ids=_ids(40), past_key_values=cache)
    masks = [layer.self_attn.masked_key_indices for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    assert all(m is not None and len(m[0]) == 20 * 2 for m in masks)  # 2 KV heads x 20 masked


def test_routing_press_after_a_pruning_press_is_refused():
    model = get_model("mixtral")
    press = MoEAware(ComposedPress([KnormPress(0.5), ExpertBalancedPress(0.5)]))
    with pytest.raises(ValueError, match="first in a ComposedPress"), torch.no_grad(), press(model):
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    assert not _press_hooks(model)


def test_bfloat16_model():
    model = build_model("qwen3_moe").to(torch.bfloat16)
    cache = DynamicCache()
    with torch.no_grad(), ExpertBalancedPress(0.75, press=TOVAPress())(model):
        model.model(input_ids=_ids(40), past_key_values=cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [10, 10, 10]
    assert cache.layers[0].keys.dtype == torch.bfloat16


@pytest.mark.parametrize("routing", ["actual", "predicted"])
def test_no_hooks_left_also_when_the_forward_raises(routing):
    model = get_model("glm4_moe")
    before = len(_press_hooks(model))
    assert before == 0
    with torch.no_grad(), RoutingNoveltyPress(0.5, routing=routing)(model):
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    assert not _press_hooks(model)
    batch = torch.cat([_ids(), _ids(seed=1)])
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), \
            ExpertBalancedPress(0.5, routing=routing)(model):
        model.model(input_ids=batch, past_key_values=DynamicCache())
    assert not _press_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), RouterAffinityPress(0.5, routing=routing)(model):
        raise RuntimeError("boom")
    assert not _press_hooks(model)


@pytest.mark.parametrize("make, message", [
    (lambda: ExpertBalancedPress(1.0), "compression_ratio"),
    (lambda: ExpertBalancedPress(-0.1), "compression_ratio"),
    (lambda: ExpertBalancedPress(0.5, power=-1), "power"),
    (lambda: ExpertBalancedPress(0.5, min_tokens_per_expert=-1), "min_tokens_per_expert"),
    (lambda: ExpertBalancedPress(0.5, experts_per_token=0), "experts_per_token"),
    (lambda: ExpertBalancedPress(0.5, press=AdaKVPress(KnormPress())), "ScorerPress"),
    (lambda: ExpertBalancedPress(0.5, routing="oracle"), "routing"),
    (lambda: RouterAffinityPress(0.5, window_size=0), "window_size"),
    (lambda: RouterAffinityPress(0.5, weight=-0.5), "weight"),
    (lambda: RoutingNoveltyPress(0.5, experts_per_token=0), "experts_per_token"),
    (lambda: RoutingNoveltyPress(0.5, press="snapkv"), "ScorerPress"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dense_models_and_missing_routing_are_refused_clearly():
    with pytest.raises(ValueError, match="Mixture-of-Experts"), torch.no_grad(), ExpertBalancedPress(0.5)(
            get_model("llama")):
        pass
    model = get_model("mixtral")
    bare = AdaKVPress(ExpertBalancedPress(0.5))  # kvpress's own hooks hand over no routing
    with pytest.raises(ValueError, match="MoEAware"), torch.no_grad(), bare(model):
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    assert not _press_hooks(model)
    with torch.no_grad(), AdaKVPress(ExpertBalancedPress(0.5, routing="predicted"))(model):
        model.model(input_ids=_ids(), past_key_values=DynamicCache())  # predicted routing needs no recording
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
