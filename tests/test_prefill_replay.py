"""Prefill once, replay presses: identical caches and answers to the plain `with press(model)` path."""

from __future__ import annotations

import pytest
import torch
from kvpress import (
    AdaKVPress,
    ComposedPress,
    DecodingPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import DynamicCache, pipeline

from pikv_press import MoEAware, get_anatomy
from pikv_press.prefill import PrefillRecorder, can_replay
from pikv_press.presses import (
    AdaKVExpectedAttentionPress,
    ExpertBalancedPress,
    PiKVPress,
    RouterAffinityPress,
    RoutingLayerBudgetPress,
    RoutingNoveltyPress,
)
from pikv_press.testing import VOCAB, build_tokenizer
from tests.conftest import get_model

BARE_PRESSES = {
    "knorm": lambda: KnormPress(0.5),
    "snapkv": lambda: SnapKVPress(0.5, window_size=4),
    "streaming_llm": lambda: StreamingLLMPress(0.6, n_sink=2),
    "expected_attention": lambda: ExpectedAttentionPress(0.5, n_sink=2),
    "tova": lambda: TOVAPress(0.25),
    "keydiff": lambda: KeyDiffPress(0.5),
    "pyramidkv": lambda: PyramidKVPress(0.5, window_size=4),
    "adakv": lambda: AdaKVPress(ExpectedAttentionPress(0.5, n_sink=2)),
    "composed": lambda: ComposedPress([StreamingLLMPress(0.25, n_sink=2), SnapKVPress(0.25, window_size=4)]),
}
PRESSES = {name: (lambda factory=factory: MoEAware(factory())) for name, factory in BARE_PRESSES.items()}
FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "llama"]

# pikv-press's routing presses (MoE-aware already; actual routing unless said otherwise), alone and composed
ROUTING_PRESSES = {
    "expert_balanced_tova": lambda: ExpertBalancedPress(0.5, press=TOVAPress()),
    "expert_balanced_top2_snapkv": lambda: ExpertBalancedPress(0.5, press=SnapKVPress(window_size=4), power=1.0,
                                                               experts_per_token=2),
    "expert_balanced_predicted": lambda: ExpertBalancedPress(0.5, press=KnormPress(), routing="predicted"),
    "pikv": lambda: PiKVPress(0.75),
    "adakv_expected_attention": lambda: AdaKVExpectedAttentionPress(0.75),
    "router_affinity": lambda: RouterAffinityPress(0.6, window_size=8),
    "router_affinity_knorm": lambda: RouterAffinityPress(0.5, press=KnormPress(), weight=1.0),
    "routing_novelty_tova": lambda: RoutingNoveltyPress(0.5, press=TOVAPress()),
    "composed": lambda: MoEAware(ComposedPress([RoutingNoveltyPress(0.25), StreamingLLMPress(0.25, n_sink=2)])),
    "adakv": lambda: MoEAware(AdaKVPress(RouterAffinityPress(0.5, press=KnormPress()))),
    "layer_budget_tova": lambda: RoutingLayerBudgetPress(0.5, press=TOVAPress(), strength=2.0),
}
ROUTING_FAMILIES = ["qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3", "glm4_moe"]


def _ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _masks(model):
    return [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]


def _clear_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def _assert_replay_equals_plain_path(model, make_press) -> tuple[DynamicCache, PrefillRecorder]:
    """The same caches (and AdaKV masks) from ``with press(model)`` and from a replay of a recorded prefill."""
    ids = _ids()
    plain = DynamicCache()
    with torch.no_grad(), make_press()(model):
        model.model(input_ids=ids, past_key_values=plain)
    plain_masks = _masks(model)
    _clear_masks(model)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    replayed = recorder.snapshot.replay(make_press())
    for a, b in zip(plain.layers, replayed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for a, b in zip(plain_masks, _masks(model), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    _clear_masks(model)
    return plain, recorder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("press_name", sorted(PRESSES))
def test_replay_equals_plain_path(family, press_name):
    # eager attention for ComposedPress on MoE families: also replays recorded attention weights (kvpress alone, on
    # dense models, hands stale weights to the second press)
    attn = "eager" if press_name == "composed" and family not in ("gpt_oss", "llama") else None
    model = get_model(family, attn)
    if family == "gpt_oss" and press_name == "adakv":
        pytest.skip("AdaKV cannot run on GPT-OSS (eager only): covered by test_kvpress_compat")
    _assert_replay_equals_plain_path(model, PRESSES[press_name])


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
@pytest.mark.parametrize("press_name", sorted(ROUTING_PRESSES))
def test_routing_press_replay_equals_plain_path(family, press_name):
    """Routing presses run after the MoE block live, on the recorded routing in replay: the same caches."""
    model = get_model(family)
    if family == "gpt_oss" and press_name in ("adakv", "adakv_expected_attention"):
        pytest.skip("AdaKV cannot run on GPT-OSS (eager only)")
    plain, recorder = _assert_replay_equals_plain_path(model, ROUTING_PRESSES[press_name])
    assert sorted(recorder.snapshot.routing) == list(get_anatomy(model).moe_layers)
    if press_name not in ("adakv", "adakv_expected_attention"):  # head-wise budgets mask keys, dropping none
        assert min(layer.keys.shape[2] for layer in plain.layers) < _ids().shape[1]


def test_routing_press_answers_from_replay_equal_pipeline_answers():
    model = get_model("qwen3_moe")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=build_tokenizer())
    context, question = "The special magic number is 7481. " * 6, "What is the special magic number?"
    inputs = pipe.preprocess(context, [question], "", 10**6)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=inputs["context_ids"], past_key_values=DynamicCache())
    for name in ("expert_balanced_tova", "routing_novelty_tova"):
        expected = pipe(context, question=question, press=ROUTING_PRESSES[name](), max_new_tokens=6)["answer"]
        with torch.no_grad():
            answer = pipe.generate_answer(inputs["questions_ids"][0], recorder.snapshot.replay(ROUTING_PRESSES[name]()),
                                          inputs["context_ids"].shape[1], 6)
        assert answer == expected, name


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_replayed_answers_equal_pipeline_answers(family):
    model = get_model(family)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=build_tokenizer())
    context, question = "The special magic number is 7481. " * 6, "What is the special magic number?"
    inputs = pipe.preprocess(context, [question], "", 10**6)
    context_ids = inputs["context_ids"]
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=context_ids, past_key_values=DynamicCache())
    for name in ["knorm", "snapkv", "expected_attention", "tova", "pyramidkv"]:
        expected = pipe(context, question=question, press=PRESSES[name](), max_new_tokens=6)["answer"]
        with torch.no_grad():
            answer = pipe.generate_answer(inputs["questions_ids"][0], recorder.snapshot.replay(PRESSES[name]()),
                                          context_ids.shape[1], 6)
        assert answer == expected, name


def test_adakv_masks_do_not_leak_into_the_next_replay():
    model = get_model("qwen3_moe")
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    recorder.snapshot.replay(PRESSES["adakv"]())
    assert any(m is not None for m in _masks(model))
    recorder.snapshot.replay(PRESSES["knorm"]())
    assert all(m is None for m in _masks(model))


def test_presses_that_cannot_be_replayed():
    model = get_model("qwen3_moe")
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=_ids(), past_key_values=DynamicCache())
    decoding = DecodingPress(base_press=KnormPress(), compression_interval=2, target_size=8)
    assert not can_replay(decoding)
    assert can_replay(PRESSES["composed"]()) and can_replay(PRESSES["adakv"]())
    with pytest.raises(ValueError, match="cannot be replayed"):
        recorder.snapshot.replay(decoding)
    full = recorder.snapshot.replay(None)
    assert [layer.keys.shape[2] for layer in full.layers] == [40] * get_anatomy(model).num_layers


def test_recorder_needs_a_fresh_cache():
    model = get_model("mixtral")
    with pytest.raises(ValueError, match="past_key_values"):
        with torch.no_grad(), PrefillRecorder(model):
            model.model(input_ids=_ids(), use_cache=False)


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("press_name", ["snapkv", "pyramidkv"])
def test_replay_of_a_bare_press_equals_plain_kvpress(family, press_name):
    """Without MoEAware, the replay runs kvpress's own hook, exactly as `with press(model)` without pikv-press."""
    model = get_model(family)
    ids = _ids()
    plain = DynamicCache()
    with torch.no_grad(), BARE_PRESSES[press_name]()(model):
        model.model(input_ids=ids, past_key_values=plain)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    replayed = recorder.snapshot.replay(BARE_PRESSES[press_name]())
    for a, b in zip(plain.layers, replayed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_replay_into_a_quantized_cache_equals_the_plain_path(family):
    """The cache factory: a press replayed into a quantized cache equals the press run live on that cache."""
    pytest.importorskip("optimum.quanto")
    from pikv_press.cache import layer_access, make_cache

    model = get_model(family)
    ids = _ids()
    plain = make_cache("quantized-int4", model.config)
    with torch.no_grad(), PRESSES["snapkv"]()(model):
        model.model(input_ids=ids, past_key_values=plain)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    replayed = recorder.snapshot.replay(PRESSES["snapkv"](), lambda: make_cache("quantized-int4", model.config))
    anatomy = get_anatomy(model)
    for idx in anatomy.compressible_layers:
        a, b = layer_access(plain.layers[idx]), layer_access(replayed.layers[idx])
        assert a.seq_length() == b.seq_length() == 20
        for x, y in zip(a.read(), b.read(), strict=True):
            assert torch.equal(x, y)
