"""evaluation.streaming on a tiny model: the perplexity it reports is the plain model's over the same tokens when
nothing is evicted, every policy runs, and the report prints the table and writes the plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache

from evaluation import streaming
from tests.conftest import get_model


def test_full_cache_streaming_perplexity_is_the_models_perplexity():
    model = get_model("qwen3_moe")
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=DynamicCache()).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    full = streaming.streaming_run(model, ids, "full", None, 16, with_logits=True)
    assert full["predicted"] == 63
    assert full["ppl_by_segment"] == {"0-63": pytest.approx(full["ppl"], rel=1e-6)}
    assert math.isclose(full["ppl"], math.exp(float(nll) / 63), rel_tol=1e-5)
    # a budget above the context evicts nothing: the same perplexity, bit for bit as the full run
    for policy in ("h2o", "kvpress_knorm", "quest"):
        same = streaming.streaming_run(model, ids, policy, 64, 16, with_logits=True)
        assert same["nll"] == pytest.approx(full["nll"], rel=1e-6)


@pytest.mark.parametrize("policy", [p for p in streaming.POLICIES if p != "full"])
def test_every_policy_runs_under_a_budget(policy):
    model = get_model("qwen3_moe")
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    figures = streaming.streaming_run(model, ids, policy, 16, 8, with_logits=True)
    assert figures["predicted"] == 63 and math.isfinite(figures["ppl"])
    full = streaming.streaming_run(model, ids, "full", None, 8, with_logits=False)
    if policy == "quest":
        assert figures["peak_kv_bytes"] == full["peak_kv_bytes"]  # Quest keeps every page
    else:
        assert figures["peak_kv_bytes"] < full["peak_kv_bytes"]


def test_report_prints_table_and_writes_plot(tmp_path, capsys):
    records = [
        {"study": "ppl", "model": "m", "policy": "full", "budget": None, "chunk": 128, "tokens": 8192, "ppl": 10.0,
         "peak_kv_bytes": 2**20 * 180, "peak_kv_bytes_at": {"2048": 2**20 * 45}, "label": "tiny"},
        {"study": "ppl", "model": "m", "policy": "h2o", "budget": 1024, "chunk": 128, "tokens": 8192, "ppl": 10.3,
         "peak_kv_bytes": 2**20 * 23, "peak_kv_bytes_at": {"2048": 2**20 * 23}, "label": "tiny",
         "ppl_by_segment": {"0-2048": 9.0, "2048-8191": 11.0}},
        {"study": "memory", "model": "m", "policy": "streaming_llm", "budget": 1024, "chunk": 128, "tokens": 16384,
         "peak_kv_bytes": 2**20 * 23, "peak_rss_increase_bytes": 2**20 * 40, "label": "tiny"},
        {"study": "memory", "model": "m", "policy": "kvpress_prefill", "budget": 1024, "chunk": None,
         "tokens": 16384, "peak_kv_bytes": 2**20 * 30, "peak_rss_increase_bytes": 2**20 * 900, "label": "tiny"},
        {"study": "ppl", "model": "m", "policy": "streaming_llm", "budget": 1024, "chunk": 128, "tokens": 32768,
         "ppl": 12.0, "peak_kv_bytes": 2**20 * 23, "label": "tiny",
         "ppl_by_segment": {"0-2048": 11.0, "2048-32767": 13.0}},
    ]
    (tmp_path / "streaming.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    plot = tmp_path / "streaming.png"
    assert streaming.main(["--report", "--out", str(tmp_path), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "python -m evaluation.streaming" in text
    assert "| H2OPolicy | 10.300 (+3.0%), 23.0 MiB |" in text
    # contexts 2048, 8192, 16384, 32768: the full cache's from its checkpoints, the others from their runs
    assert "| bounded prefill, budget 1024 | - | - | 23.0 | 23.0 |" in text
    assert "| kvpress path (one-pass prefill, KnormPress to 1024) | - | - | 30.0 | - |" in text
    assert "| full cache (chunked prefill) | 45.0 | 180.0 | - | - |" in text
    assert "| bounded prefill, budget 1024 (StreamingLLMPolicy) | 40.0 |" in text
    assert "| kvpress path (one-pass prefill, KnormPress to 1024) | 900.0 |" in text
    assert "| H2OPolicy | 1024 | 9.000 | 11.000 |" in text
    assert "| StreamingLLMPolicy | 1024 | 11.000 | 13.000 |" in text  # the 32k stream, by stretch
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit):
        streaming.main(["--policies", "nope", "--out", str(tmp_path)])


def test_kvpress_path_holds_the_whole_context_in_one_layer_then_compresses():
    """kvpress's path compresses each layer to the budget right after its attention: at the peak the last layer holds
    the whole context and the others the budget; the bounded prefill's peak is budget + one chunk in one layer."""
    from pikv_press.cache import cache_nbytes, make_cache

    model = get_model("qwen3_moe")
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(2))
    kv = streaming.kvpress_prefill(model, ids, 16)
    assert kv["final_tokens_per_layer"] == [16]
    per_token_layer = kv["final_kv_bytes"] // (16 * layers)
    assert kv["peak_kv_bytes"] == per_token_layer * ((layers - 1) * 16 + 64)
    plain = make_cache("dynamic")
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=plain, use_cache=True)
    assert cache_nbytes(plain) == per_token_layer * 64 * layers
    for run in ({"policy": "kvpress_prefill", "budget": 16, "chunk": None},
                {"policy": "streaming_llm", "budget": 16, "chunk": 8}):
        figures = streaming.memory_run(model, ids, run)
        assert figures["peak_rss_increase_bytes"] >= 0 and figures["peak_rss_bytes"] > 0
        bounded_peak = per_token_layer * ((layers - 1) * 16 + 16 + 8)
        assert figures["peak_kv_bytes"] == (kv["peak_kv_bytes"] if run["chunk"] is None else bounded_peak)


def test_memory_runs_are_planned_per_length_and_path():
    args = streaming.argparse.Namespace(tokens=0, budgets=[1024], policies=[], chunk=128, memory_lengths=[2048, 4096],
                                        memory_paths=["bounded", "kvpress_prefill"], memory_policy="streaming_llm",
                                        memory_budget=1024)
    runs = streaming.planned_runs(args)
    assert [(r["policy"], r["tokens"], r["chunk"]) for r in runs] == [
        ("streaming_llm", 2048, 128), ("kvpress_prefill", 2048, None),
        ("streaming_llm", 4096, 128), ("kvpress_prefill", 4096, None)]


@pytest.mark.slow
def test_embedded_model_bounded_prefill_and_policies():
    """On the embedded MoE: a budget above the context changes nothing (bit for bit against the same chunks without
    a policy), every layer holds the budget after a bounded prefill, and the expert-aware policy runs on its
    routing."""
    from evaluation.models import EMBEDDED, load_model
    from pikv_press.cache import cache_lengths
    from pikv_press.scheduling import ExpertAwarePolicy, H2OPolicy, chunked_prefill

    model, tokenizer, _ = load_model(EMBEDDED)
    ids = streaming.essay_tokens(tokenizer, 384)
    plain = chunked_prefill(model, ids, None, 128, logits=True)
    same = chunked_prefill(model, ids, 512, 128, H2OPolicy(), logits=True)
    assert torch.equal(plain.last_logits, same.last_logits)
    bounded = chunked_prefill(model, ids, 128, 64, ExpertAwarePolicy(), logits=True)
    assert cache_lengths(bounded.cache) == [128] * model.config.num_hidden_layers
    assert bounded.peak_kv_bytes < plain.peak_kv_bytes / 2
