"""evaluation.streaming_ruler on a tiny model: a budget above the context scores as the full cache, a smaller one
keeps the budget in every layer; the summary pairs each policy with the full cache."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation import streaming_ruler
from pikv_press.testing import build_tokenizer
from tests.conftest import get_model


@pytest.mark.parametrize("policy", ["streaming_llm", "h2o", "kvpress_knorm", "quest"])
def test_score_sample_under_a_budget(policy):
    model, tokenizer = get_model("qwen3_moe"), build_tokenizer()
    context = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(3))
    question = torch.randint(3, 300, (6,), generator=torch.Generator().manual_seed(4))
    gold = [tokenizer.decode([57, 58], skip_special_tokens=True).strip() or "ab"]
    full = streaming_ruler.score_sample(model, tokenizer, context, question, gold, "all", 8, "full", 64, 16)
    assert full["kept_tokens"] == [48]
    same = streaming_ruler.score_sample(model, tokenizer, context, question, gold, "all", 8, policy, 64, 16)
    assert same["nll"] == pytest.approx(full["nll"], rel=1e-5) and same["tf_exact"] == full["tf_exact"]
    bounded = streaming_ruler.score_sample(model, tokenizer, context, question, gold, "all", 8, policy, 16, 8)
    assert bounded["kept_tokens"] == ([48] if policy == "quest" else [16])  # Quest keeps every page
    if policy != "quest":
        assert bounded["peak_kv_bytes"] < full["peak_kv_bytes"]


def test_summary_and_report_pair_each_policy_with_the_full_cache(tmp_path, capsys):
    rows = []
    for task in ("niah_single_1", "niah_single_2"):
        for index in range(4):
            for policy, exact in (("full", True), ("h2o", index < 2), ("streaming_llm", False)):
                rows.append({"task": task, "index": index, "policy": policy,
                             "budget": None if policy == "full" else 256, "chunk": 64, "length": 1024,
                             "context_tokens": 760, "tf_exact": exact, "nll": 0.5, "peak_kv_bytes": 2**20,
                             "model": "tiny"})
    points = {p["policy"]: p for p in streaming_ruler.summary(rows)}
    assert points["full"]["accuracy"] == 1.0 and points["h2o"]["accuracy"] == 0.5
    assert points["h2o"]["diff"][0] == pytest.approx(-0.5) and points["streaming_llm"]["diff"][0] == -1.0
    path = tmp_path / "embedded__ruler1024.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    text = streaming_ruler.report(path)
    assert "| full cache | - | 8 | 100.0% [100.0, 100.0] |  |" in text
    assert "| H2OPolicy | 256 | 8 | 50.0% " in text and "-50.0 [" in text
