"""evaluation.sharded_benchmark: settings, byte accounting, RoPE factor and the paired summary (no timing asserted);
evaluation.sharded_decoding's fidelity points and plot."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from evaluation.sharded_benchmark import dense_kv_bytes, report, rope_factor, settings, summarize
from evaluation.sharded_decoding import fidelity_by_k, plot_fidelity


def test_settings():
    assert settings("all,32,8") == ["dense", "all", "32", "8"]
    assert settings("8,8") == ["dense", "all", "8"]
    with pytest.raises(ValueError, match="positive integers"):
        settings("all,eight")


def test_dense_kv_bytes_counts_every_key_and_value():
    cache = DynamicCache()
    for layer in range(3):  # (batch, kv_heads, seq, head_dim), float32, keys wider than values
        cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 4), layer)
    assert dense_kv_bytes(cache) == 3 * (2 * 5 * 8 * 4 + 2 * 5 * 4 * 4)


def test_rope_factor():
    assert rope_factor(2048, 8192) == 1
    assert rope_factor(8192, 8192) == 1
    assert rope_factor(8193, 8192) == 2
    assert rope_factor(32768, 8192) == 4


def _step(context, setting, round_, wall, kv_bytes, kl=0.0):
    return {"kind": "step", "context_tokens": context, "setting": setting, "round": round_, "wall_ms": wall,
            "cpu_ms": wall / 2, "kv_bytes": kv_bytes, "kl": kl, "rope": "default"}


def test_summarize_pairs_rounds_and_takes_medians(tmp_path):
    rows = []
    for r, (dense_ms, sharded_ms) in enumerate([(100, 50), (200, 100), (400, 400)]):  # ratios 0.5, 0.5, 1.0
        rows += [_step(2048, "dense", r, dense_ms, 1000), _step(2048, "8", r, sharded_ms, 250, kl=0.1 * r)]
    rows.append(_step(2048, "8", 3, 10, 250))  # no dense row in round 3: not paired, not counted
    rows.append({"kind": "prefill", "context_tokens": 2048, "prefill_s": 12.0, "chunk": 1024})
    table = summarize(rows)
    assert [t["setting"] for t in table] == ["dense", "8"]
    dense, restricted = table
    assert dense["wall_ratio"] == 1.0 and dense["fewer_bytes"] == 1.0
    assert restricted["rounds"] == 3
    assert restricted["wall_ratio"] == pytest.approx(0.5)  # the median of per-round ratios, not a ratio of medians
    assert restricted["cpu_ratio"] == pytest.approx(0.5)
    assert restricted["fewer_bytes"] == pytest.approx(4.0)
    assert restricted["kl"] == pytest.approx(0.1)
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = report(path)
    assert "| 2,048 | sharded, k=8 |" in text and "4.00x" in text and "0.50" in text


def test_summarize_orders_settings():
    rows = [_step(512, s, 0, 10, 100) for s in ("4", "dense", "32", "all")]
    assert [t["setting"] for t in summarize(rows)] == ["dense", "all", "32", "4"]


def test_fidelity_points_and_plot(tmp_path):
    rows = []
    for index in range(4):
        for k, exact, nbytes, kl in (("all", True, 1000.0, 0.0), ("8", index % 2 == 0, 250.0, 0.5)):
            rows.append({"model": "tiny", "task": "niah_single_1", "index": index, "cache": "sharded", "k": k,
                         "context_tokens": 900, "kv_bytes_per_step": nbytes, "decode_ms_per_token": 10.0,
                         "decode_cpu_ms_per_token": 9.0, "attention_ms_per_token": 1.0, "kl": kl, "tf_exact": exact})
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pandas as pd

    points = fidelity_by_k(pd.DataFrame(rows))
    assert [p["k"] for p in points] == ["all", "8"]
    assert points[1]["fewer_bytes"] == pytest.approx(4.0) and points[1]["accuracy"] == pytest.approx(0.5)
    assert points[1]["diff"] == pytest.approx(-0.5) and points[1]["kl"] == pytest.approx(0.5)
    png = plot_fidelity(path, tmp_path / "fidelity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_plot(tmp_path):
    from evaluation.sharded_benchmark import plot

    rows = [_step(c, s, 0, 10.0 if s == "dense" else 8.0, 100 if s == "dense" else 25)
            for c in (2048, 8192) for s in ("dense", "all", "8")]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot(path, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_print_report(tmp_path, capsys):
    from evaluation.cli import print_report

    print_report(tmp_path / "r.jsonl", lambda p: f"table of {p.name}", lambda p, png: png, tmp_path / "x.png")
    assert capsys.readouterr().out.splitlines() == ["table of r.jsonl", f"plot: {tmp_path / 'x.png'}"]
    print_report(tmp_path / "r.jsonl", lambda p: "only the table")
    assert capsys.readouterr().out == "only the table\n"
