"""The MoE anatomy registry: layers, dense vs MoE layers, experts, routing, unsupported models."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config

from pikv_press import get_anatomy
from pikv_press.moe import MOE_FAMILIES, RouterScoring, family_for_config
from pikv_press.testing import MOE_CONFIGS, MOE_FAMILY_NAMES
from tests.conftest import get_model

# What each tiny config declares (see pikv_press/testing.py), checked against what the anatomy reads off the model.
EXPECTED = {
    #               moe layers, experts, top-k, shared neurons, scoring
    "qwen3_moe": ((1, 2), 8, 2, 0, RouterScoring.SOFTMAX),
    "qwen2_moe": ((0, 2), 8, 2, 48, RouterScoring.SOFTMAX),
    "mixtral": ((0, 1, 2), 4, 2, 0, RouterScoring.SOFTMAX),
    "olmoe": ((0, 1, 2), 8, 2, 0, RouterScoring.SOFTMAX),
    "gpt_oss": ((0, 1, 2), 4, 2, 0, RouterScoring.SOFTMAX_TOPK),
    "deepseek_v3": ((1, 2), 8, 2, 32, RouterScoring.SIGMOID_GROUPED),
    "deepseek_v2": ((1, 2), 8, 2, 32, RouterScoring.SOFTMAX_GROUPED),
    "glm4_moe": ((1, 2), 8, 2, 32, RouterScoring.SIGMOID_GROUPED),
    "granitemoe": ((0, 1, 2), 4, 2, 0, RouterScoring.SOFTMAX_TOPK),
    "phimoe": ((0, 1, 2), 4, 2, 0, RouterScoring.SPARSEMIXER),
}


def test_registry_covers_the_issue_families():
    assert {spec.name for spec in MOE_FAMILIES} == set(MOE_CONFIGS)


def test_anatomy_fields(family, model):
    anatomy = get_anatomy(model)
    moe_layers, experts, top_k, shared, scoring = EXPECTED[family]
    assert anatomy.family.name == family
    assert anatomy.has_router
    assert anatomy.moe_layers == moe_layers
    assert anatomy.dense_layers == tuple(i for i in range(anatomy.num_layers) if i not in moe_layers)
    assert (anatomy.num_experts, anatomy.top_k, anatomy.shared_expert_size, anatomy.scoring) == (
        experts, top_k, shared, scoring,
    )
    for idx in range(anatomy.num_layers):
        assert anatomy.attention(idx) is model.model.layers[idx].self_attn
        assert (anatomy.router(idx) is None) == (idx not in moe_layers)
    for idx in anatomy.dense_layers:
        with pytest.raises(ValueError, match="dense"):
            anatomy.route(idx, torch.zeros(1, 4, model.config.hidden_size))


def test_sliding_window_layers_are_found():
    assert get_anatomy(get_model("gpt_oss")).sliding_layers == (0,)
    assert get_anatomy(get_model("gpt_oss")).compressible_layers == (1, 2)
    assert get_anatomy(get_model("mixtral")).sliding_layers == ()


def test_dense_model_has_no_router():
    anatomy = get_anatomy(get_model("llama"))
    assert anatomy.family.name == "llama"
    assert not anatomy.has_router
    assert anatomy.moe_layers == ()
    assert anatomy.num_experts == 0 and anatomy.top_k == 0
    assert "no router" in anatomy.describe()


def test_unsupported_model_names_the_supported_families():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError) as err:
        get_anatomy(model)
    message = str(err.value)
    assert "gpt2" in message
    for name in MOE_FAMILY_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="does not support model_type='bert'"):
        get_anatomy(BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                          intermediate_size=32, vocab_size=64)))


def test_family_for_config_rejects_unknown_types():
    with pytest.raises(ValueError, match="Supported MoE families"):
        family_for_config(GPT2Config())


def _block_output_from_routing(family: str, block, routing, x):
    """Recompute an MoE block's output from our routing: must equal the block's own forward."""
    out = block.experts(x, routing.topk_ids, routing.topk_weights.to(x.dtype))
    if family == "qwen2_moe":
        out = out + F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    elif hasattr(block, "shared_experts"):
        out = out + block.shared_experts(x)
    return out


@pytest.mark.parametrize("family", [f for f in MOE_FAMILY_NAMES if f != "granitemoe"])
def test_routing_reproduces_the_moe_block(family):
    """Our top-k ids and weights are exactly what the block dispatches: the block output is rebuilt from them."""
    model = get_model(family)
    anatomy = get_anatomy(model)
    torch.manual_seed(0)
    x = torch.randn(1, 12, model.config.hidden_size)
    for idx in anatomy.moe_layers:
        block = anatomy.moe_block(idx)
        routing = anatomy.route(idx, x)
        assert routing.topk_ids.shape == (12, anatomy.top_k)
        assert routing.probs.shape == (12, anatomy.num_experts)
        with torch.no_grad():
            expected = block(x)
            expected = expected[0] if isinstance(expected, tuple) else expected
            rebuilt = _block_output_from_routing(family, block, routing, x.view(-1, x.shape[-1]))
        torch.testing.assert_close(rebuilt.view_as(expected), expected, rtol=1e-5, atol=1e-6)


def test_granite_routing_matches_its_gating():
    model = get_model("granitemoe")
    anatomy = get_anatomy(model)
    x = torch.randn(10, model.config.hidden_size)
    for idx in anatomy.moe_layers:
        router = anatomy.router(idx)
        _, batch_index, batch_gates, _, logits = router(x)
        routing = anatomy.route(idx, x)
        # every (token, expert, gate) that the gating dispatches is in our routing
        dense = torch.zeros(10, anatomy.num_experts)
        dense.scatter_(1, routing.topk_ids, routing.topk_weights)
        experts = routing.topk_ids.flatten().sort(stable=True).values  # experts in dispatch order
        assert torch.allclose(dense[batch_index, experts], batch_gates)
        torch.testing.assert_close(routing.probs, torch.softmax(logits, -1))


def test_topk_is_sorted_best_first(family, model):
    anatomy = get_anatomy(model)
    routing = anatomy.route(anatomy.moe_layers[0], torch.randn(20, model.config.hidden_size))
    if anatomy.scoring == RouterScoring.SIGMOID_GROUPED:
        selection = routing.probs + anatomy.router(anatomy.moe_layers[0]).e_score_correction_bias
    else:
        selection = routing.probs
    picked = selection.gather(1, routing.topk_ids)
    assert torch.all(picked[:, :-1] >= picked[:, 1:])


def test_transformers_4_layout_is_understood():
    """transformers 4.x Mixtral: MoE block under `block_sparse_moe`, its gate a plain nn.Linear returning logits."""
    import copy

    from torch import nn

    model = copy.deepcopy(get_model("mixtral"))
    reference = get_anatomy(get_model("mixtral"))
    x = torch.randn(6, model.config.hidden_size)
    for layer in model.model.layers:
        block = layer.mlp
        gate = nn.Linear(model.config.hidden_size, block.gate.num_experts, bias=False)
        gate.weight.data.copy_(block.gate.weight.data)
        legacy = nn.Module()
        legacy.gate = gate
        del layer.mlp
        layer.block_sparse_moe = legacy
    anatomy = get_anatomy(model)
    assert anatomy.moe_layers == reference.moe_layers
    for idx in anatomy.moe_layers:
        ours, expected = anatomy.route(idx, x), reference.route(idx, x)
        torch.testing.assert_close(ours.probs, expected.probs)
        torch.testing.assert_close(ours.topk_ids, expected.topk_ids)
        torch.testing.assert_close(ours.topk_weights, expected.topk_weights)
