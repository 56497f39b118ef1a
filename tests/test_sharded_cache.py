"""ExpertShardedCache + pikv_sharded attention: exact against eager/SDPA on every family, ragged storage, devices."""

from __future__ import annotations

import gc

import pytest
import torch
from kvpress import AdaKVPress, KnormPress
from transformers import DynamicCache

import pikv_press.attention.sharded  # noqa: F401  (registers pikv_sharded)
from pikv_press.cache import cache_nbytes, layer_access
from pikv_press.cache.sharded import LOCAL, ExpertShardedCache, parse_devices
from pikv_press.compat import MoEAware
from pikv_press.moe import get_anatomy
from pikv_press.presses import AdaKVExpectedAttentionPress, PiKVPress
from pikv_press.testing import MOE_FAMILY_NAMES, build_model

TOL = dict(atol=1e-5, rtol=1e-5)
PREFILL, DECODE = 18, 5
_MODELS: dict = {}


def model_of(family: str, impl: str):
    key = (family, impl)
    if key not in _MODELS:
        _MODELS[key] = build_model(family, attn_implementation=impl)
    return _MODELS[key]


def token_ids(seed: int = 0, length: int = PREFILL + DECODE) -> torch.Tensor:
    return torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model, cache, ids, press=None):
    """Prefill ``ids[:, :PREFILL]`` (inside ``press``), then decode the rest teacher-forced; all logits."""
    if press is None:
        logits = [model(ids[:, :PREFILL], past_key_values=cache).logits]
    else:
        with press(model):
            logits = [model(ids[:, :PREFILL], past_key_values=cache).logits]
    for i in range(PREFILL, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], past_key_values=cache).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
@pytest.mark.parametrize("evict", [False, True])
def test_sharded_equals_eager_prefill_and_decode(family, evict):
    """Every shard read: the logits of prefill and of every decoding step equal eager attention over a DynamicCache,
    without eviction and after MoEAware(KnormPress(0.5)) (the same rows kept in both caches)."""
    ids = token_ids()
    eager, sharded = model_of(family, "eager"), model_of(family, "pikv_sharded")
    reference = run(eager, DynamicCache(config=eager.config), ids, MoEAware(KnormPress(0.5)) if evict else None)
    with ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as cache:
        out = run(sharded, cache, ids, MoEAware(KnormPress(0.5)) if evict else None)
        anatomy = get_anatomy(sharded)
        layer = cache.layers[anatomy.compressible_layers[-1]]
        expert_rows = sum(rows.n for e, rows in layer.all_shards() if e != LOCAL)
        assert expert_rows > 0, "tokens never left the local shard"
        kept = (PREFILL // 2 if evict else PREFILL) + DECODE
        assert layer.head_counts().tolist() == [kept] * layer.kv_heads
    torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "glm4_moe"])
def test_pikv_press_frees_the_sharded_rows_and_decodes_as_eager(family):
    """PiKVPress (uniform budgets) on the sharded cache: half the rows and their bytes go, and every logit equals
    eager attention over a DynamicCache compressed by the same press."""
    ids = token_ids()
    eager, sharded = model_of(family, "eager"), model_of(family, "pikv_sharded")
    reference = run(eager, DynamicCache(config=eager.config), ids, PiKVPress(0.5))
    with ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as full, \
            ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as cache, torch.no_grad():
        sharded(ids[:, :PREFILL], past_key_values=full)
        with PiKVPress(0.5)(sharded):
            prefill = sharded(ids[:, :PREFILL], past_key_values=cache).logits
        compressed_bytes, full_bytes = cache_nbytes(cache), cache_nbytes(full)
        out = torch.cat([prefill] + [sharded(ids[:, i:i + 1], past_key_values=cache).logits
                                     for i in range(PREFILL, ids.shape[1])], dim=1)
        layer = cache.layers[get_anatomy(sharded).compressible_layers[-1]]
        assert layer.head_counts().tolist() == [PREFILL // 2 + DECODE] * layer.kv_heads
    assert compressed_bytes <= 0.55 * full_bytes
    torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe"])
def test_sharded_equals_sdpa_with_generate(family):
    """model.generate with the sharded cache writes what SDPA with a DynamicCache writes (greedy)."""
    ids = token_ids(1, 12)
    sdpa, sharded = model_of(family, "sdpa"), model_of(family, "pikv_sharded")
    expected = sdpa.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=DynamicCache(config=sdpa.config))
    with ExpertShardedCache(sharded, recent_tokens=2) as cache:
        got = sharded.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("make_press", [lambda r: MoEAware(AdaKVPress(KnormPress(r))),
                                       AdaKVExpectedAttentionPress], ids=["adakv_knorm", "adakv_expected_attention"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v2", "glm4_moe", "phimoe"])
def test_adakv_head_budgets_are_freed_and_exact(family, make_press):
    """AdaKV's head-wise budgets: kvpress masks them in a DynamicCache (0% of the bytes freed); the sharded cache
    removes the rows (>= 95% of the nominal evicted share of its bytes freed, counted from storage) and decodes as
    SDPA does over the masked dense cache."""
    ratio = 0.5
    ids = token_ids()
    sdpa, sharded = model_of(family, "sdpa"), model_of(family, "pikv_sharded")
    press = make_press(ratio)
    with torch.no_grad():
        full_dense, dense = DynamicCache(config=sdpa.config), DynamicCache(config=sdpa.config)
        sdpa(ids[:, :PREFILL], past_key_values=full_dense)
        with press(sdpa):
            sdpa(ids[:, :PREFILL], past_key_values=dense)
        dense_freed = (cache_nbytes(full_dense) - cache_nbytes(dense)) / (ratio * cache_nbytes(full_dense))
        reference = torch.cat([sdpa(ids[:, i:i + 1], past_key_values=dense).logits
                               for i in range(PREFILL, ids.shape[1])], dim=1)
    assert dense_freed == 0.0
    with ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as full, \
            ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as cache, torch.no_grad():
        sharded(ids[:, :PREFILL], past_key_values=full)
        with press(sharded):
            sharded(ids[:, :PREFILL], past_key_values=cache)
        freed = (cache_nbytes(full) - cache_nbytes(cache)) / (ratio * cache_nbytes(full))
        counts = [layer.head_counts() for layer in cache.layers]
        ragged = [i for i, c in enumerate(counts) if len(set(c.tolist())) > 1]
        assert ragged, "AdaKV gave every head the same budget here"
        assert all(int(c.sum()) == c.numel() * (PREFILL - int(PREFILL * ratio)) for c in counts)
        with pytest.raises(ValueError, match="different numbers of tokens per kv head"):
            layer_access(cache.layers[ragged[0]]).read()
        out = torch.cat([sharded(ids[:, i:i + 1], past_key_values=cache).logits
                         for i in range(PREFILL, ids.shape[1])], dim=1)
    assert freed >= 0.95, freed
    torch.testing.assert_close(out, reference, **TOL)


def test_storage_is_ragged_per_shard_and_counted():
    """Shards hold their own lengths; cache_nbytes counts exactly the rows held (keys, values, row metadata)."""
    model = model_of("qwen2_moe", "pikv_sharded")
    with ExpertShardedCache(model, sink_tokens=2, recent_tokens=3) as cache:
        with torch.no_grad():
            model(token_ids()[:, :PREFILL], past_key_values=cache)
        layer = cache.layers[-1]
        lengths = cache.shard_lengths(len(cache.layers) - 1)
        assert sum(lengths.values()) == PREFILL and lengths[LOCAL] == 2 + 3
        assert len(set(lengths.values())) > 1
        row_bytes = 2 * 16 * 4 + 4 + 8 + 4  # fp32 key and value of head_dim 16, head int32, index int64, expert int32
        per_layer = [sum(rows.n for _, rows in lay.all_shards()) * row_bytes for lay in cache.layers]
        assert cache_nbytes(cache) == sum(per_layer)
        assert layer.read()[0].shape == (1, 2, PREFILL, 16)


def test_routing_restricted_decoding_reads_fewer_bytes():
    model = model_of("olmoe", "pikv_sharded")
    ids = token_ids(2, 40)
    with ExpertShardedCache(model, sink_tokens=2, recent_tokens=2) as cache:
        with torch.no_grad():
            model(ids[:, :39], past_key_values=cache)
            cache.reset_bytes_read()
            full = model(ids[:, 39:], past_key_values=cache).logits
            full_bytes = cache.bytes_read
        assert full_bytes == sum(rows.kv_nbytes() for lay in cache.layers for _, rows in lay.all_shards())
    with ExpertShardedCache(model, sink_tokens=2, recent_tokens=2, read_top_k=1) as cache:
        with torch.no_grad():
            model(ids[:, :39], past_key_values=cache)
            cache.reset_bytes_read()
            restricted = model(ids[:, 39:], past_key_values=cache).logits
        assert 0 < cache.bytes_read < full_bytes
        assert all(layer.query_experts is None for layer in cache.layers)
    assert not torch.allclose(full, restricted)


def test_devices_place_expert_shards():
    """Expert e's shards go to devices[e % len(devices)] (meta stands in for a second device: no data there)."""
    model = model_of("mixtral", "pikv_sharded")
    with ExpertShardedCache(model, devices=["cpu", "meta"], sink_tokens=1, recent_tokens=1) as cache:
        with torch.no_grad():
            model(token_ids()[:, :PREFILL], past_key_values=cache)
        for layer in cache.layers:
            assert layer.local.keys.device.type == "cpu"
            for expert, rows in layer.all_shards():
                if expert != LOCAL:
                    assert rows.keys.device.type == ("cpu" if expert % 2 == 0 else "meta")
                    assert rows.values.device == rows.keys.device
        assert {e % 2 for e, _ in cache.layers[0].all_shards() if e != LOCAL} == {0, 1}


def test_bad_input_raises_clear_errors():
    model = model_of("mixtral", "pikv_sharded")
    with pytest.raises(ValueError, match="Unknown device"):
        parse_devices(["gpu:7"])
    with pytest.raises(ValueError, match="not available"):
        parse_devices(["cuda:5"]) if not torch.cuda.is_available() or torch.cuda.device_count() < 6 else None
    with pytest.raises(ValueError, match="non-empty list"):
        parse_devices("cpu")
    with pytest.raises(ValueError, match="attn_implementation"):
        ExpertShardedCache(model_of("mixtral", "eager"))
    with pytest.raises(ValueError, match="needs an MoE model"):
        ExpertShardedCache(model_of("llama", "pikv_sharded"))
    with pytest.raises(ValueError, match="read_top_k"):
        ExpertShardedCache(model, read_top_k=99)
    with ExpertShardedCache(model) as cache, pytest.raises(ValueError, match="batch size 1"):
        model(token_ids().repeat(2, 1), past_key_values=cache)


def test_hooks_removed_on_close_and_garbage_collection():
    model = model_of("olmoe", "pikv_sharded")
    anatomy = get_anatomy(model)

    def hook_count():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hook_count()
    cache = ExpertShardedCache(model)
    assert hook_count() > before
    cache.close()
    assert hook_count() == before
    cache = ExpertShardedCache(model)
    del cache
    gc.collect()
    assert hook_count() == before
    assert anatomy.num_layers == len(ExpertShardedCache(model).layers)
    gc.collect()
    assert hook_count() == before


def test_restricted_reads_of_a_multi_token_forward():
    """Under read_top_k each query of a multi-token forward reads its own predicted shards: reading all experts'
    shards equals unrestricted attention, one expert per query reads fewer bytes; queries that do not read a shard
    get nothing from it (lse = -inf) and the others get exactly the shard's partial."""
    from pikv_press.attention.sharded import shard_partial

    model = model_of("olmoe", "pikv_sharded")
    ids = token_ids(3, PREFILL + 4)
    logits, read = {}, {}
    for top_k in (None, model.config.num_experts, 1):
        with ExpertShardedCache(model, sink_tokens=1, recent_tokens=2) as cache, torch.no_grad():
            model(ids[:, :PREFILL], past_key_values=cache)
            cache.read_top_k = top_k
            cache.reset_bytes_read()
            logits[top_k] = model(ids[:, PREFILL:], past_key_values=cache).logits
            read[top_k] = cache.bytes_read
            rows = next(rows for e, rows in cache.layers[-1].all_shards() if e != LOCAL)
    torch.testing.assert_close(logits[model.config.num_experts], logits[None], **TOL)
    assert read[1] < read[None] == read[model.config.num_experts]
    assert not torch.allclose(logits[1], logits[None])
    query = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(0))
    q_index = torch.full((3,), 10**6)
    readers = torch.tensor([True, False, True])
    out_all, lse_all = shard_partial(rows, query, 0.25, q_index, 2)
    out, lse = shard_partial(rows, query, 0.25, q_index, 2, readers=readers)
    assert torch.isneginf(lse[:, :, 1]).all() and (out[:, :, 1] == 0).all()
    torch.testing.assert_close(out[:, :, readers], out_all[:, :, readers], **TOL)
    torch.testing.assert_close(lse[:, :, readers], lse_all[:, :, readers], **TOL)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_prefill_in_query_blocks_is_exact(family, monkeypatch):
    """Prefill queries are processed in blocks (bounded logits): blocks smaller than the prompt change nothing."""
    import pikv_press.attention.sharded as sharded_attention

    monkeypatch.setattr(sharded_attention, "QUERY_BLOCK", 5)
    ids = token_ids(4)
    eager, sharded = model_of(family, "eager"), model_of(family, "pikv_sharded")
    reference = run(eager, DynamicCache(config=eager.config), ids)
    with ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as cache:
        out = run(sharded, cache, ids)
    torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("press_kind", ["none", "moe_aware", "kvpress_own"])
def test_kvpress_pipeline_with_the_sharded_cache(press_kind):
    """kvpress's pipeline (prefill inside the press, answers trimmed off between questions through ``layer.keys``)
    gives the answers of eager attention over a DynamicCache; a plain kvpress press compresses through the keys and
    values attributes."""
    from transformers import pipeline

    from pikv_press.testing import TRAINING_TEXT, build_tokenizer

    tokenizer = build_tokenizer()
    context, questions = " ".join(TRAINING_TEXT[:3]), ["What does the fox do?", "What is a cache?"]
    answers = {}
    for impl in ("eager", "pikv_sharded"):
        model = model_of("qwen2_moe", impl)
        press = {"none": None, "moe_aware": MoEAware(KnormPress(0.5)), "kvpress_own": KnormPress(0.5)}[press_kind]
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
        cache = DynamicCache(config=model.config) if impl == "eager" else ExpertShardedCache(model, recent_tokens=2)
        answers[impl] = pipe(context, questions=questions, press=press, cache=cache, max_new_tokens=4)["answers"]
        if impl != "eager":
            assert all(layer.get_seq_length() == cache.layers[0].get_seq_length() for layer in cache.layers)
            cache.close()
    assert answers["pikv_sharded"] == answers["eager"]


def test_crop_drops_what_came_after():
    model = model_of("mixtral", "pikv_sharded")
    ids = token_ids(5)
    with ExpertShardedCache(model, sink_tokens=1, recent_tokens=1) as cache, torch.no_grad():
        with MoEAware(KnormPress(0.5))(model):
            model(ids[:, :PREFILL], past_key_values=cache)
        before = [layer.read() for layer in cache.layers]
        kept = cache.get_seq_length()
        model(ids[:, PREFILL:], past_key_values=cache)
        assert cache.get_seq_length() == kept + DECODE
        cache.crop(kept)
        for layer, (keys, values) in zip(cache.layers, before, strict=True):
            assert layer.get_seq_length() == kept
            assert torch.equal(layer.read()[0], keys) and torch.equal(layer.read()[1], values)
        with pytest.raises(ValueError, match="keeps rows it holds"):
            cache.layers[0].values = torch.zeros(1, 2, 3, 16)


def test_devices_from_an_accelerate_device_map(monkeypatch):
    model = model_of("mixtral", "pikv_sharded")
    with pytest.raises(ValueError, match="device_map"):
        ExpertShardedCache(model, devices="device_map")
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": "cpu", "model.layers.0": "meta",
                                                 "model.layers.1": "cpu", "lm_head": "disk"}, raising=False)
    with ExpertShardedCache(model, devices="device_map") as cache:
        assert cache.expert_devices == [torch.device("cpu"), torch.device("meta")]
        assert cache.layers[0].expert_device(3) == torch.device("meta")


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v2"])
def test_pikv_sharded_over_a_dynamic_cache_is_plain_attention(family):
    """With another cache the attention function is plain exact attention over the keys it gets (one shard)."""
    ids = token_ids(6)
    eager, sharded = model_of(family, "eager"), model_of(family, "pikv_sharded")
    reference = run(eager, DynamicCache(config=eager.config), ids)
    out = run(sharded, DynamicCache(config=sharded.config), ids)
    torch.testing.assert_close(out, reference, **TOL)


def test_another_attention_reading_the_cache_is_refused():
    """A cache whose updates no pikv_sharded attention reads (the model was switched to SDPA) raises in that forward
    instead of silently attending over the new tokens only."""
    model = build_model("olmoe", attn_implementation="pikv_sharded")
    with ExpertShardedCache(model) as cache:
        model.set_attn_implementation("sdpa")
        with pytest.raises(ValueError, match="never read by the sharded attention"), torch.no_grad():
            model(token_ids()[:, :PREFILL], past_key_values=cache)


def test_a_prefill_clears_head_wise_masks_left_by_an_earlier_forward():
    """Masks an earlier forward left on the attention modules (AdaKV or a KVzip-style press on SDPA, then the same
    model switched to pikv_sharded) belong to another context: a prefill into an empty sharded cache clears them, as
    kvpress's attention patch does, instead of removing their rows from the new context."""
    model = model_of("qwen2_moe", "pikv_sharded")
    anatomy = get_anatomy(model)
    module = anatomy.attention(anatomy.compressible_layers[0])
    module.masked_key_indices = (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                 torch.arange(3))
    try:
        with ExpertShardedCache(model, sink_tokens=2, recent_tokens=3) as cache, torch.no_grad():
            model(token_ids()[:, :PREFILL], past_key_values=cache)
            assert all(torch.equal(layer.head_counts(), torch.full_like(layer.head_counts(), PREFILL))
                       for layer in cache.layers)
        assert module.masked_key_indices is None
    finally:
        module.masked_key_indices = None
