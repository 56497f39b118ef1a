"""evaluation.kv_compression on a tiny model: one line per (sample, setting), resumable, bytes from storage, report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import DynamicCache, pipeline

from evaluation import kv_compression
from pikv_press.answer import greedy_answer
from pikv_press.cache import make_cache
from pikv_press.prefill import PrefillRecorder
from pikv_press.testing import build_tokenizer
from tests.conftest import get_model

SETTINGS = ["dynamic", "packed-int4", "packed-int4+knorm@0.5", "lowrank-k50"]


def _frame() -> pd.DataFrame:
    context = "The quick brown fox jumps over the lazy dog. The special magic number is 7481. " * 4
    rows = [{"task": task, "index": i, "context": context, "question": "What is the special magic number?",
             "answer_prefix": "The special magic number is", "answer": ["7481"], "max_new_tokens": 8}
            for task in ("niah_single_1", "niah_single_2") for i in range(2)]
    return pd.DataFrame(rows)


def test_run_is_resumable_and_reports(tmp_path):
    model, tokenizer = get_model("qwen3_moe"), build_tokenizer()
    out = tmp_path / "tiny.jsonl"
    added = kv_compression.run(_frame(), SETTINGS, out, "tiny", model, tokenizer, decode_tokens=2)
    assert added == 4 * len(SETTINGS)
    assert kv_compression.run(_frame(), SETTINGS, out, "tiny", model, tokenizer, decode_tokens=2) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_setting = {r["setting"]: r for r in records if r["index"] == 0 and r["task"] == "niah_single_1"}
    full, int4, evicted = by_setting["dynamic"], by_setting["packed-int4"], by_setting["packed-int4+knorm@0.5"]
    layers = model.config.num_hidden_layers
    tokens = full["context_tokens"]
    assert full["nbytes"] == layers * tokens * 2 * 2 * 16 * 4  # fp32 keys + values, 2 KV heads of 16
    assert full["nbytes_bf16"] * 2 == full["nbytes"]
    assert evicted["tokens_kept"] == tokens // 2 and evicted["nbytes"] < int4["nbytes"] < full["nbytes"]
    table, verdicts = kv_compression.report(out, "tiny")
    assert list(table["setting"]) == SETTINGS and list(table["n"]) == [4] * len(SETTINGS)
    assert table.set_index("setting").loc["dynamic", "x fewer than bf16 full"] == pytest.approx(1.0)
    assert any(v.startswith("packed-int4:") for v in verdicts)
    assert "| setting |" in kv_compression.markdown(table, verdicts, "cmd")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="Unknown cache 'packed-int3'"):
        kv_compression.parse_setting("packed-int3")
    with pytest.raises(ValueError, match="tova@0.5"):
        kv_compression.parse_setting("packed-int4+pikv")


def test_generate_scores_the_greedy_answer_by_string_match(tmp_path):
    model, tokenizer = get_model("qwen3_moe"), build_tokenizer()
    out = tmp_path / "tiny.jsonl"
    frame = _frame()
    kv_compression.run(frame, ["dynamic", "packed-int4"], out, "tiny", model, tokenizer, decode_tokens=1,
                       generate=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and all("generated_answer" in r for r in records)
    # the recorded answer is the greedy answer from the same compressed cache, scored by RULER's string match
    row = frame.iloc[0]
    inputs = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer).preprocess(
        row.context, [row.question], row.answer_prefix, 10**9)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        model.model(input_ids=inputs["context_ids"], past_key_values=DynamicCache())
    cache = recorder.snapshot.replay(None, cache_factory=lambda: make_cache("packed-int4", model.config))
    expected = greedy_answer(model, tokenizer, cache, inputs["questions_ids"][0], inputs["context_ids"].shape[1], 8)
    first = next(r for r in records if r["setting"] == "packed-int4" and r["task"] == row.task and r["index"] == 0)
    assert first["generated_answer"] == expected
    assert first["generated_score"] == (100.0 if "7481" in expected else 0.0)
    table, _ = kv_compression.report(out, "tiny")
    assert "generated" in table and "generated vs full [paired]" in table
