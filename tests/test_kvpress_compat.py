"""kvpress presses on every MoE family: they run, score with the model's real attention, and compress right."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from kvpress import (
    AdaKVPress,
    ComposedPress,
    DecodingPress,
    ExpectedAttentionPress,
    FastKVzipPress,
    KeyDiffPress,
    KnormPress,
    KVComposePress,
    KVzipPress,
    PrefillDecodingPress,
    PyramidKVPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept
from transformers import DynamicCache, pipeline

import pikv_press
from pikv_press import MoEAware, get_anatomy, kvpress_moe_support
from pikv_press.compat import (
    _ORIGINAL_EXPECTED_ATTENTION_SCORE,
    _sink_aware_scorers,
    inner_presses,
    make_views,
    view_attention_errors,
)
from pikv_press.moe import AttentionLayout
from pikv_press.prefill import PrefillRecorder
from pikv_press.testing import MOE_FAMILY_NAMES, TRAINING_TEXT, VOCAB, build_model
from tests.conftest import get_model

RATIO = 0.5
SEQ = 32
BARE_PRESSES = {
    "knorm": lambda: KnormPress(RATIO),
    "snapkv": lambda: SnapKVPress(RATIO, window_size=4),
    "streaming_llm": lambda: StreamingLLMPress(RATIO, n_sink=2),
    "expected_attention": lambda: ExpectedAttentionPress(RATIO, n_sink=2),
    "tova": lambda: TOVAPress(RATIO),
    "keydiff": lambda: KeyDiffPress(RATIO),
    "pyramidkv": lambda: PyramidKVPress(RATIO, window_size=4),
    "adakv_expected_attention": lambda: AdaKVPress(ExpectedAttentionPress(RATIO, n_sink=2)),
}
PRESSES = {name: (lambda factory=factory: MoEAware(factory())) for name, factory in BARE_PRESSES.items()}
SCORER_PRESSES = ("knorm", "snapkv", "streaming_llm", "expected_attention", "tova", "keydiff")


def _ids(n: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
    return cache


def _press_hooks(model) -> list:
    """Forward hooks and forward pre-hooks on any module of the model that come from a press (transformers keeps
    its own output-capturing hooks)."""
    return [
        hook for module in model.modules()
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
        if "output_capturing" not in getattr(hook, "__qualname__", "")
    ]


def _assert_no_press_hooks(model) -> None:
    assert not _press_hooks(model), "a press left hooks behind"


def _assert_rows_come_from(reference: DynamicCache, compressed: DynamicCache, layer: int) -> None:
    """Every kept (key, value) of every head is the reference pair of one original token, in cache layout."""
    ref_k, ref_v = reference.layers[layer].keys, reference.layers[layer].values
    k, v = compressed.layers[layer].keys, compressed.layers[layer].values
    assert k.shape[-1] == ref_k.shape[-1] and v.shape[-1] == ref_v.shape[-1]
    for head in range(k.shape[1]):
        distance = torch.cdist(k[0, head], ref_k[0, head], compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distance.argmin(dim=-1)
        assert torch.all(distance.gather(1, nearest[:, None]) < 1e-5)
        torch.testing.assert_close(v[0, head], ref_v[0, head, nearest])
        assert nearest.unique().numel() == nearest.numel()


def _expected_kept(model, ids, press_name) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per compressible layer, the keys and values a scorer press must keep: the rows of the top-scored tokens
    (scores computed by the press itself through the MoE-aware view of the recorded prefill), in cache layout."""
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    press = BARE_PRESSES[press_name]()
    anatomy = get_anatomy(model)
    press.post_init_from_model(model)
    expected = {}
    with torch.no_grad(), _sink_aware_scorers():
        for idx, view in make_views(anatomy).items():
            record = recorder.snapshot.layers[idx]
            layout = view.layout
            rope = layout.canonical_rope(record.kwargs["position_embeddings"])
            kwargs = dict(record.kwargs, position_embeddings=rope)
            keys, values = layout.keys_to_canonical(record.keys), layout.values_to_canonical(record.values)
            scores = press.score(view, record.kwargs["hidden_states"], keys, values, record.attentions, kwargs)
            kept = scores.topk(compute_n_kept(SEQ, RATIO), dim=-1).indices  # (batch, kv_heads, n_kept)
            expected[idx] = (record.keys.gather(2, kept[..., None].expand(-1, -1, -1, record.keys.shape[-1])),
                             record.values.gather(2, kept[..., None].expand(-1, -1, -1, record.values.shape[-1])))
    return expected


@pytest.mark.parametrize("press_name", sorted(PRESSES))
def test_press_compresses_every_family(family, model, press_name):
    press = PRESSES[press_name]()
    anatomy = get_anatomy(model)
    ids = _ids()
    if family == "gpt_oss" and press_name.startswith("adakv"):
        with pytest.raises(ValueError, match="eager"):
            _prefill(model, ids, press)
        _assert_no_press_hooks(model)
        return
    reference = _prefill(model, ids)
    cache = _prefill(model, ids, press)
    lengths = [cache.layers[i].keys.shape[2] for i in range(anatomy.num_layers)]
    for idx in anatomy.sliding_layers:
        assert lengths[idx] == SEQ, "sliding-window layers are left uncompressed"
    compressed = [lengths[i] for i in anatomy.compressible_layers]
    if press_name == "pyramidkv":  # a pyramid of budgets, SEQ * (1 - RATIO) on average
        assert compressed == sorted(compressed, reverse=True) and compressed[0] > compressed[-1]
        assert all(n < SEQ for n in compressed[1:])
    elif press_name.startswith("adakv"):  # head-wise: keys stay, a share of them is masked
        assert compressed == [SEQ] * len(compressed)
        for idx in anatomy.compressible_layers:
            masked = anatomy.attention(idx).masked_key_indices
            assert masked is not None and masked[0].numel() == int(RATIO * SEQ) * cache.layers[idx].keys.shape[1]
    else:
        assert compressed == [compute_n_kept(SEQ, RATIO)] * len(compressed)
    if press_name in SCORER_PRESSES:  # exactly the rows of the top-scored tokens, in the cache's layout
        for idx, (keys, values) in _expected_kept(model, ids, press_name).items():
            assert torch.equal(cache.layers[idx].keys, keys) and torch.equal(cache.layers[idx].values, values)
    elif not press_name.startswith("adakv"):
        for idx in anatomy.compressible_layers:
            _assert_rows_come_from(reference, cache, idx)
    # decoding from the compressed cache works and gives finite logits
    with torch.no_grad():
        out = model(input_ids=_ids(3, seed=1), past_key_values=cache, position_ids=torch.arange(SEQ, SEQ + 3)[None])
    assert torch.isfinite(out.logits).all()
    for idx in anatomy.compressible_layers:
        anatomy.attention(idx).masked_key_indices = None
    if press_name == "pyramidkv":  # the ragged cache keeps its mask fitting alive, and only as long as it lives
        assert _press_hooks(model)
    del cache, out
    gc.collect()
    _assert_no_press_hooks(model)


def _greedy_by_hand(model, cache, ids, steps: int) -> list[int]:
    """Greedy tokens after prefilling ``ids`` into ``cache``, positions counted as generate counts them (from the
    prompt length, whatever the compressed cache holds), end-of-sequence excluded (``min_new_tokens=steps``)."""
    tokens = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache).logits[:, -1]
        for step in range(steps):
            logits[:, model.generation_config.eos_token_id] = float("-inf")
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
            position = torch.tensor([ids.shape[1] + step])
            logits = model(input_ids=token, past_key_values=cache, cache_position=position,
                           position_ids=position[None]).logits[:, -1]
    return tokens


@pytest.mark.parametrize("press_name", ["knorm", "snapkv", "expected_attention"])
def test_generate_under_press(family, model, press_name):
    """model.generate under a press equals greedy decoding from the cache the press builds at prefill, by hand."""
    ids = _ids()
    with torch.no_grad(), PRESSES[press_name]()(model):
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    _assert_no_press_hooks(model)
    cache = DynamicCache()
    with PRESSES[press_name]()(model):
        by_hand = _greedy_by_hand(model, cache, ids, 3)
    assert out[0, SEQ:].tolist() == by_hand
    assert cache.layers[get_anatomy(model).compressible_layers[-1]].keys.shape[2] == compute_n_kept(SEQ, RATIO) + 3


@pytest.fixture(scope="module")
def pipes():
    from pikv_press.testing import build_tokenizer

    tokenizer = build_tokenizer()
    return {f: pipeline("kv-press-text-generation", model=get_model(f), tokenizer=tokenizer) for f in MOE_FAMILY_NAMES}


CONTEXT = " ".join(TRAINING_TEXT[:4])


@pytest.mark.parametrize("press_name", [None, *sorted(PRESSES)])
def test_pipeline_every_family(pipes, family, press_name):
    """The pipeline's answer equals the greedy answer from the same compressed cache, built by hand."""
    pipe = pipes[family]
    anatomy = get_anatomy(pipe.model)
    press = None if press_name is None else PRESSES[press_name]()
    # kvpress's AdaKV masks keys with a hyperplane that must repel every question query; random tiny models make
    # that impossible for long questions ("Could not find fake keys"), so AdaKV answers from the chat suffix alone.
    question = "" if press_name and press_name.startswith("adakv") else "What is the capital of France?"
    if family == "gpt_oss" and press_name and press_name.startswith("adakv"):
        with pytest.raises(ValueError, match="eager"):
            pipe(CONTEXT, question="What is the capital of France?", press=press)
        return
    cache = DynamicCache()
    result = pipe(CONTEXT, question=question, press=press, max_new_tokens=4, cache=cache)
    inputs = pipe.preprocess(CONTEXT, [question], "", 10**6)
    context_len = inputs["context_ids"].shape[1]
    lengths = [cache.layers[i].keys.shape[2] for i in anatomy.compressible_layers]
    if press_name is None or press_name.startswith("adakv"):
        assert lengths == [context_len] * len(lengths)
    elif press_name == "pyramidkv":
        assert max(lengths[1:]) < context_len
    else:
        assert lengths == [compute_n_kept(context_len, RATIO)] * len(lengths)
    by_hand = DynamicCache()
    with torch.no_grad():
        with PRESSES[press_name]()(pipe.model) if press_name else contextlib.nullcontext():
            pipe.model.model(input_ids=inputs["context_ids"], past_key_values=by_hand)
        answer = pipe.generate_answer(inputs["questions_ids"][0], by_hand, context_len, 4)
    assert result["answer"] == answer
    for idx in anatomy.compressible_layers:
        anatomy.attention(idx).masked_key_indices = None
    del cache, by_hand
    gc.collect()
    _assert_no_press_hooks(pipe.model)


def _prefill_with_attention_hook(model, hook) -> None:
    """Prefill 24 tokens with ``hook`` on every compressible attention module (removed afterwards)."""
    anatomy = get_anatomy(model)
    handles = [anatomy.attention(i).register_forward_hook(hook, with_kwargs=True) for i in anatomy.compressible_layers]
    try:
        _prefill(model, _ids(24))
    finally:
        for handle in handles:
            handle.remove()


def test_query_scores_equal_the_models_attention(family, eager_model):
    """Queries, QK norms, RoPE layout, logit scale and sinks as the model computes them: exact attention weights."""
    errors = view_attention_errors(eager_model, _ids(24))
    assert len(errors) == len(get_anatomy(eager_model).compressible_layers)
    assert max(errors) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_plain_kvpress_scores_are_wrong_on_query_norm_families(family):
    """What the compat layer fixes: kvpress alone rebuilds Qwen3-MoE / OLMoE queries without their norm."""
    model = get_model(family, "eager")
    errors = []

    def hook(module, args, kwargs, output):
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        ours = SnapKVPress.compute_window_attention(module, kwargs["hidden_states"], keys, 8,
                                                    kwargs["position_embeddings"])
        errors.append((ours - output[1][..., -8:, :-8]).abs().max().item())

    _prefill_with_attention_hook(model, hook)
    assert max(errors) > 1e-2


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v3", "glm4_moe", "llama"])
def test_ragged_cache_decodes_like_token_by_token(family):
    """After PyramidKV (different lengths per layer, and GPT-OSS's full sliding layers), a block of new tokens gives
    the same logits as feeding them one at a time, where no mask is involved."""
    model = get_model(family)
    cache = _prefill(model, _ids(), MoEAware(PyramidKVPress(RATIO, window_size=4)))
    question = _ids(4, seed=2)
    block_cache, step_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.no_grad():
        block = model(input_ids=question, past_key_values=block_cache,
                      position_ids=torch.arange(SEQ, SEQ + 4)[None]).logits[:, -1]
        for i in range(4):
            step = model(input_ids=question[:, i : i + 1], past_key_values=step_cache,
                         position_ids=torch.tensor([[SEQ + i]])).logits[:, -1]
    torch.testing.assert_close(block, step, rtol=1e-4, atol=1e-5)


@dataclass
class FailingPress(ScorerPress):
    """Raises inside its hook, after the compat layer has put the cache in canonical layout."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        raise RuntimeError("scorer failed")


@dataclass
class FailingHookPress(DecodingPress):
    """A press with its own forward hook (it reads the cache itself) that raises inside it."""

    def forward_hook(self, module, input, kwargs, output):
        raise RuntimeError("scorer failed")


@pytest.mark.parametrize("failing", [FailingPress, FailingHookPress])
def test_hooks_removed_and_cache_restored_when_forward_raises(family, model, failing):
    anatomy = get_anatomy(model)
    cache = DynamicCache()
    press = failing(RATIO) if failing is FailingPress else failing(base_press=KnormPress(), compression_interval=1)
    with pytest.raises(RuntimeError, match="scorer failed"):
        with torch.no_grad(), MoEAware(press)(model):
            model.model(input_ids=_ids(), past_key_values=cache)
            model.model(input_ids=_ids(1), past_key_values=cache)  # a decoding step: DecodingPress's hook acts
    _assert_no_press_hooks(model)
    first = anatomy.compressible_layers[0]
    layout = AttentionLayout(anatomy.attention(first), anatomy.family, anatomy.config)
    assert cache.layers[first].keys.shape[-1] == layout.qk_dim
    assert cache.layers[first].values.shape[-1] == layout.v_dim
    reference = _prefill(model, _ids())
    assert torch.equal(cache.layers[first].keys[:, :, :SEQ], reference.layers[first].keys)
    assert torch.equal(cache.layers[first].values[:, :, :SEQ], reference.layers[first].values)


def test_expected_attention_counts_gpt_oss_sinks():
    model = build_model("gpt_oss", seed=3)
    anatomy = get_anatomy(model)
    module = anatomy.attention(anatomy.compressible_layers[0])
    captured = {}

    def hook(mod, args, kwargs, output):
        captured.update(kwargs=kwargs, keys=kwargs["past_key_values"].layers[mod.layer_idx].keys.clone(),
                        values=kwargs["past_key_values"].layers[mod.layer_idx].values.clone())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        _prefill(model, _ids())
    finally:
        handle.remove()
    view = make_views(anatomy)[module.layer_idx]
    press = ExpectedAttentionPress(RATIO, n_sink=2)
    args = (view, captured["kwargs"]["hidden_states"], captured["keys"], captured["values"], None, {})
    with torch.no_grad():
        without_sinks = _ORIGINAL_EXPECTED_ATTENTION_SCORE(press, *args)
        assert torch.equal(press.score(*args), without_sinks), "kvpress's own score outside a MoE-aware press"
        with _sink_aware_scorers():
            with_sinks = press.score(*args)
        assert not torch.allclose(with_sinks, without_sinks)
        assert ExpectedAttentionPress.score is _ORIGINAL_EXPECTED_ATTENTION_SCORE
        module.sinks.data.fill_(-1e4)  # a sink that takes no attention: both computations agree
        with _sink_aware_scorers():
            torch.testing.assert_close(press.score(*args), without_sinks)


def test_adakv_needs_non_eager_attention():
    with pytest.raises(ValueError, match="sdpa"):
        _prefill(get_model("qwen3_moe", "eager"), _ids(), MoEAware(AdaKVPress(KnormPress(RATIO))))


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_composed_and_decoding_presses(pipes, family):
    pipe = pipes[family]
    composed = MoEAware(ComposedPress([StreamingLLMPress(0.25, n_sink=2), SnapKVPress(0.25, window_size=4)]))
    cache = _prefill(pipe.model, _ids(), composed)
    layer = get_anatomy(pipe.model).compressible_layers[-1]
    assert cache.layers[layer].keys.shape[2] == compute_n_kept(compute_n_kept(SEQ, 0.25), 0.25)
    decoding = MoEAware(DecodingPress(base_press=KnormPress(), compression_interval=2, target_size=24))
    assert isinstance(decoding, DecodingPress), "the pipeline must still see a decoding press"
    cache = DynamicCache()
    pipe(CONTEXT, question="What is the capital?", press=decoding, max_new_tokens=6, cache=cache)
    assert cache.layers[layer].keys.shape[2] <= 40
    del cache
    gc.collect()
    _assert_no_press_hooks(pipe.model)


def _same_cache(a: DynamicCache, b: DynamicCache) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
               for x, y in zip(a.layers, b.layers, strict=True))


def test_dense_models_keep_kvpress_behaviour():
    """Dense models: MoEAware, the scoped switch and the global switch all give kvpress's own keys and values."""
    model = get_model("llama")
    ids = _ids()
    plain = _prefill(model, ids, SnapKVPress(RATIO, window_size=4))  # plain kvpress first
    wrapped = _prefill(model, ids, MoEAware(SnapKVPress(RATIO, window_size=4)))
    with kvpress_moe_support():
        scoped = _prefill(model, ids, SnapKVPress(RATIO, window_size=4))
    assert _same_cache(plain, wrapped) and _same_cache(plain, scoped)
    assert plain.layers[0].keys.shape[2] == compute_n_kept(SEQ, RATIO)


def test_switch_off_equals_plain_kvpress():
    """On an MoE family where the switch matters (Qwen3-MoE query norm), kvpress after the scoped switch is turned off
    behaves exactly as kvpress before it was ever turned on."""
    model = get_model("qwen3_moe")
    ids = _ids()
    before = _prefill(model, ids, SnapKVPress(RATIO, window_size=4))
    with kvpress_moe_support():
        inside = _prefill(model, ids, SnapKVPress(RATIO, window_size=4))
        assert pikv_press.is_moe_aware(SnapKVPress(RATIO))
    after = _prefill(model, ids, SnapKVPress(RATIO, window_size=4))
    wrapped = _prefill(model, ids, MoEAware(SnapKVPress(RATIO, window_size=4)))
    assert _same_cache(before, after)
    assert _same_cache(inside, wrapped)
    assert not _same_cache(before, inside), "the MoE-aware path must differ here (kvpress skips Qwen3's query norm)"
    assert not pikv_press.is_moe_aware(SnapKVPress(RATIO))


def test_import_changes_nothing_in_kvpress_or_transformers():
    script = (
        "import kvpress, transformers\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "from kvpress import BasePress, ExpectedAttentionPress, SnapKVPress\n"
        "before = (BasePress.__call__, ExpectedAttentionPress.score, SnapKVPress.__dict__['compute_window_attention'],"
        " dict(ALL_ATTENTION_FUNCTIONS._global_mapping))\n"
        "import pikv_press, pikv_press.prefill, pikv_press.compat\n"
        "after = (BasePress.__call__, ExpectedAttentionPress.score, SnapKVPress.__dict__['compute_window_attention'],"
        " dict(ALL_ATTENTION_FUNCTIONS._global_mapping))\n"
        "assert before == after, (before, after)\n"
        "print('unchanged')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-2000:]


def test_global_switch_and_uninstall():
    from kvpress import BasePress

    from pikv_press import compat

    assert BasePress.__call__ is compat._ORIGINAL_CALL and not compat.is_installed()
    pikv_press.install_kvpress_compat()
    try:
        assert BasePress.__call__ is compat._moe_aware_call and compat.is_installed()
        with kvpress_moe_support():  # nested scopes do not turn the global switch off
            pass
        assert BasePress.__call__ is compat._moe_aware_call
    finally:
        pikv_press.uninstall_kvpress_compat()
    assert BasePress.__call__ is compat._ORIGINAL_CALL and not compat.is_installed()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("press", [FastKVzipPress, KVComposePress])
def test_presses_with_their_own_forward_passes_are_refused_on_moe(family, press):
    model = get_model(family)
    with pytest.raises(ValueError, match=f"{press.__name__}.*{family}.*SnapKVPress"):
        _prefill(model, _ids(), MoEAware(press()))
    _assert_no_press_hooks(model)
    # KVzipPress runs MoE-correct as the press itself (tests/test_kvzip_moe.py), not nested in another press
    with pytest.raises(ValueError, match=f"KVzipPress.*{family}.*not nested"):
        _prefill(model, _ids(), MoEAware(PrefillDecodingPress(prefilling_press=KVzipPress(0.5))))
    _assert_no_press_hooks(model)


def test_moe_aware_keeps_the_press_class_and_parameters():
    inner = SnapKVPress(0.3, window_size=4)
    wrapped = MoEAware(inner)
    assert isinstance(wrapped, SnapKVPress) and wrapped.compression_ratio == 0.3 and wrapped.window_size == 4
    assert MoEAware(wrapped) is wrapped and type(inner) is SnapKVPress
    with pytest.raises(TypeError, match="BasePress"):
        MoEAware("snapkv")
    assert type(MoEAware(SnapKVPress(0.5))) is type(wrapped)
    assert {type(p).__name__ for p in inner_presses(MoEAware(PrefillDecodingPress(
        prefilling_press=SnapKVPress(0.5), decoding_press=DecodingPress(base_press=KnormPress()))))} == {
        "MoEAwarePrefillDecodingPress", "SnapKVPress", "DecodingPress", "KnormPress"}


def test_unknown_moe_architecture_warns_and_known_family_with_unexpected_layout_raises(caplog):
    from pikv_press.compat import moe_anatomy_for_press

    model = build_model("qwen3_moe")
    model.config.model_type = "qwen9_moe"  # an MoE family pikv-press does not know
    with caplog.at_level(logging.WARNING, logger="pikv_press.compat"):
        assert moe_anatomy_for_press(model) is None
    assert "does not know this MoE architecture" in caplog.text
    dense = get_model("llama")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pikv_press.compat"):
        assert moe_anatomy_for_press(dense) is None
    assert not caplog.text
    broken = build_model("mixtral")
    broken.model.layers[1].mlp = torch.nn.Identity()  # config says MoE, module has no router
    with pytest.raises(ValueError, match="layer 1"):
        _prefill(broken, _ids(), MoEAware(KnormPress(RATIO)))


@pytest.mark.parametrize("family, cache_name", [("qwen3_moe", "packed-int8"), ("glm4_moe", "dynamic"),
                                                ("deepseek_v3", "dynamic")])
def test_in_place_presses_reach_caches_read_as_copies(family, cache_name):
    """ThinK zeroes key channels in place and returns the same tensor: on a quantized layer, or under a layout
    transform (GLM's partial RoPE, DeepSeek's MLA keys), the canonical keys are a copy, and the change must still reach
    the cache (zero channels quantize to exact zeros)."""
    from kvpress import ThinKPress

    from pikv_press.cache import layer_access, make_cache

    model = build_model(family)
    cache = make_cache(cache_name, model.config)
    with torch.no_grad(), MoEAware(ThinKPress(key_channel_compression_ratio=0.5, window_size=4))(model):
        model.model(input_ids=_ids(), past_key_values=cache)
    layout = AttentionLayout(get_anatomy(model).attention(0), get_anatomy(model).family, model.config)
    keys, _ = layer_access(cache.layers[0]).read()
    canonical = layout.keys_to_canonical(keys)
    zero_channels = (canonical == 0).all(dim=2)  # (batch, heads, dim): channels zero over every token
    assert int(zero_channels.sum(-1).min()) >= canonical.shape[-1] // 2
