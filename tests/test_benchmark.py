"""The speed and memory benchmark on a tiny random Qwen3-MoE: row fields, exact KV bytes, decoding, CSV and PNG."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from evaluation.benchmark import COLUMNS, PeakMemory, context_ids, main, measure, random_context_ids
from evaluation.registry import make_press
from tests.conftest import get_model

FIELDS = {
    "context_length", "prefill_s", "first_token_s", "ttft_s", "decode_tokens", "decode_s", "decode_ms_per_token",
    "peak_mem_mib", "peak_total_mib", "mem_method", "kv_cache_bytes", "kv_cache_mib", "kv_tokens_per_layer",
    "kv_tokens_min", "kv_tokens_max", "kv_layer_tokens", "generated_ids",
}


def _expected_kv_bytes(model, lengths: list[int]) -> int:
    """Keys and values of every layer: 2 x kv_heads x tokens x head_dim x element size (batch 1)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return sum(2 * config.num_key_value_heads * n * head_dim * itemsize for n in lengths)


def test_measure_row_has_every_field_and_decodes(tokenizer):
    model = get_model("qwen3_moe")
    ids = random_context_ids(tokenizer, 96)
    row = measure(model, None, ids, decode_tokens=4)
    assert FIELDS <= set(row)
    assert set(COLUMNS) - set(row) == {"model", "device", "dtype", "threads", "press", "compression_ratio",
                                       "context", "cache", "repeat"}  # filled in by run_benchmark
    for key in ("prefill_s", "first_token_s", "ttft_s", "decode_s", "decode_ms_per_token", "peak_total_mib"):
        assert row[key] > 0, key
    assert row["peak_mem_mib"] >= 0
    assert row["ttft_s"] == row["prefill_s"] + row["first_token_s"]
    assert row["decode_tokens"] == 4
    assert len(row["generated_ids"]) == 1 + 4  # the first token from the prefill, then one per decoding step
    assert all(0 <= t < model.config.vocab_size for t in row["generated_ids"])
    n_layers = model.config.num_hidden_layers
    assert row["kv_layer_tokens"] == " ".join(["96"] * n_layers)
    assert row["kv_tokens_per_layer"] == row["kv_tokens_min"] == row["kv_tokens_max"] == 96
    assert row["kv_cache_bytes"] == _expected_kv_bytes(model, [96] * n_layers)


def test_half_press_halves_kv_bytes_exactly(tokenizer):
    model = get_model("qwen3_moe")
    ids = random_context_ids(tokenizer, 128)
    full = measure(model, None, ids, decode_tokens=2)
    n_layers = model.config.num_hidden_layers
    for name in ("knorm", "snapkv", "streaming_llm"):
        row = measure(model, make_press(name, 0.5), ids, decode_tokens=2)
        lengths = [int(x) for x in row["kv_layer_tokens"].split()]
        assert lengths == [64] * n_layers, name
        assert row["kv_cache_bytes"] == _expected_kv_bytes(model, lengths), name
        assert 2 * row["kv_cache_bytes"] == full["kv_cache_bytes"], name
        assert len(row["generated_ids"]) == 3


def test_quantized_cache_request_holds_fewer_bytes(tokenizer):
    """--cache: the same request on transformers' int4 quantized cache, bytes counted from storage."""
    pytest.importorskip("optimum.quanto")
    model = get_model("qwen3_moe")
    ids = random_context_ids(tokenizer, 256)
    full = measure(model, None, ids, decode_tokens=2)
    int4 = measure(model, None, ids, decode_tokens=2, cache="quantized-int4")
    assert int4["kv_layer_tokens"] == full["kv_layer_tokens"]
    assert 4 * int4["kv_cache_bytes"] < full["kv_cache_bytes"]  # float32 -> 4 bits plus scales and zero points


def test_essay_context_has_exactly_the_requested_length(tokenizer):
    for length in (40, 100):
        ids = context_ids(tokenizer, length, "essay")
        assert ids.shape == (1, length)
        assert not set(ids[0].tolist()) & set(tokenizer.all_special_ids)
    ids = context_ids(tokenizer, 50, "random")
    assert ids.shape == (1, 50) and not set(ids[0].tolist()) & set(tokenizer.all_special_ids)


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as memory:
        block = torch.ones(16 * 2**20)  # 64 MiB, written so that the pages are resident
        del block
    assert memory.peak_increase >= 60 * 2**20
    assert memory.peak_total >= memory.baseline + memory.peak_increase - 1


def test_main_writes_csv_png_and_table(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    get_model("qwen3_moe").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "bench"
    assert main(["--model", str(model_dir), "--press_name", "no_press,knorm", "--compression_ratio", "0.5",
                 "--lengths", "64,128", "--decode_tokens", "3", "--threads", "1", "--output_dir", str(out),
                 "--no_progress"]) == 0
    frame = pd.read_csv(out / "benchmark.csv")
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 4
    assert set(zip(frame.press, frame.compression_ratio, frame.context_length, strict=True)) == {
        ("no_press", 0.0, 64), ("no_press", 0.0, 128), ("knorm", 0.5, 64), ("knorm", 0.5, 128)}
    assert (frame.model == "tiny").all() and (frame.device == "cpu").all() and (frame.threads == 1).all()
    assert (frame.context == "essay").all() and (frame.decode_tokens == 3).all()
    for column in ("prefill_s", "ttft_s", "decode_ms_per_token", "kv_cache_mib"):
        assert (frame[column] > 0).all(), column
    knorm = frame[frame.press == "knorm"].set_index("context_length")
    none = frame[frame.press == "no_press"].set_index("context_length")
    assert (knorm.kv_tokens_per_layer == none.kv_tokens_per_layer / 2).all()
    assert (2 * knorm.kv_cache_bytes == none.kv_cache_bytes).all()
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| press | ratio | context |" in printed and "| knorm | 0.5 | 128 |" in printed
    # --report_only prints the same medians from the CSV, with the prefill against no_press at the same length
    assert main(["--report_only", "--output_dir", str(out)]) == 0
    report = capsys.readouterr().out
    base = frame[(frame.press == "no_press") & (frame.context_length == 128)].prefill_s.median()
    ours = frame[(frame.press == "knorm") & (frame.context_length == 128)].prefill_s.median()
    assert f"| knorm | 0.5 | 128 | {ours:.3f} | {100 * (ours / base - 1):+.0f}% |" in report
    assert f"| no_press | 0 | 128 | {base:.3f} | - |" in report
    with pytest.raises(SystemExit):
        main(["--report_only", "--output_dir", str(tmp_path / "nothing")])


def test_with_tokenizer_reaches_kvzip_inside_wrappers(tokenizer):
    from dataclasses import dataclass, field

    from kvpress import BasePress, KnormPress, KVzipPress

    from evaluation.benchmark import with_tokenizer
    from pikv_press import MoEAware

    wrapped, inner, other = MoEAware(KVzipPress(0.5)), KVzipPress(0.5), MoEAware(KVzipPress(0.5))
    other.tokenizer = "kept"
    @dataclass
    class Holder(BasePress):  # a press holding presses (kvpress's ComposedPress refuses KVzip)
        presses: list = field(default_factory=list)
        press: BasePress | None = None

    press = Holder(presses=[KnormPress(0.2), wrapped, Holder(press=inner)])  # composed, wrapped
    assert with_tokenizer(press, tokenizer) is press
    assert wrapped.tokenizer is tokenizer and inner.tokenizer is tokenizer
    assert with_tokenizer(other, tokenizer).tokenizer == "kept"  # a press's own tokenizer stays
    assert with_tokenizer(None, tokenizer) is None


def test_random_model_builds_the_named_shape(monkeypatch):
    from evaluation import models

    monkeypatch.setitem(models.RANDOM_SHAPES, "tiny-moe", ("qwen3_moe", dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)))
    model, tokenizer, label = models.load_model("random-tiny-moe-3l", "cpu")
    assert label == "random-tiny-moe-3l" and len(model.model.layers) == 3 and not model.training
    assert model.config.vocab_size == len(tokenizer) and model.dtype == torch.bfloat16
    gate = model.model.layers[0].mlp.gate.weight
    assert 0.01 < float(gate.detach().float().std()) < 0.03  # routers random, not zeros
    for bad in ("random-tiny-moe", "random-tiny-moe-0l", "random-nope-2l"):
        with pytest.raises(ValueError, match="random-<shape>-<layers>l"):
            models.load_model(bad, "cpu")
