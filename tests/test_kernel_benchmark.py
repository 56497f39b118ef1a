"""evaluation.kernel_benchmark on the CPU: times the torch reference, says GPU figures are unmeasured, appends one
JSON line per (kernel, length) and skips what is already measured."""

from __future__ import annotations

import json

import pytest

from evaluation import kernel_benchmark


def test_cpu_run_reports_reference_timing_and_resumes(tmp_path, capsys):
    output = tmp_path / "bench.jsonl"
    argv = ["--device", "cpu", "--lengths", "64,96", "--repeats", "1", "--output", str(output)]
    assert kernel_benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GPU figures are unmeasured" in printed
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {(r["kernel"], r["length"]) for r in rows} == {(k, n) for k in kernel_benchmark.KERNELS for n in (64, 96)}
    assert all(r["backend"] == "torch" and r["peak_gbps"] is None and r["ms_per_call"] > 0 for r in rows)
    assert all(r["bytes"] > 0 and r["achieved_gbps"] == pytest.approx(r["bytes"] / r["ms_per_call"] / 1e6)
               for r in rows)
    assert kernel_benchmark.main(argv) == 0  # resumed: nothing measured twice
    assert len(output.read_text().splitlines()) == len(rows)
    with pytest.raises(SystemExit, match="needs --device cuda"):
        kernel_benchmark.main(["--device", "cpu", "--backends", "triton", "--output", str(output)])


def test_report_only_puts_backends_side_by_side(tmp_path, capsys):
    rows = [{"device_name": "GPU", "kernel": kernel, "backend": backend, "dtype": "bfloat16", "length": 8192,
             "ms_per_call": ms, "achieved_gbps": 10.0, "fraction_of_peak": 0.5}
            for kernel, backend, ms in [("quantize", "triton", 0.5), ("quantize", "torch", 2.0),
                                        ("select", "triton", 4.0), ("select", "torch", 1.0), ("latent_attention",
                                                                                              "torch", 1.0)]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert kernel_benchmark.main(["--report_only", "--output", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| GPU | select | bfloat16 | 8192 | 4.000 | 1.000 | 0.25 | 10.0 | 0.500 |"
    assert lines[3] == "| GPU | quantize | bfloat16 | 8192 | 0.500 | 2.000 | 4.00 | 10.0 | 0.500 |"
    assert lines[4] == "| GPU | latent_attention | bfloat16 | 8192 | - | 1.000 | - | - | - |"
    with pytest.raises(SystemExit, match="does not exist"):
        kernel_benchmark.main(["--report_only", "--output", str(tmp_path / "missing.jsonl")])
