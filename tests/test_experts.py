"""Dense-masked experts (pikv_press.moe.experts) against transformers' eager experts loop, on every tiny family."""

from __future__ import annotations

import pytest
import torch

from pikv_press.moe.experts import DENSE_MASKED, use_dense_masked_experts
from pikv_press.testing import MOE_CONFIGS, build_model

UNSUPPORTED = {"gpt_oss": "biased or transposed", "granitemoe": "no experts module"}


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_dense_masked_experts_match_eager(family):
    model = build_model(family)
    ids = torch.randint(100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        eager = model(ids).logits
    if family in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[family]):
            use_dense_masked_experts(model)
        assert model.config._experts_implementation == "eager"  # left as it was
        return
    assert use_dense_masked_experts(model) == "eager"
    assert model.config._experts_implementation == DENSE_MASKED
    with torch.no_grad():
        masked = model(ids).logits
        torch.testing.assert_close(masked, eager, rtol=1e-4, atol=1e-5)
        assert not torch.equal(masked, eager)  # another order of additions: the switch took effect
        model.config._experts_implementation = "eager"
        torch.testing.assert_close(model(ids).logits, eager, rtol=0, atol=0)


def test_dense_masked_experts_reject_dense_models():
    with pytest.raises(ValueError, match="no experts module"):
        use_dense_masked_experts(build_model("llama"))


def test_experts_speed_times_prefill_and_decode():
    from evaluation.experts_speed import time_implementation

    model = build_model("qwen3_moe")
    ids = torch.randint(100, (1, 12), generator=torch.Generator().manual_seed(1))
    prefill, decode, logits = time_implementation(model, ids, decode_tokens=3)
    assert prefill > 0 and decode > 0
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits[0, -1])
