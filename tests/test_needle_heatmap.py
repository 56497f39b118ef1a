"""The needle heatmap end to end on a tiny MoE: one context per (length, depth) cell, every press replayed on it,
a grid per press and ratio in heatmap.md / heatmap.png, finished runs skipped on a second call."""
from __future__ import annotations

import pytest

from evaluation import needle_heatmap
from pikv_press.testing import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_needle")
    build_model("qwen3_moe").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def test_heatmap_draws_one_grid_per_press_and_ratio_and_resumes(tiny_model, tmp_path):
    args = ["--lengths", "320,384", "--depths", "0,100", "--presses", "no_press,tova,kvzip", "--ratios", "0.5",
            "--model", tiny_model, "--threads", "1", "--output_dir", str(tmp_path)]
    assert needle_heatmap.main(args) == 0
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 3 and all(name.endswith("__teacher_forced") for name in runs)
    table = (tmp_path / "heatmap.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| press")]
    assert [row.split(" | ")[0] for row in rows] == ["| no_press", "| KVzip (MoE-correct) @ 0.5",
                                                      "| PiKVPress = tova @ 0.5"]
    for row in rows:  # two lengths x two depths, each cell a verdict and an NLL
        cells = row.split(" | ")[1:3]
        assert all(len(cell.split("; ")) == 2 for cell in cells)
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/predictions.csv")}
    assert len(written) == 3
    assert needle_heatmap.main(args) == 0  # resumes: every run is finished and left as it was
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/predictions.csv")} == written
    assert needle_heatmap.main([*args, "--report"]) == 0


def test_bad_lists_fail_before_any_work(tmp_path, capsys):
    for option in ("--lengths", "--depths", "--ratios"):
        with pytest.raises(SystemExit):
            needle_heatmap.main([option, "1k", "--output_dir", str(tmp_path)])
        assert "'1k' in '1k' is not a valid" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no needle runs"):
        needle_heatmap.main(["--report", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
