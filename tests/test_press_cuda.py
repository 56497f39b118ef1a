"""pikv-press's presses on a CUDA device, and on a model split by an accelerate ``device_map`` across the GPU and the
CPU. Skipped without CUDA (the CI machine has none; ``tests/test_press_placement.py`` covers placement there with a
disk-offloaded layer).

On a GPU, ``PIKV_KERNELS=auto`` sends the routing presses' features to the Triton kernel
(``pikv_press/kernels/routing_features_triton.py``), so these tests also run that kernel inside a real prefill. Results
are compared with the same tiny model on the CPU: the kept-token counts must be exact, the kept keys equal the CPU's up
to floating-point noise (the reductions run in another order on the GPU, so bitwise equality is not expected).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from kvpress import KVzipPress, TOVAPress
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, DynamicCache, pipeline

from pikv_press import MoEAware
from pikv_press.presses import (
    AdaKVExpectedAttentionPress,
    ExpertBalancedPress,
    PiKVPress,
    RouterAffinityPress,
    RoutingLayerBudgetPress,
    RoutingNoveltyPress,
)
from pikv_press.testing import VOCAB, build_model, build_tokenizer
from tests.conftest import press_hooks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SEQ = 40
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
         "model.layers.2": 0, "model.norm": 0, "lm_head": 0}


def _kvzip():
    press = MoEAware(KVzipPress(0.5, layerwise=True))
    press.tokenizer = build_tokenizer()
    return press


PRESSES = {
    "expert_balanced": lambda: ExpertBalancedPress(0.5, press=TOVAPress()),
    "router_affinity": lambda: RouterAffinityPress(0.5, press=TOVAPress()),
    "routing_novelty": lambda: RoutingNoveltyPress(0.5, press=TOVAPress()),
    "layer_budget": lambda: RoutingLayerBudgetPress(0.5, press=TOVAPress()),
    "pikv": lambda: PiKVPress(0.5),
    "adakv_expected_attention": lambda: AdaKVExpectedAttentionPress(0.5),
    "kvzip": _kvzip,
}


def _ids(device) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3)).to(device)


def _compress(model, press, device) -> DynamicCache:
    """The cache after a prefill under ``press``, head-wise masks kept on ``cache.masks`` and cleared from the model."""
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=_ids(device), past_key_values=cache)
    cache.masks = []
    for layer in model.model.layers:
        cache.masks.append(getattr(layer.self_attn, "masked_key_indices", None))
        layer.self_attn.masked_key_indices = None
    return cache


def _kept(cache: DynamicCache) -> list[float]:
    kept = []
    for layer, mask in zip(cache.layers, cache.masks, strict=True):
        masked = 0 if mask is None else mask[-1].numel()
        kept.append((layer.keys.shape[1] * layer.keys.shape[2] - masked) / layer.keys.shape[1])
    return kept


def _assert_matches_cpu(got: DynamicCache, expected: DynamicCache, atol: float) -> None:
    """Same kept counts per layer and kept keys and values equal to the CPU run's within ``atol``; the message names
    the first layer that differs and the share of kept rows that agree."""
    assert _kept(got) == _kept(expected)
    for i, (ours, theirs) in enumerate(zip(got.layers, expected.layers, strict=True)):
        assert ours.keys.shape == theirs.keys.shape, f"layer {i}"
        k, v = ours.keys.float().cpu(), ours.values.float().cpu()
        rows = (k - theirs.keys.float()).abs().amax(-1) <= atol
        assert bool(rows.all()), f"layer {i}: {rows.float().mean():.3f} of kept key rows agree with the CPU's"
        torch.testing.assert_close(v, theirs.values.float(), rtol=0, atol=atol, msg=f"layer {i} values")
    for i, (ours, theirs) in enumerate(zip(got.masks, expected.masks, strict=True)):
        assert (ours is None) == (theirs is None), f"layer {i}"
        if ours is not None:
            assert all(torch.equal(a.cpu(), b) for a, b in zip(ours, theirs, strict=True)), f"layer {i} masks"


@pytest.fixture(scope="module")
def cpu_model():
    return build_model("qwen3_moe")


@pytest.fixture(scope="module")
def cuda_model():
    return build_model("qwen3_moe").to("cuda")


@pytest.mark.parametrize("name", PRESSES)
def test_on_cuda_compresses_as_on_the_cpu(cpu_model, cuda_model, name):
    before = press_hooks(cuda_model)
    expected = _compress(cpu_model, PRESSES[name](), "cpu")
    got = _compress(cuda_model, PRESSES[name](), "cuda")
    assert press_hooks(cuda_model) == before
    assert all(layer.keys.device.type == "cuda" for layer in got.layers)
    _assert_matches_cpu(got, expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", PRESSES)
def test_half_precision_on_cuda(name, dtype):
    model = build_model("qwen3_moe").to("cuda", dtype)
    cache = _compress(model, PRESSES[name](), "cuda")
    if name == "kvzip":  # masks only
        heads = cache.layers[0].keys.shape[1]
        assert [m[-1].numel() for m in cache.masks] == [int(heads * SEQ * 0.5)] * len(cache.masks)
    else:
        lengths = _kept(cache)
        assert sum(lengths) == len(lengths) * compute_n_kept(SEQ, 0.5)
    for layer in cache.layers:
        assert layer.keys.dtype == dtype and layer.keys.device.type == "cuda"
        assert bool(torch.isfinite(layer.keys).all()) and bool(torch.isfinite(layer.values).all())
    assert not press_hooks(model)


@pytest.fixture(scope="module")
def split_model():
    """Layers 0 and 2 on the GPU, layer 1 computed on the CPU (accelerate's hooks move the hidden states between
    them; ``main_device="cpu"`` makes the CPU an execution device rather than offload storage)."""
    model = dispatch_model(build_model("qwen3_moe"), device_map=SPLIT, main_device="cpu",
                           skip_keys="past_key_values")
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    return model


@pytest.fixture(scope="module")
def offloaded_model(tmp_path_factory, cpu_model):
    """``from_pretrained`` with layer 1 mapped to ``"cpu"`` beside the GPU: accelerate keeps that layer's weights in
    CPU memory (meta on the module) and runs it on the GPU, so every layer's cache is on the GPU."""
    folder = tmp_path_factory.mktemp("qwen3_moe_offloaded")
    cpu_model.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=SPLIT, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("name", PRESSES)
def test_split_model_keeps_each_layer_cache_on_its_device(cpu_model, split_model, name):
    before = press_hooks(split_model)
    expected = _compress(cpu_model, PRESSES[name](), "cpu")
    got = _compress(split_model, PRESSES[name](), "cuda")
    assert press_hooks(split_model) == before
    assert [layer.keys.device.type for layer in got.layers] == ["cuda", "cpu", "cuda"]
    for layer, mask in zip(got.layers, got.masks, strict=True):
        assert mask is None or all(t.device == layer.keys.device for t in mask)
    _assert_matches_cpu(got, expected, atol=1e-4)


@pytest.mark.parametrize("name", PRESSES)
def test_cpu_offloaded_layer_compresses_as_on_the_cpu(cpu_model, offloaded_model, name):
    before = press_hooks(offloaded_model)
    expected = _compress(cpu_model, PRESSES[name](), "cpu")
    got = _compress(offloaded_model, PRESSES[name](), "cuda")
    assert press_hooks(offloaded_model) == before
    assert all(layer.keys.device.type == "cuda" for layer in got.layers)
    _assert_matches_cpu(got, expected, atol=1e-4)


def test_pipeline_answers_on_cuda_as_on_the_cpu(cpu_model, cuda_model):
    """Greedy answers through kvpress's pipeline under PiKVPress: the GPU's equal the CPU's."""
    tokenizer = build_tokenizer()
    context = " ".join(f"word{i % 37} value{i % 11}" for i in range(120))
    answers = []
    for model in (cpu_model, cuda_model):
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
        answers.append(pipe(context, question="What is the value of word5?", max_new_tokens=8,
                            press=PiKVPress(0.5))["answer"])
        assert not press_hooks(model)
    assert answers[0] == answers[1] and answers[0]
