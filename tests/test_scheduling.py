"""Decode-time scheduling: each policy's selection rule on hand-made attention patterns, the statistics gathered
inside the attention function against eager attention weights, budget invariants during generation and chunked
prefill, chunked prefill against a plain prefill, Quest's page bounds, bad input, no hooks left behind."""

from __future__ import annotations

import pytest
import torch
from kvpress import DecodingPress, KnormPress, PrefillDecodingPress
from transformers import DynamicCache

from pikv_press.cache import cache_lengths, cache_nbytes
from pikv_press.moe import RoutingRecorder, get_anatomy
from pikv_press.scheduling import (
    AttentionStep,
    DecodingPolicyPress,
    ExpertAwarePolicy,
    H2OPolicy,
    LFUPolicy,
    LRUPolicy,
    StreamingLLMPolicy,
    attention_probabilities,
    chunked_prefill,
    page_criticality,
    quest_attention,
    selected_slots,
    track,
)
from tests.conftest import get_model

FAMILIES = ("qwen3_moe", "glm4_moe", "deepseek_v3", "gpt_oss")


def one_head(*rows: list[float]) -> torch.Tensor:
    """Attention probabilities (1, 1, queries, slots) from rows of weights."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def observed(policy, *steps: torch.Tensor, layer: int = 0):
    for probs in steps:
        visible = torch.ones_like(probs, dtype=torch.bool)  # every key visible to every query
        policy.observe(layer, AttentionStep.from_probs(probs, 1, policy.access_threshold, visible))
    return policy


def ids(seed: int = 0, length: int = 96) -> torch.Tensor:
    return torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(seed))


# -- statistics ------------------------------------------------------------------------------------------------------
def test_attention_step_sums_groups_and_counts_accesses():
    # 2 query heads sharing 1 KV head, 2 queries over 4 keys
    probs = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]],
                          [[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]]])[None]
    step = AttentionStep.from_probs(probs, num_kv_heads=1, access_threshold=1.0)
    assert torch.allclose(step.received, probs.sum(dim=(1, 2)))
    # uniform weight is 1/4: query 0 accesses key 0 (head 0) and all keys (head 1, ties at 1/4); query 1 keys 2, 3
    assert step.accesses.tolist() == [[[1, 1, 2, 2]]]
    assert step.last_access.tolist() == [[[0, 0, 1, 1]]]
    # two KV heads: heads are not mixed
    two = AttentionStep.from_probs(probs, num_kv_heads=2, access_threshold=1.0)
    assert torch.allclose(two.received[0, 1], probs[0, 1].sum(0))
    with pytest.raises(ValueError, match="do not divide"):
        AttentionStep.from_probs(probs, num_kv_heads=3)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_statistics_equal_eager_attention_weights(family):
    """What the wrapped SDPA hands the policies is the model's own attention (eager weights summed), sinks
    included, and the model's output is unchanged."""
    sdpa, eager = get_model(family), get_model(family, "eager")
    x = ids(1, 40)
    with torch.no_grad():
        weights = eager(input_ids=x, output_attentions=True, past_key_values=DynamicCache()).attentions
        plain = sdpa(input_ids=x, past_key_values=DynamicCache()).logits
        policy = H2OPolicy()
        with track(sdpa, policy):
            tracked = sdpa(input_ids=x, past_key_values=DynamicCache()).logits
    assert torch.equal(plain, tracked)
    assert sdpa.config._attn_implementation == ("eager" if family == "gpt_oss" else "sdpa")
    anatomy = get_anatomy(sdpa)
    assert set(policy.states) == set(anatomy.compressible_layers)
    for layer in anatomy.compressible_layers:
        kv_heads = policy.states[layer].attention.shape[1]
        expected = AttentionStep.from_probs(weights[layer], kv_heads).received
        torch.testing.assert_close(policy.states[layer].attention, expected, rtol=1e-4, atol=1e-5)


def test_statistics_in_query_blocks_equal_one_block():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 25, 8, generator=g)
    from pikv_press.scheduling import attention_step

    whole = attention_step(q, k, None, 1.0, block=64)
    parts = attention_step(q, k, None, 1.0, block=3)
    torch.testing.assert_close(whole.received, parts.received)
    assert torch.equal(whole.accesses, parts.accesses) and torch.equal(whole.last_access, parts.last_access)
    probs, visible = attention_probabilities(q, k, None)
    assert not bool(probs[..., ~visible[0, 0]].any())  # causal: nothing on future keys
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 10))


# -- selection rules on hand-made attention ---------------------------------------------------------------------------
def test_h2o_keeps_heavy_hitters_and_recent_window():
    policy = H2OPolicy(recent_fraction=0.5)
    # 8 slots; slots 1 and 3 receive most attention over two passes, slot 6 a lot once but it is recent anyway
    observed(policy, one_head([0.05, 0.5, 0.05, 0.3, 0.02, 0.02, 0.05, 0.01]),
             one_head([0.1, 0.3, 0.1, 0.2, 0.1, 0.0, 0.2, 0.0]))
    assert policy.keep_indices(0, 4).tolist() == [[[1, 3, 6, 7]]]
    assert policy.keep_indices(0, 3).tolist() == [[[1, 6, 7]]]  # round(1.5) = 2 recent, 1 heavy hitter
    # after keeping, the state follows the cache: the accumulated scores of the kept slots, in order
    before = policy.states[0].attention.clone()
    policy.kept(0, policy.keep_indices(0, 4))
    assert torch.equal(policy.states[0].attention, before[..., [1, 3, 6, 7]])
    assert policy.states[0].positions.tolist() == [[[1, 3, 6, 7]]]
    # a new token arrives: scores accumulate on the kept slots
    observed(policy, one_head([0.0, 0.0, 0.9, 0.0, 0.1]))
    assert policy.keep_indices(0, 2).tolist() == [[[2, 4]]]  # slot 2 (token 6) now heaviest; 1 recent


def test_lru_keeps_most_recently_accessed():
    policy = LRUPolicy()
    # 6 slots; query at stream index 5 (the last slot) accesses slots 0 and 2 (uniform weight 1/6)
    observed(policy, one_head([0.4, 0.05, 0.3, 0.05, 0.1, 0.1]))
    # last accesses: slot 0 -> 5, slot 2 -> 5, others their own index (1, 3, 4, 5)
    assert policy.states[0].last_access.tolist() == [[[5, 1, 5, 3, 4, 5]]]
    assert policy.keep_indices(0, 3).tolist() == [[[0, 2, 5]]]
    assert policy.keep_indices(0, 4).tolist() == [[[0, 2, 4, 5]]]


def test_lfu_counts_accesses_and_protects_recent():
    policy = LFUPolicy(recent_fraction=0.25)
    # 3 queries over 8 slots (causal pattern not needed for the rule): slot 2 accessed 3 times, slot 5 twice
    observed(policy, one_head([0.0, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0],
                              [0.2, 0.0, 0.4, 0.0, 0.0, 0.4, 0.0, 0.0],
                              [0.0, 0.0, 0.6, 0.1, 0.1, 0.1, 0.05, 0.05]))
    assert policy.states[0].accesses.tolist() == [[[1, 0, 3, 0, 0, 2, 0, 0]]]
    assert policy.keep_indices(0, 4).tolist() == [[[0, 2, 5, 7]]]  # 1 recent (7); counts 3, 2, then 1
    # H2O on the same pattern keeps by mass, not by count: slot 2 (1.5) and 5 (1.0) then 0 (0.2)
    assert observed(H2OPolicy(recent_fraction=0.25), *[one_head(*r) for r in [[
        [0.0, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0], [0.2, 0.0, 0.4, 0.0, 0.0, 0.4, 0.0, 0.0],
        [0.0, 0.0, 0.6, 0.1, 0.1, 0.1, 0.05, 0.05]]]]).keep_indices(0, 4).tolist() == [[[0, 2, 5, 7]]]


def test_streaming_llm_keeps_sinks_and_recent_in_order_through_repeated_compression():
    policy = StreamingLLMPolicy(n_sink=2)
    keys = torch.arange(40, dtype=torch.float32).view(1, 1, 40, 1).expand(1, 2, 40, 3).contiguous()
    module = type("M", (), {"layer_idx": 0, "head_dim": 3})()
    for kept in (30, 20, 12, 8):  # compressed again and again by kvpress's DecodingPress: sinks and recent stay
        keys, _ = DecodingPress(policy, target_size=kept).compress(module, None, keys, keys, None, {})
        assert keys.shape[2] == kept
    assert keys[0, 0, :, 0].tolist() == [0, 1, 34, 35, 36, 37, 38, 39]


def test_expert_aware_evicts_from_over_represented_expert():
    policy = ExpertAwarePolicy(recent_fraction=0.0)
    # 8 slots: expert 0 holds 6, expert 1 holds 2; in the stream both experts had the same share
    observed(policy, one_head([0.1, 0.2, 0.05, 0.15, 0.1, 0.1, 0.2, 0.1]))
    policy.record_routing(0, 0, torch.tensor([0, 0, 0, 1, 0, 0, 1, 0]))
    policy.seen[0] = torch.tensor([50.0, 50.0], dtype=torch.float64)
    # keep 4: 2 per expert; expert 1 keeps both (3, 6), expert 0 its best two by attention (1 then 0/4/5/7 tie: 7)
    assert policy.keep_indices(0, 4).tolist() == [[[1, 3, 6, 7]]]
    # with the stream dominated by expert 0, the quota follows it: 3 for expert 0, 1 for expert 1 (slot 6 > 3)
    policy.seen[0] = torch.tensor([300.0, 100.0], dtype=torch.float64)
    kept = policy.keep_indices(0, 4)[0, 0].tolist()
    experts = policy.states[0].experts[0, 0, kept].tolist()
    assert experts.count(0) == 3 and experts.count(1) == 1 and 6 in kept
    # tokens whose routing is not recorded yet are kept (they are the newest)
    observed(policy, one_head([0.1] * 9 + [0.1]))
    assert policy.states[0].experts[0, 0, -2:].tolist() == [-1, -1]
    assert {8, 9} <= set(policy.keep_indices(0, 4)[0, 0].tolist())


def test_quest_bound_is_an_upper_bound_and_selects_the_largest():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 32, 4, generator=g)
    query = torch.randn(1, 2, 3, 4, generator=g)  # 2 heads on 1 KV head
    low, high = keys.view(1, 1, 8, 4, 4).amin(3), keys.view(1, 1, 8, 4, 4).amax(3)
    bound = page_criticality(query, low, high)
    exact = torch.matmul(query, keys.transpose(2, 3)).view(1, 2, 3, 8, 4).amax(-1)
    assert bool((bound >= exact - 1e-6).all())
    # a hand-made case: query (1, -1); page 0 keys in [0, 1] x [0, 1], page 1 in [2, 3] x [1, 5]
    q = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    k = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 5.0], [3.0, 1.0]]).view(1, 1, 4, 2)
    # bounds: page 0: max(0,1) + max(0,-1) = 1; page 1: max(2,3) + max(-1,-5) = 2 -> page 1 is read
    assert selected_slots(q, k, token_budget=2, page_size=2).tolist() == [[[[False, False, True, True]]]]
    assert selected_slots(q, k, token_budget=4, page_size=2).all()


def test_quest_reads_at_most_its_budget_and_full_below_it():
    model = get_model("qwen3_moe")
    x = ids(2, 80)
    with torch.no_grad():
        plain = model(input_ids=x, past_key_values=DynamicCache()).logits
        with quest_attention(model, token_budget=128, page_size=16, dense_layers=0):
            same = chunked_prefill(model, x, None, 16, logits=True)
        with quest_attention(model, token_budget=16, page_size=8, dense_layers=0):
            sparse = chunked_prefill(model, x, None, 16, logits=True)
    torch.testing.assert_close(same.last_logits, plain[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse.last_logits, plain[:, -1], atol=1e-3)
    assert cache_lengths(sparse.cache) == [80, 80, 80]  # Quest keeps every page
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="at least one page"):
        with quest_attention(model, token_budget=4, page_size=8):
            pass


# -- running: chunked prefill and decoding ---------------------------------------------------------------------------
POLICIES = [H2OPolicy, StreamingLLMPolicy, LRUPolicy, LFUPolicy, ExpertAwarePolicy, KnormPress]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_budget_above_context_equals_plain_prefill(family):
    model = get_model(family)
    x = ids(3, 70)
    with torch.no_grad():
        plain = model(input_ids=x, past_key_values=DynamicCache()).logits[:, -1]
        chunked_plain = DynamicCache()
        for start in range(0, 70, 16):
            out = model(input_ids=x[:, start:start + 16], past_key_values=chunked_plain,
                        position_ids=torch.arange(start, min(70, start + 16))[None])
    result = chunked_prefill(model, x, budget=128, chunk_size=16, policy=H2OPolicy(), logits=True)
    assert torch.equal(result.last_logits, out.logits[:, -1])  # the same computation, bit for bit
    torch.testing.assert_close(result.last_logits, plain, rtol=1e-5, atol=1e-5)  # one pass vs chunks: rounding
    one_chunk = chunked_prefill(model, x, budget=128, chunk_size=70, policy=LRUPolicy(), logits=True)
    assert torch.equal(one_chunk.last_logits, plain)  # a single chunk is the plain prefill, bit for bit
    for layer, reference in zip(result.cache.layers, chunked_plain.layers, strict=True):
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)


@pytest.mark.parametrize("policy_cls", POLICIES)
def test_chunked_prefill_budget_and_peak(policy_cls):
    model = get_model("qwen3_moe")
    x = ids(4, 100)
    budget, chunk = 24, 8
    full = chunked_prefill(model, x, None, chunk)
    layers = len(full.cache.layers)
    per_token_layer = cache_nbytes(full.cache) // (100 * layers)  # real bytes per token and layer
    result = chunked_prefill(model, x, budget, chunk, policy_cls())
    assert cache_lengths(result.cache) == [budget] * layers
    # peak: every layer at the budget, one layer holding one more chunk; flat in the context length
    assert result.peak_kv_bytes == per_token_layer * (layers * budget + chunk)
    assert all(nbytes <= per_token_layer * layers * budget for _, nbytes, _ in result.kv_bytes)
    assert full.peak_kv_bytes == per_token_layer * layers * 100
    assert [peak for _, _, peak in full.kv_bytes] == [per_token_layer * layers * t for t, _, _ in full.kv_bytes]
    assert model.config._attn_implementation == "sdpa"


def test_kvpress_decoding_press_through_chunked_prefill():
    model = get_model("glm4_moe")
    x = ids(5, 60)
    press = DecodingPress(KnormPress(), compression_interval=1, target_size=20)
    result = chunked_prefill(model, x, 20, 10, press)
    assert cache_lengths(result.cache) == [20] * len(result.cache.layers)
    with pytest.raises(ValueError, match="target_size=16"):
        chunked_prefill(model, x, 16, 8, press)
    # kvpress's DecodingPress around a policy that needs statistics: they are gathered too
    h2o = DecodingPress(H2OPolicy(), compression_interval=1, target_size=20)
    assert cache_lengths(chunked_prefill(model, x, 20, 10, h2o).cache) == [20] * len(result.cache.layers)


def test_policy_as_a_prefill_press_uses_the_prefill_attention():
    model = get_model("olmoe")
    x = ids(11, 40)
    policy = H2OPolicy(compression_ratio=0.5, recent_fraction=0.25)
    cache = DynamicCache()
    with torch.no_grad(), policy(model):
        model(input_ids=x, past_key_values=cache)
        kept = {layer: state.positions.clone() for layer, state in policy.states.items()}
    assert cache_lengths(cache) == [20] * 3
    # the kept tokens are the 5 most recent and the 15 of largest attention received during the prefill
    eager = get_model("olmoe", "eager")
    with torch.no_grad():
        weights = eager(input_ids=x, output_attentions=True, past_key_values=DynamicCache()).attentions
    for layer, positions in kept.items():
        received = AttentionStep.from_probs(weights[layer], positions.shape[1]).received
        for head in range(positions.shape[1]):
            heavy = received[0, head, :35].topk(15).indices.sort().values.tolist()
            assert positions[0, head].tolist() == heavy + list(range(35, 40))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("policy_cls", [H2OPolicy, LRUPolicy, ExpertAwarePolicy, StreamingLLMPolicy])
def test_budget_holds_during_generation(policy_cls):
    model = get_model("qwen3_moe")
    x = ids(6, 30)
    budget = 16
    cache = DynamicCache()
    with torch.no_grad(), DecodingPolicyPress(policy_cls(), compression_interval=1, target_size=budget)(model):
        logits = model(input_ids=x, past_key_values=cache).logits
        assert cache_lengths(cache) == [30, 30, 30]  # a prefill is left to prefill presses (kvpress's rule)
        for step in range(12):
            token = logits[:, -1:].argmax(-1)
            logits = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[30 + step]])).logits
            assert cache_lengths(cache) == [budget] * 3
    assert not torch.isnan(logits).any()


def test_prefill_decoding_press_compresses_prompt_and_generation():
    model = get_model("mixtral")
    policy = H2OPolicy()  # one policy object follows the cache through prefill and decoding
    press = PrefillDecodingPress(prefilling_press=policy,
                                 decoding_press=DecodingPolicyPress(policy, compression_interval=2, target_size=12))
    cache = DynamicCache()
    x = ids(7, 24)
    with torch.no_grad(), track(model, press), press(model):
        policy.compression_ratio = 0.5
        model(input_ids=x, past_key_values=cache)
        assert cache_lengths(cache) == [12] * 3
        lengths = []
        for step in range(4):
            model(input_ids=x[:, step:step + 1], past_key_values=cache, position_ids=torch.tensor([[24 + step]]))
            lengths.append(cache_lengths(cache)[0])
    assert lengths == [13, 12, 13, 12]  # compressed every second step


def test_expert_aware_records_the_routing_of_cached_tokens():
    model = get_model("qwen3_moe")
    x = ids(8, 40)
    policy = ExpertAwarePolicy()
    cache = DynamicCache()
    with torch.no_grad(), RoutingRecorder(model) as recorder, track(model, policy):
        for start in range(0, 40, 10):
            model(input_ids=x[:, start:start + 10], past_key_values=cache,
                  position_ids=torch.arange(start, start + 10)[None])
    anatomy = get_anatomy(model)
    for layer in anatomy.moe_layers:
        expected = recorder.routing(layer).topk_ids[:, 0]
        assert torch.equal(policy.states[layer].experts[0, 0], expected)
        assert policy.seen[layer].sum() == 40


# -- errors and hooks ------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    model = get_model("qwen3_moe")
    x = ids(9, 20)
    with pytest.raises(ValueError, match="must not exceed the budget"):
        chunked_prefill(model, x, 8, 16, H2OPolicy())
    with pytest.raises(ValueError, match="needs a policy"):
        chunked_prefill(model, x, 8, 4)
    with pytest.raises(ValueError, match="no budget"):
        chunked_prefill(model, x, None, 4, H2OPolicy())
    with pytest.raises(ValueError, match="batch"):
        chunked_prefill(model, x.repeat(2, 1), 8, 4, H2OPolicy())
    with pytest.raises(TypeError, match="scorer press"):
        chunked_prefill(model, x, 8, 4, object())
    with pytest.raises(ValueError, match="recent_fraction"):
        H2OPolicy(recent_fraction=1.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        LRUPolicy(compression_ratio=1.0)
    with pytest.raises(ValueError, match="target_size"):
        DecodingPolicyPress(H2OPolicy(), target_size=0)
    with pytest.raises(ValueError, match="no attention statistics"):
        H2OPolicy().keep_indices(0, 4)
    with pytest.raises(ValueError, match="nested"):
        with track(model, H2OPolicy()), track(model, LRUPolicy()):
            pass
    policy = observed(H2OPolicy(), one_head([0.5, 0.5]))
    with pytest.raises(ValueError, match="changed outside the policy"):
        policy.state(0, slots=5)
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        chunked_prefill(get_model("llama"), x, 8, 4, ExpertAwarePolicy())


def test_nothing_left_behind_when_forward_raises():
    model = get_model("qwen3_moe")  # shared: a ragged cache of an earlier test may keep its mask fitting alive

    def hooks():
        return {(name, kind, key) for name, module in model.named_modules()
                for kind, table in (("fwd", module._forward_hooks), ("pre", module._forward_pre_hooks))
                for key in table}

    def boom(start, logits):
        raise RuntimeError("boom")

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"):
        chunked_prefill(model, ids(10, 30), 16, 8, ExpertAwarePolicy(), on_logits=boom)
    assert model.config._attn_implementation == "sdpa"
    assert hooks() <= before
    # and the model still runs as before
    with torch.no_grad():
        model(input_ids=ids(10, 5))


def test_generate_keeps_the_budget():
    model = get_model("qwen3_moe")
    x = ids(12, 30)
    cache, lengths = DynamicCache(), []

    def note(module, args, kwargs, output):
        lengths.append(kwargs["past_key_values"].get_seq_length(module.layer_idx))

    handle = model.model.layers[1].self_attn.register_forward_hook(note, with_kwargs=True)
    try:
        with DecodingPolicyPress(LFUPolicy(), compression_interval=1, target_size=16)(model):
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                 past_key_values=cache, pad_token_id=0)
    finally:
        handle.remove()
    assert out.shape == (1, 42)
    # seen by each attention before the press: the prompt, prompt + 1, then never more than budget + 1
    assert lengths[:2] == [30, 31] and set(lengths[2:]) == {17}
    assert cache_lengths(cache) == [16, 16, 16]
    assert model.config._attn_implementation == "sdpa"
