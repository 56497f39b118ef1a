"""KVzipSurrogatePress and its fit (pikv_press/surrogate.py): the regression recovers an exact linear map, the press
keeps exactly the tokens the surrogate ranks best (plus sinks and window), replays like the plain path, frees bytes,
and refuses what it cannot do."""
from __future__ import annotations

import gc

import pytest
import torch
from kvpress.presses.kvzap_press import KVzapModel
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

from pikv_press import KVzipSurrogatePress, get_anatomy
from pikv_press.prefill import PrefillRecorder
from pikv_press.surrogate import SurrogateStats, check_fits, collect, solve, to_kvzap_model
from pikv_press.testing import VOCAB
from tests.conftest import get_model, press_hooks

FAMILY = "qwen3_moe"  # QK norms: a family where a Llama-shaped scorer would read the wrong queries


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _random_surrogate(model, seed: int = 0) -> KVzapModel:
    anatomy = get_anatomy(model)
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(anatomy.num_layers, model.config.hidden_size + 1, model.config.num_key_value_heads,
                          generator=g, dtype=torch.float64)
    return to_kvzap_model(weights)


def _kept(full: torch.Tensor, kept: torch.Tensor) -> set[int]:
    """Positions of the rows of ``kept`` in ``full`` (kvpress gathers them in score order, not position order)."""
    positions = [int((full == row).all(-1).nonzero()[0]) for row in kept]
    assert len(set(positions)) == len(positions)
    return set(positions)


def _attention_inputs(model, ids) -> dict[int, torch.Tensor]:
    """Each layer's attention input of a prefill of ``ids`` (what a press's hooks receive)."""
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    return {i: layer.kwargs["hidden_states"] for i, layer in recorder.snapshot.layers.items()}


def test_solve_recovers_an_exact_linear_map_and_mse_matches_the_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 200, 6, generator=g, dtype=torch.float64)
    w = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    xb = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    y = xb @ w
    stats = SurrogateStats(xb.transpose(1, 2) @ xb, xb.transpose(1, 2) @ y, (y ** 2).sum(1), 200)
    assert torch.allclose(solve(stats, 0.0), w, atol=1e-9)
    other = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(stats.mse(other), ((xb @ other - y) ** 2).mean(1), atol=1e-9)
    half = SurrogateStats(stats.xtx / 2, stats.xty / 2, stats.yty / 2, 100)
    assert torch.allclose((half + half).xtx, stats.xtx)
    with pytest.raises(ValueError, match="ridge"):
        solve(stats, -1.0)


def test_to_kvzap_model_computes_the_fitted_map():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    model = to_kvzap_model(w, fit_ridge=0.1)
    x = torch.randn(4, 3, 4, generator=g)  # (tokens, modules, d), kvpress's KVzapModel.forward layout
    expected = torch.stack([x[:, i].double() @ w[i, :-1] + w[i, -1] for i in range(3)], dim=1)
    assert torch.allclose(model(x).double(), expected, atol=1e-5)
    assert model.config.fit_ridge == 0.1


def test_collect_targets_are_the_log_kvzip_scores_of_the_prefilled_context(tokenizer):
    """collect's statistics are those of [hidden, 1] -> log KVzip score: with an exact fit on one context (ridge 0,
    more rows than features would be needed; here checked through the bias row), the mean target per layer and
    head equals the mean log score that MoE-correct KVzip computes."""
    model = get_model(FAMILY)
    ids = _ids(40)
    stats, rows = collect(model, tokenizer, ids, skip_first=4, keep_rows=8, generator=torch.Generator().manual_seed(0))
    assert stats.count == 36
    anatomy = get_anatomy(model)
    hidden = _attention_inputs(model, ids)
    # the bias column of X^T X counts the rows; X^T y's bias row sums the targets; X^T X's feature block is h^T h
    assert torch.all(stats.xtx[:, -1, -1] == 36)
    for layer in range(anatomy.num_layers):
        h = hidden[layer][0, 4:].double()
        assert torch.allclose(stats.xtx[layer, :-1, :-1], h.T @ h, rtol=1e-9, atol=1e-9)
    assert rows["hidden"].shape == (anatomy.num_layers, 8, model.config.hidden_size)
    assert rows["target"].shape == (anatomy.num_layers, 8, model.config.num_key_value_heads)
    assert torch.all(rows["target"] <= 0)  # logs of attention probabilities
    # a surrogate fitted on this one context predicts it better than the mean does (a real signal, not noise)
    weights = solve(stats, 1e-3)
    constant = torch.zeros_like(weights)
    constant[:, -1] = stats.xty[:, -1] / stats.count
    assert stats.mse(weights).mean() < stats.mse(constant).mean()
    with pytest.raises(ValueError, match=r"\(1, seq\)"):
        collect(model, tokenizer, torch.cat([ids, ids]))
    assert not press_hooks(model)


def test_press_keeps_the_best_predicted_tokens_plus_sinks_and_window():
    model = get_model(FAMILY)
    ids = _ids(64)
    surrogate = _random_surrogate(model)
    hidden = _attention_inputs(model, ids)
    plain = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=plain)
    press = KVzipSurrogatePress(0.5, surrogate=surrogate, window_size=8, n_sink=2, allocation="head")
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    assert not press_hooks(model)
    n_kept = compute_n_kept(64, 0.5)
    for layer in range(get_anatomy(model).num_layers):
        assert cache.layers[layer].keys.shape[2] == n_kept  # physically smaller: the bytes are freed
        predicted = (surrogate.layers[layer](hidden[layer].float()).transpose(1, 2))[0]  # (kv_heads, seq)
        for head in range(predicted.shape[0]):
            free = predicted[head, 2:-8]
            chosen = set((free.topk(n_kept - 10).indices + 2).tolist()) | {0, 1} | set(range(56, 64))
            assert _kept(plain.layers[layer].keys[0, head], cache.layers[layer].keys[0, head]) == chosen


def test_protected_tokens_win_deterministically_when_the_budget_is_small():
    """With a budget smaller than sinks + window, the sinks and then the latest window tokens are kept."""
    model = get_model(FAMILY)
    ids = _ids(32)
    plain = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=plain)
    press = KVzipSurrogatePress(0.75, surrogate=_random_surrogate(model, seed=3), window_size=16, n_sink=2,
                                allocation="head")
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    keep = {0, 1, *range(26, 32)}  # 8 = compute_n_kept(32, 0.75): both sinks, the 6 latest tokens
    assert compute_n_kept(32, 0.75) == 8
    for a, b in zip(plain.layers, cache.layers, strict=True):
        for head in range(a.keys.shape[1]):
            assert _kept(a.keys[0, head], b.keys[0, head]) == keep


def _masks(model):
    return [tuple(t.clone() for t in layer.self_attn.masked_key_indices)
            if layer.self_attn.masked_key_indices is not None else None for layer in model.model.layers]


def _clear_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


@pytest.mark.parametrize("allocation", ["head", "layer", "global"])
def test_replay_equals_the_plain_path(allocation):
    model = get_model(FAMILY)
    ids = _ids(48, seed=2)
    surrogate = _random_surrogate(model, seed=1)
    plain = DynamicCache()
    try:
        with torch.no_grad(), KVzipSurrogatePress(0.6, surrogate=surrogate, allocation=allocation)(model):
            model.model(input_ids=ids, past_key_values=plain)
        plain_masks = _masks(model)
        _clear_masks(model)
        with torch.no_grad(), PrefillRecorder(model) as recorder:
            model.model(input_ids=ids, past_key_values=DynamicCache())
        replayed = recorder.snapshot.replay(KVzipSurrogatePress(0.6, surrogate=surrogate, allocation=allocation))
        replayed_masks = _masks(model)
    finally:
        _clear_masks(model)
    for a, b in zip(plain.layers, replayed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (plain_masks[0] is None) == (allocation != "global")
    for a, b in zip(plain_masks, replayed_masks, strict=True):
        assert (a is None and b is None) or all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_global_allocation_evicts_the_lowest_predicted_entries_of_all_layers_and_heads():
    """allocation="global" (KVzip's compress_post allocation): the tokens each (layer, head) still attends to are
    exactly those above the lowest ``ratio`` of every layer's and head's predicted scores, sinks and window included;
    heads and layers keep different shares; each layer holds only as many rows as its widest head keeps, the other
    heads' surplus rows (behind their own) masked; nothing else stays on the model once the cache is gone."""
    model = get_model(FAMILY)
    seq = 64
    ids = _ids(seq, seed=5)
    surrogate = _random_surrogate(model, seed=6)
    table = _reference_table(model, surrogate, ids, n_sink=2, window=8)
    heads = table.shape[1]
    n_pruned = int(table.numel() * 0.5)
    threshold = table.reshape(-1).sort().values[n_pruned - 1]
    with torch.no_grad():
        full = DynamicCache()
        model.model(input_ids=ids, past_key_values=full)
        cache = DynamicCache()
        try:
            with KVzipSurrogatePress(0.5, surrogate=surrogate, window_size=8, n_sink=2)(model):
                model.model(input_ids=ids, past_key_values=cache)
            masks = _masks(model)
        finally:
            _clear_masks(model)
    attended, shares = 0, set()
    for layer, (kept_layer, mask) in enumerate(zip(cache.layers, masks, strict=True)):
        expected = table[layer] > threshold  # (heads, seq)
        width = kept_layer.keys.shape[2]
        assert width == int(expected.sum(-1).max())  # cut to the widest head
        masked = torch.zeros(heads, width, dtype=torch.bool)
        if mask is not None:
            assert torch.all(mask[0] == 0)
            masked[mask[1], mask[2]] = True
        for head in range(heads):
            n = int(expected[head].sum())
            assert not masked[head, :n].any() and masked[head, n:].all()  # its own rows first, the surplus masked
            tokens = _kept(full.layers[layer].keys[0, head], kept_layer.keys[0, head, :n])
            assert tokens == set(expected[head].nonzero().flatten().tolist())
            assert {0, 1} | set(range(seq - 8, seq)) <= tokens
            attended += n
            shares.add(n)
    assert attended == table.numel() - n_pruned and len(shares) > 1
    assert {hook.__name__ for hook in press_hooks(model)} <= {"fit_mask_to_layer"}
    del cache
    gc.collect()
    assert not press_hooks(model)


def _reference_table(model, surrogate, ids, n_sink: int, window: int) -> torch.Tensor:
    """``(layers, kv_heads, seq)``: the surrogate's scores of every layer, sinks and window above all of them."""
    hidden = _attention_inputs(model, ids)
    table = []
    for layer in range(get_anatomy(model).num_layers):
        scores = surrogate.layers[layer](hidden[layer].float()).transpose(1, 2)[0]
        top = scores.amax(-1, keepdim=True) + 1
        scores[:, :n_sink] = top + 1000
        scores[:, scores.shape[1] - window:] = top + 500
        table.append(scores)
    return torch.stack(table)


@pytest.mark.parametrize("family", [FAMILY, "deepseek_v3", "glm4_moe"])
def test_layer_allocation_frees_the_rows_the_global_ranking_takes_from_each_layer(family):
    """allocation="layer": each layer gives up, from every kv head, its share of the lowest entries of the global
    ranking (largest remainder), the layers end up with different lengths, the total is exact, every head keeps its
    best-predicted tokens as rows of the full cache (in the cache's own layout: MLA and partial RoPE too), and the
    ragged cache decodes."""
    model = get_model(family)
    seq, ratio = 64, 0.55
    ids = _ids(seq, seed=9)
    surrogate = _random_surrogate(model, seed=10)
    table = _reference_table(model, surrogate, ids, n_sink=2, window=8)
    n_layers, heads, _ = table.shape
    total = int(n_layers * seq * ratio)
    threshold = table.reshape(-1).sort().values[total * heads - 1]
    share = (table <= threshold).sum(dim=(1, 2)).double() / heads
    expected = share.floor().long()
    for i in sorted(range(n_layers), key=lambda i: (-float(share[i] - expected[i]), i))[: total - int(expected.sum())]:
        expected[i] += 1
    with torch.no_grad():
        full = DynamicCache()
        model.model(input_ids=ids, past_key_values=full)
        cache = DynamicCache()
        with KVzipSurrogatePress(ratio, surrogate=surrogate, window_size=8, n_sink=2, allocation="layer")(model):
            model.model(input_ids=ids, past_key_values=cache)
        assert _masks(model) == [None] * n_layers
        assert {hook.__name__ for hook in press_hooks(model)} == {"fit_mask_to_layer"}  # while the ragged cache lives
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        assert lengths == [seq - int(k) for k in expected] and len(set(lengths)) > 1
        assert sum(seq - n for n in lengths) == total
        for layer, (kept, every) in enumerate(zip(cache.layers, full.layers, strict=True)):
            for head in range(heads):
                best = set(table[layer, head].topk(lengths[layer]).indices.tolist())
                assert _kept(every.keys[0, head], kept.keys[0, head]) == best
                # values carry no position (a repeated token repeats them): each kept row is its key's token's value
                order = [int((every.keys[0, head] == row).all(-1).nonzero()[0]) for row in kept.keys[0, head]]
                assert torch.equal(kept.values[0, head], every.values[0, head, order])
        step = model(input_ids=_ids(1, seed=11), past_key_values=cache).logits
    assert torch.isfinite(step).all()
    assert [layer.keys.shape[2] for layer in cache.layers] == [n + 1 for n in lengths]
    del cache
    gc.collect()
    assert not press_hooks(model)


def test_layer_allocation_runs_with_any_attention_and_the_memory_is_freed():
    """Unlike "global", "layer" evicts rows: eager attention works, and the cache's bytes shrink by the ratio."""
    from pikv_press.cache.stats import cache_nbytes

    model = get_model(FAMILY, "eager")
    seq = 80
    surrogate = _random_surrogate(model, seed=12)
    full, cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model.model(input_ids=_ids(seq), past_key_values=full)
        with KVzipSurrogatePress(0.75, surrogate=surrogate, allocation="layer", window_size=4)(model):
            model.model(input_ids=_ids(seq), past_key_values=cache)
    n_layers = len(cache.layers)
    kept = n_layers * seq - int(n_layers * seq * 0.75)
    assert cache_nbytes(cache) * n_layers * seq == cache_nbytes(full) * kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_score_in_float32(dtype):
    model = get_model(FAMILY)
    press = KVzipSurrogatePress(0.5, surrogate=_random_surrogate(model))
    press.post_init_from_model(model)
    hidden = torch.randn(1, 20, model.config.hidden_size)
    reference = press.predicted_log_scores(0, hidden)
    low = press.predicted_log_scores(0, hidden.to(dtype))
    assert low.dtype == torch.float32
    assert torch.allclose(low, reference, atol=0.1 * reference.abs().max().item())


def test_a_saved_surrogate_loads_from_its_folder(tmp_path):
    model = get_model(FAMILY)
    surrogate = _random_surrogate(model, seed=4).double()  # the press scores with float32 copies, never moving it
    surrogate.save_pretrained(tmp_path)
    ids = _ids(40)
    caches = []
    for source in (surrogate, tmp_path, str(tmp_path)):
        cache = DynamicCache()
        with torch.no_grad(), KVzipSurrogatePress(0.5, surrogate=source, allocation="head")(model):
            model.model(input_ids=ids, past_key_values=cache)
        caches.append(cache)
    assert all(p.dtype == torch.float64 for p in surrogate.parameters())
    for other in caches[1:]:
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(caches[0].layers, other.layers, strict=True))
    with pytest.raises(ValueError, match="config.json"), torch.no_grad(), \
            KVzipSurrogatePress(0.5, surrogate=tmp_path / "missing")(model):
        pass


def test_bad_arguments_and_models_get_clear_errors():
    model = get_model(FAMILY)
    with pytest.raises(ValueError, match="compression_ratio"):
        KVzipSurrogatePress(1.0)
    press = KVzipSurrogatePress(0.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        press.compression_ratio = -0.5
    with pytest.raises(ValueError, match="window_size"):
        KVzipSurrogatePress(0.5, window_size=-1)
    with pytest.raises(ValueError, match="n_sink"):
        KVzipSurrogatePress(0.5, n_sink=1.5)
    with pytest.raises(ValueError, match="allocation"):
        KVzipSurrogatePress(0.5, allocation="layers")
    with pytest.raises(ValueError, match="sdpa"), torch.no_grad(), \
            KVzipSurrogatePress(0.5, surrogate=_random_surrogate(model))(get_model(FAMILY, "eager")):
        pass
    with pytest.raises(ValueError, match="KVzapModel"):
        KVzipSurrogatePress(0.5, surrogate=torch.nn.Linear(2, 2))
    # no surrogate shipped for a tiny test model: the error says how to fit one, and no hook stays behind
    with pytest.raises(ValueError, match="fit_kvzip_surrogate"), torch.no_grad(), KVzipSurrogatePress(0.5)(model):
        model.model(input_ids=_ids(16), past_key_values=DynamicCache())
    assert not press_hooks(model)
    wrong = to_kvzap_model(torch.zeros(1, model.config.hidden_size + 1, model.config.num_key_value_heads))
    with pytest.raises(ValueError, match="not fitted for this model"):
        check_fits(wrong, model)
    with pytest.raises(ValueError, match="not fitted for this model"), torch.no_grad(), \
            KVzipSurrogatePress(0.5, surrogate=wrong)(model):
        model.model(input_ids=_ids(16), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), \
            KVzipSurrogatePress(0.5, surrogate=_random_surrogate(model))(model):
        model.model(input_ids=torch.cat([_ids(16), _ids(16)]), past_key_values=DynamicCache())
    with pytest.raises(RuntimeError, match="boom"), KVzipSurrogatePress(0.5, surrogate=_random_surrogate(model))(model):
        raise RuntimeError("boom")
    assert not press_hooks(model)


def test_adakv_budgets_over_the_surrogate_mask_no_protected_token():
    """AdaKV's head-wise budgets over the predicted log scores (the registry's ``adakv_kvzip_surrogate``): the masked
    entries are AdaKV's share of the layer, and never a sink or a window token."""
    from kvpress import AdaKVPress

    from pikv_press import MoEAware

    model = get_model(FAMILY)
    press = MoEAware(AdaKVPress(KVzipSurrogatePress(surrogate=_random_surrogate(model), window_size=8, n_sink=2)))
    press.compression_ratio = 0.5
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=_ids(64), past_key_values=DynamicCache())
        heads = model.config.num_key_value_heads
        for layer in model.model.layers:
            _, _, positions = layer.self_attn.masked_key_indices
            assert len(positions) == int(64 * heads * 0.5)
            assert not ({0, 1} | set(range(56, 64))) & set(positions.tolist())
    finally:
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
    assert not press_hooks(model)


def test_the_surrogate_shipped_for_the_embedded_model_has_its_shape():
    """The committed surrogate (evaluation.fit_kvzip_surrogate) is found from the embedded model's folder name and
    has one linear module per layer of SmolLM2-135M's shape (576 hidden, 3 kv heads, 30 layers)."""
    from types import SimpleNamespace

    from pikv_press.presses.kvzip_surrogate import shipped_surrogate

    fake = SimpleNamespace(config=SimpleNamespace(name_or_path="/somewhere/models/smollm2-moe-ed1da41ac4"))
    folder = shipped_surrogate(fake)
    assert folder is not None and folder.name == "smollm2-moe-ed1da41ac4"
    surrogate = KVzapModel.from_pretrained(str(folder))
    assert (surrogate.config.n_modules, surrogate.config.input_dim, surrogate.config.output_dim) == (30, 576, 3)
    assert surrogate.config.hidden_dim is None and surrogate.config.fit_corpus == "lee_background"
    assert all(torch.isfinite(p).all() for p in surrogate.parameters())
    assert shipped_surrogate(SimpleNamespace(config=SimpleNamespace(name_or_path="org/other-model"))) is None


def test_global_allocation_on_a_dense_model_live_and_replayed():
    """On a dense model (kvpress's own hooks) the global allocation cuts and masks the same entries live and in
    replay, and the entries still attended to are exactly ``1 - ratio`` of all."""
    model = get_model("llama")
    ids = _ids(40, seed=7)
    surrogate = _random_surrogate(model, seed=8)
    masks, caches = [], [DynamicCache()]
    try:
        with torch.no_grad(), KVzipSurrogatePress(0.5, surrogate=surrogate, window_size=4, n_sink=2)(model):
            model.model(input_ids=ids, past_key_values=caches[0])
        masks.append(_masks(model))
        _clear_masks(model)
        with torch.no_grad(), PrefillRecorder(model) as recorder:
            model.model(input_ids=ids, past_key_values=DynamicCache())
        caches.append(recorder.snapshot.replay(KVzipSurrogatePress(0.5, surrogate=surrogate, window_size=4,
                                                                   n_sink=2)))
        masks.append(_masks(model))
    finally:
        _clear_masks(model)
    heads = model.config.num_key_value_heads
    attended = sum(layer.keys.shape[2] * heads - (0 if m is None else len(m[2]))
                   for layer, m in zip(caches[0].layers, masks[0], strict=True))
    assert attended == len(masks[0]) * heads * 40 - int(len(masks[0]) * heads * 40 * 0.5)
    assert any(layer.keys.shape[2] < 40 for layer in caches[0].layers)  # rows freed
    for a, b in zip(*masks, strict=True):
        assert (a is None and b is None) or all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(*(c.layers for c in caches), strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    del caches
    gc.collect()
    assert not press_hooks(model)


def test_global_allocation_refuses_to_run_nested_where_it_could_not_finish():
    """Inside ComposedPress nothing would call finish_prefill: a clear error instead of a press that does nothing."""
    from kvpress import ComposedPress

    from pikv_press import MoEAware

    model = get_model(FAMILY)
    press = MoEAware(ComposedPress([KVzipSurrogatePress(0.5, surrogate=_random_surrogate(model))]))
    with pytest.raises(ValueError, match="outermost press"), torch.no_grad(), press(model):
        model.model(input_ids=_ids(32), past_key_values=DynamicCache())
    assert not press_hooks(model)
    _clear_masks(model)


def test_fit_script_packs_whole_articles_and_measures_agreement(tokenizer):
    from evaluation.fit_kvzip_surrogate import agreement, pack_contexts

    articles = [f"article {i} " + "word " * (5 + i % 7) for i in range(40)]
    contexts = pack_contexts(articles, tokenizer, length=60, count=3)
    assert len(contexts) == 3
    for context in contexts:
        parts = context.split("\n\n")
        assert all(part in articles for part in parts)  # whole articles, none cut
        assert len(tokenizer.encode(context, add_special_tokens=False)) <= 60 + len(parts)
    assert pack_contexts(articles, tokenizer, length=60, count=3) == contexts  # seeded
    with pytest.raises(ValueError, match="fewer"):
        pack_contexts(articles, tokenizer, length=60, count=1000)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 5, generator=g)
    weights = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    target = (hidden.double() @ weights[:, :-1] + weights[:, -1:]).float()
    rows = [{"hidden": hidden, "target": target}]
    assert agreement(weights, rows, 0.25) == 1.0  # the exact map ranks like the targets
    assert agreement(-weights, rows, 0.25) == 0.0  # the reversed ranking shares nothing


def test_the_fit_writes_where_the_press_looks():
    """fit_kvzip_surrogate's output folder is the one shipped_surrogate finds from the loaded model's name_or_path
    (the embedded model is loaded from ``<cache>/models/<artifact>``)."""
    from types import SimpleNamespace

    from evaluation.embedded_model.build import default_model_dir
    from evaluation.fit_kvzip_surrogate import surrogate_folder
    from evaluation.models import embedded_artifact
    from pikv_press.presses.kvzip_surrogate import shipped_surrogate

    loaded = SimpleNamespace(config=SimpleNamespace(name_or_path=str(default_model_dir(embedded_artifact("embedded")))))
    assert surrogate_folder("embedded") == shipped_surrogate(loaded)
    assert surrogate_folder("org/some-moe").name == "some-moe"


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_pipeline_answers_equal_replayed_answers(allocation):
    """Through kvpress's pipeline (prefill under the press, then greedy decoding from the cache it left: ragged for
    "layer", cut and masked for "global") the answer is the one decoded from the replayed cache."""
    from transformers import pipeline

    from pikv_press.testing import build_tokenizer

    model = get_model(FAMILY)
    surrogate = _random_surrogate(model, seed=13)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=build_tokenizer())
    context, question = "The special magic number is 7481. " * 6, "What is the special magic number?"
    inputs = pipe.preprocess(context, [question], "", 10**6)
    try:
        with torch.no_grad(), PrefillRecorder(model) as recorder:
            model.model(input_ids=inputs["context_ids"], past_key_values=DynamicCache())
        press = KVzipSurrogatePress(0.6, surrogate=surrogate, window_size=8, allocation=allocation)
        expected = pipe(context, question=question, press=press, max_new_tokens=6)["answer"]
        _clear_masks(model)
        with torch.no_grad():
            cache = recorder.snapshot.replay(press)
            answer = pipe.generate_answer(inputs["questions_ids"][0], cache, inputs["context_ids"].shape[1], 6)
    finally:
        _clear_masks(model)
    assert answer == expected
    assert expected != pipe(context, question=question, max_new_tokens=6)["answer"]  # the press changed the answer


@pytest.mark.parametrize("family", [FAMILY, "glm4_moe"])
def test_global_allocation_frees_the_rows_in_an_expert_sharded_cache_and_decodes_as_the_masks(family):
    """allocation="global" on an ExpertShardedCache (attention "pikv_sharded"): every evicted entry is removed (each
    head keeps its own count, the one a DynamicCache attends to after its cut and masks; the total is exact; the
    evicted share of the bytes is freed), and decoding gives SDPA's logits over the cut and masked dense cache."""
    import pikv_press.attention.sharded  # noqa: F401  (registers pikv_sharded)
    from pikv_press.cache import cache_nbytes
    from pikv_press.cache.sharded import ExpertShardedCache

    seq, ratio = 40, 0.6
    ids = _ids(seq + 4, seed=14)
    sdpa, sharded = get_model(family, "sdpa"), get_model(family, "pikv_sharded")
    surrogate = _random_surrogate(sdpa, seed=15)
    press = KVzipSurrogatePress(ratio, surrogate=surrogate, window_size=4, n_sink=2)
    try:
        with torch.no_grad():
            dense = DynamicCache()
            with press(sdpa):
                sdpa.model(input_ids=ids[:, :seq], past_key_values=dense)
            masks = _masks(sdpa)
            widths = [layer.keys.shape[2] for layer in dense.layers]
            # positions passed as kvpress's pipeline does: a cut cache's length is not the context's
            reference = torch.cat([sdpa(ids[:, i:i + 1], past_key_values=dense, position_ids=torch.tensor([[i]])).logits
                                   for i in range(seq, ids.shape[1])], dim=1)
    finally:
        _clear_masks(sdpa)
    heads = sdpa.config.num_key_value_heads
    with ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as full, \
            ExpertShardedCache(sharded, sink_tokens=2, recent_tokens=3) as cache, torch.no_grad():
        sharded.model(input_ids=ids[:, :seq], past_key_values=full)
        with press(sharded):
            sharded.model(input_ids=ids[:, :seq], past_key_values=cache)
        assert all(getattr(layer.self_attn, "masked_key_indices", None) is None for layer in sharded.model.layers)
        counts = torch.stack([layer.head_counts() for layer in cache.layers])
        expected = torch.stack([width - (0 if mask is None else torch.bincount(mask[1], minlength=heads))
                                for width, mask in zip(widths, masks, strict=True)])
        assert min(widths) < seq
        assert torch.equal(counts, expected) and len(set(counts.reshape(-1).tolist())) > 1
        assert int(counts.sum()) == counts.numel() * seq - int(counts.numel() * seq * ratio)
        freed = 1 - cache_nbytes(cache) / cache_nbytes(full)
        out = torch.cat([sharded(ids[:, i:i + 1], past_key_values=cache, position_ids=torch.tensor([[i]])).logits
                         for i in range(seq, ids.shape[1])], dim=1)
    assert abs(freed - int(counts.numel() * seq * ratio) / (counts.numel() * seq)) < 1e-9
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    # pikv_sharded attention over another cache would not read the masks: a clear error, no hooks left behind
    with pytest.raises(ValueError, match="use an ExpertShardedCache"), torch.no_grad(), press(sharded):
        sharded.model(input_ids=ids[:, :seq], past_key_values=DynamicCache())
    assert not press_hooks(sharded)
