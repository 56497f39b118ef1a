"""Exact head-wise masking (:mod:`pikv_press.attention.headwise`): what AdaKVExpectedAttentionPress's head-wise
budgets use in a DynamicCache instead of kvpress's fake-key search."""

from __future__ import annotations

import pytest
import torch
from kvpress import AdaKVPress, ExpectedAttentionPress
from transformers import DynamicCache, pipeline
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pikv_press import AdaKVExpectedAttentionPress, MoEAware
from pikv_press.attention.headwise import EXACT_MASK_TAG, headwise_mask
from pikv_press.testing import VOCAB, build_model, build_tokenizer


def _reference(query, key, value, blocked, causal_offset):
    """Attention computed head by head over the keys each head keeps (no masking trick)."""
    heads, groups = query.shape[1], query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    for h in range(heads):
        kv = h // groups
        for t in range(query.shape[2]):
            visible = [j for j in range(key.shape[2]) if j <= causal_offset + t and not blocked[kv, j]]
            scores = query[0, h, t] @ key[0, kv, visible].T / query.shape[-1] ** 0.5
            out[0, h, t] = torch.softmax(scores, -1) @ value[0, kv, visible]
    return out


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_mask_removes_exactly_the_masked_head_token_pairs(mask_kind):
    g = torch.Generator().manual_seed(0)
    q_len = 1 if mask_kind == "none" else 3
    query, key, value = (torch.randn(1, h, n, 8, generator=g) for h, n in ((4, q_len), (2, 10), (2, 10)))
    blocked = torch.zeros(2, 10, dtype=torch.bool)
    blocked[0, [1, 4, 5]] = True
    blocked[1, [0, 9 - q_len]] = True
    heads, seqs = blocked.nonzero(as_tuple=True)
    indices = (torch.zeros_like(heads), heads, seqs)
    offset = 10 - q_len
    causal = torch.ones(q_len, 10, dtype=torch.bool).tril(offset)[None, None]
    attention_mask = {"bool": causal, "additive": torch.zeros(causal.shape).masked_fill(~causal, float("-inf")),
                      "none": None}[mask_kind]
    mask = headwise_mask(query, key, indices, attention_mask)
    assert mask.shape == (1, 4, q_len, 10)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=8 ** -0.5)
    torch.testing.assert_close(out.transpose(1, 2), _reference(query, key, value, blocked, offset))


def test_pikv_answers_where_kvpress_fake_key_search_fails():
    """On a tiny random MoE the queries of a multi-token question point everywhere: kvpress's fake-key search for
    AdaKV raises; AdaKVExpectedAttentionPress masks exactly and answers, and its answer is the one that decoding over
    the masked cache one token at a time gives."""
    model, tokenizer = build_model("glm4_moe"), build_tokenizer()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context = " ".join(f"word{i % 37} value{i % 11}" for i in range(120))
    question = "What is the value of word5 and of word7 and of word9?"
    with pytest.raises(ValueError, match="fake keys"):
        pipe(context, question=question, max_new_tokens=4,
             press=MoEAware(AdaKVPress(ExpectedAttentionPress(0.5, epsilon=1e-2))))
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    cache = DynamicCache()
    answer = pipe(context, question=question, max_new_tokens=4, press=AdaKVExpectedAttentionPress(0.5),
                  cache=cache)["answer"]
    assert isinstance(answer, str) and answer
    assert all(getattr(layer.self_attn, EXACT_MASK_TAG, False) for layer in model.model.layers)
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def test_masked_dense_decoding_equals_per_token_decoding_with_the_same_masks():
    """A multi-token step under the exact mask gives the logits of feeding the same tokens one by one."""
    model = build_model("qwen3_moe")
    ids = torch.randint(5, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    logits = []
    for step in ("multi", "single"):
        cache = DynamicCache()
        with torch.no_grad():
            with AdaKVExpectedAttentionPress(0.5)(model):
                model.model(input_ids=ids[:, :40], past_key_values=cache)
            assert all(layer.self_attn.masked_key_indices is not None for layer in model.model.layers)
            if step == "multi":
                logits.append(model(ids[:, 40:], past_key_values=cache).logits)
            else:
                logits.append(torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits
                                         for i in range(40, 48)], dim=1))
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_exact_mask_gives_kvpress_fake_key_logits_where_the_search_succeeds():
    """One decoding token at a time (kvpress's fake-key search succeeds there on this model): the same logits."""
    ids = torch.randint(5, VOCAB, (1, 44), generator=torch.Generator().manual_seed(2))
    logits = []
    for press in (MoEAware(AdaKVPress(ExpectedAttentionPress(0.5, epsilon=1e-2))), AdaKVExpectedAttentionPress(0.5)):
        model = build_model("qwen3_moe")  # a fresh model: no module marked for exact masking
        cache = DynamicCache()
        with torch.no_grad():
            with press(model):
                model.model(input_ids=ids[:, :40], past_key_values=cache)
            logits.append(torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(40, 44)],
                                    dim=1))
        marked = getattr(model.model.layers[0].self_attn, EXACT_MASK_TAG, False)
        assert marked == isinstance(press, AdaKVExpectedAttentionPress)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
