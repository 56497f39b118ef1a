"""KVzip made MoE-correct (``MoEAware(KVzipPress(...))``, pikv_press/kvzip.py): its scores are KVzip's formula on the
model's own post-RoPE queries and keys, the cache keeps the context only, and its evictions have KVzip's budget."""
from __future__ import annotations

import math

import pytest
import torch
from kvpress import FastKVzipPress, KVzipPress
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pikv_press import MoEAware, get_anatomy
from pikv_press.attention import headwise
from pikv_press.kvzip import _template
from pikv_press.prefill import can_replay
from pikv_press.testing import MOE_FAMILY_NAMES, VOCAB
from tests.conftest import get_model, press_hooks

SUPPORTED = tuple(f for f in MOE_FAMILY_NAMES if f != "gpt_oss")  # attention sinks and sliding layers: refused
N_SINK = 2


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


class _Capture:
    """Records each attention call's (layer, query, key, scaling) during the reconstruction passes (query length
    differs from key length), from transformers' own SDPA call: the model's true post-RoPE queries and keys."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def __enter__(self):
        self.original = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
            if query.shape[2] != key.shape[2]:
                self.calls.append((module.layer_idx, query.detach().clone(), key.detach().clone(),
                                   kwargs.get("scaling", module.scaling)))
            return self.original(module, query, key, value, attention_mask, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        return self

    def __exit__(self, *exc):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = self.original


def _reference_scores(calls, n_layers: int, ctx_len: int, chunks: list[tuple[int, int]], n_sink: int):
    """KVzip's score (arXiv 2505.23416, kvpress's ``score_kvzip``) from the captured queries and keys: softmax of the
    reconstruction queries over (sinks, the chunk, the reconstruction itself, causal), max over queries and the
    heads of each kv group, per context token."""
    scores = torch.zeros(n_layers, 1, calls[0][2].shape[1], ctx_len, dtype=torch.float64)
    per_layer: dict[int, int] = {}
    for layer, query, key, scaling in calls:
        start, end = chunks[per_layer.get(layer, 0)]
        per_layer[layer] = per_layer.get(layer, 0) + 1
        bsz, heads, q_len, _ = query.shape
        kv_heads = key.shape[1]
        sink = min(n_sink, start)
        sub = torch.cat([key[:, :, :sink], key[:, :, start:end], key[:, :, -q_len:]], dim=2).double()
        q = query.double().view(bsz, kv_heads, heads // kv_heads, q_len, -1)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, sub) * scaling
        causal = torch.ones(q_len, q_len, dtype=torch.bool).triu(1)
        logits[..., -q_len:] = logits[..., -q_len:].masked_fill(causal, float("-inf"))
        weights = logits.softmax(-1)[..., sink: sink + end - start]
        scores[layer, ..., start:end] = weights.amax(dim=(-3, -2))
    return scores


def _run(model, ids, press):
    """Prefill ``ids`` with ``press``; return (cache, score table before the sinks are raised, captured calls)."""
    seen = {}
    original_post = press.compress_post

    def compress_post(shape_model):
        seen["scores"] = press.score_val.detach().clone()
        return original_post(shape_model)

    press.compress_post = compress_post
    cache = DynamicCache()
    with _Capture() as capture, torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    return cache, seen.get("scores"), capture.calls


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("chunk_size", [64, 9])
def test_kvzip_scores_are_kvzips_formula_on_the_models_own_queries_and_keys(family, chunk_size, tokenizer):
    model = get_model(family)
    ids = _ids(26)
    press = MoEAware(KVzipPress(0.5, n_sink=N_SINK, chunk_size=chunk_size))
    press.tokenizer = tokenizer
    reference = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=reference)
    cache, scores, calls = _run(model, ids, press)
    anatomy = get_anatomy(model)
    assert scores is not None and calls
    # the chunks KVzip reconstructs: the context after the chat-template prefix, chunk_size tokens at a time
    prefix = len(tokenizer.encode(_template(tokenizer)[0], add_special_tokens=False))
    ctx = ids.shape[1]
    n_chunks = math.ceil((ctx - prefix) / chunk_size)
    assert len(calls) == n_chunks * anatomy.num_layers
    bounds = [(prefix + i * chunk_size, min(ctx, prefix + (i + 1) * chunk_size)) for i in range(n_chunks)]
    expected = _reference_scores(calls, anatomy.num_layers, ctx, bounds, N_SINK)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    assert (expected[..., max(prefix, N_SINK):] > 0).all()  # every context token was scored by the reconstruction
    # the cache keeps the context only, bit for bit the plain prefill's
    for layer in range(anatomy.num_layers):
        assert torch.equal(cache.layers[layer].keys, reference.layers[layer].keys)
        assert torch.equal(cache.layers[layer].values, reference.layers[layer].values)
    # KVzip's budget: half of all (layer, kv head, token) entries masked, none of the sinks
    masked = [anatomy.attention(i).masked_key_indices for i in range(anatomy.num_layers)]
    total = sum(m[2].numel() for m in masked)
    kv_heads = reference.layers[0].keys.shape[1]
    assert total == int(anatomy.num_layers * kv_heads * ctx * 0.5)
    assert all((m[2] >= N_SINK).all() for m in masked)
    assert all(getattr(anatomy.attention(i), headwise.EXACT_MASK_TAG) for i in range(anatomy.num_layers))
    assert not press_hooks(model)
    for i in range(anatomy.num_layers):  # leave the shared tiny model as it was
        anatomy.attention(i).masked_key_indices = None


def test_kvzip_masked_tokens_are_the_lowest_scored(tokenizer):
    model = get_model("glm4_moe")  # partial RoPE: kvpress's own KVzip rotates the whole head
    anatomy = get_anatomy(model)
    press = MoEAware(KVzipPress(0.25, n_sink=N_SINK, layerwise=True))
    press.tokenizer = tokenizer
    cache, scores, _ = _run(model, _ids(30, seed=3), press)
    for layer in range(anatomy.num_layers):
        batch, head, seq = anatomy.attention(layer).masked_key_indices
        table = scores[layer, 0].float().clone()
        table[:, :N_SINK] = float("inf")
        n = int(table.numel() * 0.25)
        assert seq.numel() == n  # layerwise: the same count in every layer
        kept = torch.ones_like(table, dtype=torch.bool)
        kept[head, seq] = False
        assert table[~kept].max() <= table[kept].min()
        anatomy.attention(layer).masked_key_indices = None


def test_kvzip_decodes_as_eager_attention_without_the_masked_tokens(tokenizer):
    """After KVzip the next token's logits equal those of a model that never saw the masked (head, token) pairs."""
    model = get_model("qwen3_moe")
    anatomy = get_anatomy(model)
    ids = _ids(24, seed=5)
    press = MoEAware(KVzipPress(0.5, n_sink=N_SINK))
    press.tokenizer = tokenizer
    cache, _, _ = _run(model, ids, press)
    masks = [anatomy.attention(i).masked_key_indices for i in range(anatomy.num_layers)]
    step = torch.tensor([[7]])
    with torch.no_grad():
        logits = model(input_ids=step, past_key_values=cache).logits[0, -1]
    # reference: the same step with every masked key's logit sent to -inf by hand (eager maths, float64)
    reference = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=reference)
    captured = {}

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        b, h, s = masks[module.layer_idx]
        groups = query.shape[1] // key.shape[1]
        logits_ = torch.einsum("bhqd,bhkd->bhqk", query.double(),
                               key.double().repeat_interleave(groups, 1)) * kwargs.get("scaling", module.scaling)
        blocked = torch.zeros(key.shape[0], key.shape[1], key.shape[2], dtype=torch.bool)
        blocked[b, h, s] = True
        logits_ = logits_.masked_fill(blocked.repeat_interleave(groups, 1)[:, :, None, :], float("-inf"))
        out = logits_.softmax(-1) @ value.double().repeat_interleave(groups, 1)
        captured[module.layer_idx] = True
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    try:
        with torch.no_grad():
            expected = model(input_ids=step, past_key_values=reference).logits[0, -1]
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    assert len(captured) == anatomy.num_layers
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for i in range(anatomy.num_layers):
        anatomy.attention(i).masked_key_indices = None


def test_kvzip_bad_input_is_refused_and_leaves_nothing_behind(tokenizer):
    press = MoEAware(KVzipPress(0.5))
    press.tokenizer = tokenizer
    with pytest.raises(ValueError, match="sinks"):
        with press(get_model("gpt_oss")):
            pass
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        with press(get_model("qwen3_moe", "eager")):
            pass
    model = get_model("mixtral")
    with pytest.raises(ValueError, match="batch size 1"):
        with torch.no_grad(), press(model):
            model.model(input_ids=_ids(12).repeat(2, 1), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="DynamicCache"):
        with torch.no_grad(), press(model):
            model.model(input_ids=_ids(12))  # no cache to compress
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            raise RuntimeError("boom")
    assert not press_hooks(model)
    untokenized = MoEAware(KVzipPress(0.5))  # the tiny model's name_or_path holds no tokenizer
    with pytest.raises(ValueError, match="press.tokenizer"):
        with untokenized(model):
            pass
    # nested, or FastKVzip: still refused (their own forward passes escape the MoE-aware hooks)
    with pytest.raises(ValueError, match="FastKVzipPress"):
        with MoEAware(FastKVzipPress(0.5))(model):
            pass
    assert not can_replay(press)
    assert not press_hooks(model)


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v2"])
def test_kvzip_replay_equals_the_live_press_and_reconstructs_once(family, tokenizer):
    """The harness's prefill-once path: replaying KVzip on a recorded prefill gives the live press's masks at every
    ratio, and the reconstruction runs once per record (the scores do not depend on the ratio)."""
    from pikv_press.prefill import PrefillRecorder

    model = get_model(family)
    anatomy = get_anatomy(model)
    ids = _ids(28, seed=7)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    snapshot = recorder.snapshot
    prefix = len(tokenizer.encode(_template(tokenizer)[0], add_special_tokens=False))
    chunks = math.ceil((ids.shape[1] - prefix) / 10)
    assert chunks >= 2
    passes = []
    handle = anatomy.language_model.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        for ratio in (0.25, 0.5, 0.75):
            live = MoEAware(KVzipPress(ratio, n_sink=N_SINK, chunk_size=10))
            live.tokenizer = tokenizer
            passes.clear()
            with torch.no_grad(), live(model):
                model.model(input_ids=ids, past_key_values=DynamicCache())
            live_masks = [tuple(t.clone() for t in anatomy.attention(i).masked_key_indices)
                          for i in range(anatomy.num_layers)]
            assert len(passes) == 1 + chunks  # the prefill, then the reconstruction chunks
            replayed = MoEAware(KVzipPress(ratio, n_sink=N_SINK, chunk_size=10))
            replayed.tokenizer = tokenizer
            assert can_replay(replayed, model) and not can_replay(replayed)
            passes.clear()
            cache = snapshot.replay(replayed)
            assert len(passes) == (chunks if ratio == 0.25 else 0)  # reconstructed for the first ratio only
            for i in range(anatomy.num_layers):
                for a, b in zip(live_masks[i], anatomy.attention(i).masked_key_indices, strict=True):
                    assert torch.equal(a.cpu(), b.cpu())
                assert torch.equal(cache.layers[i].keys, snapshot.layers[i].keys)  # the full context, unmasked
    finally:
        handle.remove()
        for i in range(anatomy.num_layers):
            anatomy.attention(i).masked_key_indices = None
    assert len(snapshot.memo) == 1 and torch.equal(snapshot.input_ids, ids)
    assert not press_hooks(model)


def test_kvzip_plus_runs_and_differs_from_kvzip_and_is_refused_on_latent_attention(tokenizer):
    """KVzip+ (value-norm and hidden-norm weighting) changes the scores on a GQA family; on latent attention (no
    per-head value projection in the cache's layout) it is refused rather than crashing."""
    model = get_model("qwen3_moe")
    ids = _ids(20, seed=11)
    tables = []
    for plus in (False, True):
        press = MoEAware(KVzipPress(0.5, n_sink=N_SINK, kvzip_plus_normalization=plus))
        press.tokenizer = tokenizer
        tables.append(_run(model, ids, press)[1])
    assert not torch.allclose(tables[0], tables[1])
    plus = MoEAware(KVzipPress(0.5, kvzip_plus_normalization=True))
    plus.tokenizer = tokenizer
    with pytest.raises(ValueError, match="latent attention"):
        with plus(get_model("deepseek_v3")):
            pass
    anatomy = get_anatomy(model)
    for i in range(anatomy.num_layers):
        anatomy.attention(i).masked_key_indices = None
    assert not press_hooks(model) and not press_hooks(get_model("deepseek_v3"))


def test_kvzip_under_the_global_switch_is_the_moe_correct_kvzip(tokenizer):
    """Inside ``kvpress_moe_support()`` a plain ``KVzipPress`` runs the MoE-correct call (the same masks as
    ``MoEAware(KVzipPress)``); nested it is still refused, and kvpress's own call is back after the block."""
    from kvpress import PrefillDecodingPress

    from pikv_press import kvpress_moe_support
    from pikv_press.compat import original_kvpress_call

    model = get_model("glm4_moe")  # partial RoPE: kvpress's own KVzip scores differ here
    anatomy = get_anatomy(model)
    ids = _ids(26, seed=11)
    original = KVzipPress.__call__
    try:
        wrapped = MoEAware(KVzipPress(0.5, n_sink=N_SINK))
        wrapped.tokenizer = tokenizer
        _, expected, _ = _run(model, ids, wrapped)
        expected_masks = [tuple(t.clone() for t in anatomy.attention(i).masked_key_indices)
                          for i in range(anatomy.num_layers)]
        for i in range(anatomy.num_layers):
            anatomy.attention(i).masked_key_indices = None
        with kvpress_moe_support():
            plain = KVzipPress(0.5, n_sink=N_SINK)
            plain.tokenizer = tokenizer
            _, scores, _ = _run(model, ids, plain)
            torch.testing.assert_close(scores, expected, rtol=0, atol=0)
            for i in range(anatomy.num_layers):
                for a, b in zip(expected_masks[i], anatomy.attention(i).masked_key_indices, strict=True):
                    assert torch.equal(a, b)
            with pytest.raises(ValueError, match="KVzipPress.*not nested"):
                with PrefillDecodingPress(prefilling_press=plain)(model):
                    pass
        assert KVzipPress.__call__ is original is original_kvpress_call(KVzipPress)
        assert not press_hooks(model)
    finally:
        for i in range(anatomy.num_layers):
            anatomy.attention(i).masked_key_indices = None


def test_kvzip_leaves_the_cache_holding_exactly_the_contexts_bytes(tokenizer):
    """The reconstruction tokens are cut from each layer after every chunk; the cut must not keep their storage alive
    (measured on an H200: a slice left one chunk of storage per layer, 16 MiB on 4 Qwen3-30B-A3B layers)."""
    from pikv_press import cache_nbytes

    model, ids = get_model("qwen3_moe"), _ids(60)
    full = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
    press = MoEAware(KVzipPress(0.5, chunk_size=16))
    press.tokenizer = tokenizer
    cache, _, _ = _run(model, ids, press)
    assert [layer.keys.shape for layer in cache.layers] == [layer.keys.shape for layer in full.layers]
    assert cache_nbytes(cache) == cache_nbytes(full)
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
