"""RouterTap: actual routing equals the model's own router outputs; predicted routing; bounded memory; hooks."""

from __future__ import annotations

import pytest
import torch

from pikv_press import RouterTap, get_anatomy
from pikv_press.testing import VOCAB
from tests.conftest import get_model

# Families whose models return per-layer router outputs with output_router_logits=True, and what those are.
ROUTER_OUTPUTS = {
    "qwen3_moe": "probs", "qwen2_moe": "probs", "mixtral": "probs", "olmoe": "probs",
    "gpt_oss": "logits", "phimoe": "logits",  # granitemoe returns router_logits=None in transformers 5.2
}


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _pre_hook_counts(anatomy) -> list[int]:
    counts = []
    for idx in range(anatomy.num_layers):
        block = anatomy.moe_block(idx)
        counts.append(len(anatomy.attention(idx)._forward_pre_hooks))
        counts.append(0 if block is None else len(block._forward_pre_hooks))
    return counts


def test_tap_shapes_and_hooks_removed(family, model):
    anatomy = get_anatomy(model)
    before = _pre_hook_counts(anatomy)
    with RouterTap(model) as tap, torch.no_grad():
        model(_ids(16))
    for idx in anatomy.moe_layers:
        actual = tap.actual(idx)
        assert actual.probs.shape == (16, anatomy.num_experts)
        assert actual.topk_ids.shape == actual.topk_weights.shape == (16, anatomy.top_k)
        assert int(actual.topk_ids.max()) < anatomy.num_experts
        assert tap.predicted(idx).topk_ids.shape == (16, anatomy.top_k)
        assert tap.expert_load(idx).sum().item() == pytest.approx(1.0)
    assert _pre_hook_counts(anatomy) == before


@pytest.mark.parametrize("family", sorted(ROUTER_OUTPUTS))
def test_tap_matches_output_router_logits(family):
    model = get_model(family)
    with RouterTap(model) as tap, torch.no_grad():
        out = model(_ids(20), output_router_logits=True)
    anatomy = get_anatomy(model)
    assert len(out.router_logits) == len(anatomy.moe_layers)
    for idx, reference in zip(anatomy.moe_layers, out.router_logits, strict=True):
        reference = reference.float()
        if ROUTER_OUTPUTS[family] == "logits":
            reference = torch.softmax(reference, dim=-1)
        torch.testing.assert_close(tap.actual(idx).probs, reference.view(-1, anatomy.num_experts))


def test_tap_records_prefill_and_decoding(family, model):
    ids = _ids(12)
    with RouterTap(model) as tap, torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    n_new = generated.shape[1] - ids.shape[1]
    # the prompt once, then one token per decoding step (the last generated token is never fed back)
    assert tap.actual(get_anatomy(model).moe_layers[0]).num_tokens == 12 + n_new - 1


def test_tap_memory_is_bounded():
    model = get_model("qwen3_moe")
    layer = get_anatomy(model).moe_layers[0]
    with torch.no_grad():
        with RouterTap(model) as full:
            model(_ids(30))
            model(_ids(7, seed=1))
        with RouterTap(model, max_tokens=10) as bounded:
            model(_ids(30))
            model(_ids(7, seed=1))
    assert bounded.actual(layer).num_tokens == 10
    torch.testing.assert_close(bounded.actual(layer).topk_ids, full.actual(layer).topk_ids[-10:])
    torch.testing.assert_close(bounded.actual(layer).probs, full.actual(layer).probs[-10:])


def test_tap_without_probs_or_prediction():
    model = get_model("mixtral")
    with RouterTap(model, predict=False, keep_probs=False) as tap, torch.no_grad():
        model(_ids(8))
    assert tap.actual(0).probs is None
    with pytest.raises(ValueError, match="predict=False"):
        tap.predicted(0)


def test_predicted_routing_is_the_router_on_the_attention_input(family, model):
    """Predicted routing is the layer's router applied to the attention input, actual routing the router on the MoE
    block input; the tap's agreement and recall are exactly those of the two routings computed here."""
    anatomy = get_anatomy(model)
    attention_inputs, block_inputs = {}, {}

    def keep_input(module, args, kwargs):
        attention_inputs[module.layer_idx] = kwargs["hidden_states"].detach().clone()

    handles = [anatomy.attention(i).register_forward_pre_hook(keep_input, with_kwargs=True) for i in anatomy.moe_layers]
    handles += [anatomy.moe_block(i).register_forward_pre_hook(
        lambda module, args, i=i: block_inputs.__setitem__(i, args[0].detach().clone())) for i in anatomy.moe_layers]
    try:
        with RouterTap(model) as tap, torch.no_grad():
            model(_ids(64))
    finally:
        for handle in handles:
            handle.remove()
    hits = total = 0
    recalls = []
    for idx in anatomy.moe_layers:
        predicted = anatomy.route(idx, attention_inputs[idx])
        actual = anatomy.route(idx, block_inputs[idx])
        assert torch.equal(tap.predicted(idx).topk_ids, predicted.topk_ids)
        assert torch.equal(tap.actual(idx).topk_ids, actual.topk_ids)
        hits += int((predicted.top1 == actual.top1).sum())
        total += actual.top1.numel()
        recalls.append((actual.topk_ids[:, :, None] == predicted.topk_ids[:, None, :]).any(-1).float().mean(-1))
    assert tap.top1_agreement() == hits / total
    assert tap.topk_recall() == pytest.approx(float(torch.cat(recalls).mean()), abs=1e-7)
    assert 0 < hits < total  # random routers: attention changes some routings, not all


def test_tap_rejects_dense_models_and_bad_arguments():
    with pytest.raises(ValueError, match="dense"):
        RouterTap(get_model("llama"))
    with pytest.raises(ValueError, match="max_tokens"):
        RouterTap(get_model("mixtral"), max_tokens=0)
    tap = RouterTap(get_model("mixtral"))
    with pytest.raises(ValueError, match="Nothing recorded"):
        tap.actual(0)
    with pytest.raises(ValueError, match="not an MoE layer"):
        RouterTap(get_model("qwen3_moe")).actual(0)


def test_tap_hooks_removed_when_forward_raises():
    model = get_model("olmoe")
    anatomy = get_anatomy(model)
    before = _pre_hook_counts(anatomy)

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_hook(explode)  # fails after every tap hook has run
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with RouterTap(model) as tap:
                model(_ids(4))
    finally:
        handle.remove()
    assert tap.actual(anatomy.moe_layers[0]).num_tokens == 4
    assert _pre_hook_counts(anatomy) == before
