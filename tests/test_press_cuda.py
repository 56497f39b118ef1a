"""pikv-press's presses on a CUDA device, and on a model split by an accelerate ``device_map`` across the GPU and the
CPU. Skipped without CUDA (the CI machine has none; ``tests/test_press_placement.py`` covers placement there with a
disk-offloaded layer).

Results are compared with the same tiny model on the CPU: the kept-token counts must be exact, the kept keys equal the
CPU's up to floating-point noise (the reductions run in another order on the GPU, so bitwise equality is not
expected).
"""

from __future__ import annotations

import gc

import pytest
import torch
from accelerate import dispatch_model
from kvpress import KVzipPress
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, DynamicCache, pipeline

from pikv_press import MoEAware
from pikv_press.presses import PiKVPress
from pikv_press.testing import build_model, build_tokenizer
from tests.conftest import press_hooks
from tests.test_press_placement import PRESSES as PLACEMENT_PRESSES
from tests.test_press_placement import SEQ, _compress, _kept

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
         "model.layers.2": 0, "model.norm": 0, "lm_head": 0}


def _kvzip():
    press = MoEAware(KVzipPress(0.5, layerwise=True))
    press.tokenizer = build_tokenizer()
    return press


PRESSES = {**PLACEMENT_PRESSES, "kvzip": _kvzip}


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
    del cache  # a ragged cache keeps its mask fitting on the model while it lives
    gc.collect()
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


# placement: (model fixture, device of each layer's cache, whether each layer's masks are checked to be there too)
PLACEMENTS = {
    "cuda": ("cuda_model", ["cuda"] * 3, False),
    "split": ("split_model", ["cuda", "cpu", "cuda"], True),  # each layer's cache and masks on its own device
    "cpu_offloaded": ("offloaded_model", ["cuda"] * 3, False),  # the offloaded layer runs on the GPU
}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", PRESSES)
def test_compresses_as_on_the_cpu(request, cpu_model, name, placement):
    fixture, devices, check_masks = PLACEMENTS[placement]
    model = request.getfixturevalue(fixture)
    before = press_hooks(model)
    expected = _compress(cpu_model, PRESSES[name](), "cpu")
    got = _compress(model, PRESSES[name](), "cuda")
    assert [layer.keys.device.type for layer in got.layers] == devices
    if check_masks:
        for layer, mask in zip(got.layers, got.masks, strict=True):
            assert mask is None or all(t.device == layer.keys.device for t in mask)
    _assert_matches_cpu(got, expected, atol=1e-4)
    del expected, got  # a ragged cache keeps its mask fitting on the model while it lives
    gc.collect()
    assert press_hooks(model) == before


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
