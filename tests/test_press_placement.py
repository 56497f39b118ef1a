"""pikv-press's presses on models in half precision and on models placed by an accelerate ``device_map``.

The machine that runs the suite has one device (the CPU), so the placed model puts one decoder layer on ``"disk"``:
accelerate then keeps that layer's weights on the meta device and wraps its forward in an offloading hook, the same
machinery that moves inputs between GPUs under ``device_map="auto"``. The presses must compress exactly as on the
plain model and leave no hook of their own behind.
"""

from __future__ import annotations

import gc

import pytest
import torch
from kvpress import TOVAPress
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, DynamicCache

from pikv_press.presses import (
    AdaKVExpectedAttentionPress,
    ExpertBalancedPress,
    KVzipSurrogatePress,
    PiKVPress,
    RouterAffinityPress,
    RoutingLayerBudgetPress,
    RoutingNoveltyPress,
)
from pikv_press.surrogate import to_kvzap_model
from pikv_press.testing import MOE_CONFIGS, VOCAB, build_model
from tests.conftest import press_hooks


def _surrogate_press(allocation: str) -> KVzipSurrogatePress:
    """KVzipSurrogatePress with a random linear surrogate of the tiny qwen3_moe's shape."""
    config = MOE_CONFIGS["qwen3_moe"]()
    weights = torch.randn(config.num_hidden_layers, config.hidden_size + 1, config.num_key_value_heads,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return KVzipSurrogatePress(0.5, surrogate=to_kvzap_model(weights), window_size=4, n_sink=2, allocation=allocation)


PRESSES = {
    "expert_balanced": lambda: ExpertBalancedPress(0.5, press=TOVAPress()),
    "router_affinity": lambda: RouterAffinityPress(0.5, press=TOVAPress()),
    "routing_novelty": lambda: RoutingNoveltyPress(0.5, press=TOVAPress()),
    "layer_budget": lambda: RoutingLayerBudgetPress(0.5, press=TOVAPress()),
    "pikv": lambda: PiKVPress(0.5),
    "adakv_expected_attention": lambda: AdaKVExpectedAttentionPress(0.5),
    "kvzip_surrogate": lambda: _surrogate_press("global"),
    "kvzip_surrogate_layer": lambda: _surrogate_press("layer"),
}
UNEVEN = ("layer_budget", "kvzip_surrogate", "kvzip_surrogate_layer")  # budgets differ per layer by design
SEQ = 40


def _ids(device="cpu") -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3)).to(device)


def _compress(model, press, device="cpu") -> DynamicCache:
    """The cache after a prefill of tokens on ``device`` under ``press``; head-wise masks (AdaKVExpectedAttentionPress's
    budgets) kept on ``cache.masks`` and cleared from the model."""
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=_ids(device), past_key_values=cache)
    cache.masks = []
    for layer in model.model.layers:
        cache.masks.append(getattr(layer.self_attn, "masked_key_indices", None))
        layer.self_attn.masked_key_indices = None
    return cache


def _kept(cache: DynamicCache) -> list[int]:
    """Tokens kept per layer, averaged over kv heads (stored minus masked)."""
    kept = []
    for layer, mask in zip(cache.layers, cache.masks, strict=True):
        masked = 0 if mask is None else mask[-1].numel()
        kept.append((layer.keys.shape[1] * layer.keys.shape[2] - masked) / layer.keys.shape[1])
    return kept


@pytest.fixture(scope="module")
def plain_and_placed(tmp_path_factory):
    plain = build_model("qwen3_moe")
    folder = tmp_path_factory.mktemp("qwen3_moe")
    plain.save_pretrained(folder)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placed = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=folder / "offload",
                                                  dtype=torch.float32, attn_implementation="sdpa").eval()
    assert placed.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert hasattr(placed.model.layers[1], "_hf_hook")
    return plain, placed


@pytest.mark.parametrize("name", PRESSES)
def test_placed_model_compresses_exactly_as_the_plain_model(plain_and_placed, name):
    plain, placed = plain_and_placed
    before = press_hooks(placed)
    expected, got = _compress(plain, PRESSES[name]()), _compress(placed, PRESSES[name]())
    for ours, theirs in zip(got.layers, expected.layers, strict=True):
        assert ours.keys.device.type == "cpu"
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=0)
    for ours, theirs in zip(got.masks, expected.masks, strict=True):
        assert (ours is None) == (theirs is None)
        assert ours is None or all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert sum(_kept(got)) == len(got.layers) * compute_n_kept(SEQ, 0.5)
    del expected, got  # a ragged cache keeps its mask fitting on the model while it lives
    gc.collect()
    assert press_hooks(placed) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", PRESSES)
def test_half_precision(name, dtype):
    model = build_model("qwen3_moe").to(dtype)
    cache = _compress(model, PRESSES[name]())
    lengths = _kept(cache)
    assert sum(lengths) == len(lengths) * compute_n_kept(SEQ, 0.5)
    if name not in UNEVEN:  # per-layer budgets differ by design; their sum is the global budget
        assert lengths == [compute_n_kept(SEQ, 0.5)] * len(lengths)
    for layer in cache.layers:
        assert layer.keys.dtype == dtype and layer.values.dtype == dtype
        assert bool(torch.isfinite(layer.keys).all()) and bool(torch.isfinite(layer.values).all())
    del cache
    gc.collect()
    assert not press_hooks(model)


def _kvzip(tokenizer):
    from kvpress import KVzipPress

    from pikv_press import MoEAware

    press = MoEAware(KVzipPress(0.5, layerwise=True))  # layerwise: the same budget in every layer
    press.tokenizer = tokenizer
    return press


def test_kvzip_on_the_placed_model_masks_exactly_as_on_the_plain_model(plain_and_placed, tokenizer):
    """MoE-correct KVzip's reconstruction passes run through accelerate's offloading hooks; its scores (and so its
    masks) are those of the plain model."""
    plain, placed = plain_and_placed
    before = press_hooks(placed)
    expected, got = _compress(plain, _kvzip(tokenizer)), _compress(placed, _kvzip(tokenizer))
    assert press_hooks(placed) == before
    for ours, theirs in zip(got.layers, expected.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)  # the full context: KVzip only masks
    for ours, theirs in zip(got.masks, expected.masks, strict=True):
        assert ours is not None and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    heads = got.layers[0].keys.shape[1]
    assert [m[2].numel() for m in got.masks] == [int(heads * SEQ * 0.5)] * len(got.masks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kvzip_half_precision(dtype, tokenizer):
    model = build_model("qwen3_moe").to(dtype)
    cache = _compress(model, _kvzip(tokenizer))
    heads = cache.layers[0].keys.shape[1]
    assert [m[2].numel() for m in cache.masks] == [int(heads * SEQ * 0.5)] * len(cache.masks)
    assert all(layer.keys.dtype == dtype and layer.keys.shape[2] == SEQ for layer in cache.layers)
    assert not press_hooks(model)
