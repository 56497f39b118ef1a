"""Non-uniform budgets stored ragged in the ExpertShardedCache: expert-wise (ExpertBalancedPress) and layer-wise
(PyramidKV) budgets, bytes freed counted from storage. Head-wise (AdaKV) budgets: tests/test_sharded_cache.py."""

from __future__ import annotations

import pytest
import torch
from kvpress import KnormPress, PyramidKVPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

import pikv_press.attention.sharded  # noqa: F401  (registers pikv_sharded)
from pikv_press.cache import cache_lengths, cache_nbytes
from pikv_press.cache.sharded import LOCAL, ExpertShardedCache
from pikv_press.compat import MoEAware, routing_source_layer
from pikv_press.moe import RoutingRecorder, get_anatomy
from pikv_press.presses import ExpertBalancedPress
from pikv_press.testing import build_model

PREFILL = 24
RATIO = 0.5


@pytest.fixture(scope="module")
def models():
    return {impl: build_model("qwen2_moe", attn_implementation=impl) for impl in ("eager", "pikv_sharded")}


def ids_of(seed=0, length=PREFILL + 4):
    return torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_expert_balanced_budgets_are_the_expert_shards(models):
    """With no sink or recent tokens, expert e's shard holds exactly the press's budget of expert e in every kv head
    of every compressed layer (ragged across experts), and >= 95% of the nominal evicted bytes are freed."""
    model = models["pikv_sharded"]
    ids = ids_of()[:, :PREFILL]
    anatomy = get_anatomy(model)
    with RoutingRecorder(model) as recorder:
        model(ids)
        routing = {idx: recorder.routing(idx).topk_ids for idx in anatomy.moe_layers}
    press = ExpertBalancedPress(RATIO, press=KnormPress(), power=0.5, min_tokens_per_expert=1)
    with ExpertShardedCache(model, sink_tokens=0, recent_tokens=0) as full, \
            ExpertShardedCache(model, sink_tokens=0, recent_tokens=0) as cache:
        model(ids, past_key_values=full)
        with press(model):
            model(ids, past_key_values=cache)
        n_kept = compute_n_kept(PREFILL, RATIO)
        for idx in anatomy.compressible_layers:
            budgets = press.budgets(routing[routing_source_layer(anatomy, idx)], n_kept)
            layer = cache.layers[idx]
            shards = dict(layer.all_shards())
            assert LOCAL not in shards or shards[LOCAL].n == 0
            for head in range(layer.kv_heads):
                held = torch.zeros_like(budgets)
                for expert, rows in shards.items():
                    if expert != LOCAL:
                        held[expert] = int((rows.heads == head).sum())
                assert torch.equal(held, budgets), (idx, head)
            assert len(set(budgets[budgets > 0].tolist())) > 1  # budgets differ across experts: ragged shards
        freed = (cache_nbytes(full) - cache_nbytes(cache)) / (RATIO * cache_nbytes(full))
        assert freed >= 0.95, freed


@torch.no_grad()
def test_layer_wise_budgets_pyramidkv_exact(models):
    """PyramidKV's layer-wise budgets: every layer holds its own length, and decoding equals eager attention over a
    DynamicCache compressed by the same press."""
    ids = ids_of(1)
    outs = {}
    for impl, model in models.items():
        cache = DynamicCache(config=model.config) if impl == "eager" else ExpertShardedCache(model, sink_tokens=1,
                                                                                            recent_tokens=2)
        with MoEAware(PyramidKVPress(RATIO, window_size=4))(model):
            model(ids[:, :PREFILL], past_key_values=cache)
        lengths = cache_lengths(cache)
        outs[impl] = torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits
                                for i in range(PREFILL, ids.shape[1])], dim=1)
        assert len(set(lengths)) > 1, lengths
        outs[impl + "_lengths"] = lengths
        if impl != "eager":
            cache.close()
    assert outs["eager_lengths"] == outs["pikv_sharded_lengths"]
    torch.testing.assert_close(outs["pikv_sharded"], outs["eager"], atol=1e-5, rtol=1e-5)
