"""evaluation.routing_ablation: each row is paired with the same press with one thing switched off."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from evaluation import routing_ablation as ra
from evaluation.models import EMBEDDED

PRESSES = ["no_press", "tova", "streaming_llm", "expert_balanced_tova", "expert_balanced_tova_predicted",
           "expert_balanced_streaming_llm", "routing_novelty_tova", "layer_budget_tova"]


def test_reference_press_switches_one_thing_off():
    assert ra.reference_press("expert_balanced_tova_predicted", PRESSES) == "expert_balanced_tova"
    assert ra.reference_press("expert_balanced_streaming_llm", PRESSES) == "streaming_llm"
    assert ra.reference_press("routing_novelty_tova", PRESSES) == "tova"
    assert ra.reference_press("layer_budget_tova", PRESSES) == "tova"
    assert ra.reference_press("tova", PRESSES) is None
    assert ra.reference_press("streaming_llm", PRESSES) is None
    # a reference that was not run is no reference
    assert ra.reference_press("expert_balanced_knorm", PRESSES) is None
    assert ra.reference_press("expert_balanced_tova_predicted", ["expert_balanced_tova_predicted", "tova"]) is None


def _write_run(runs: Path, chunk: Path, press: str, ratio: float, scores: list[float], nll: list[float],
               tasks: tuple[str, ...] = ("a", "a", "b", "b")) -> None:
    folder = ra._run_dir(runs, chunk, press, ratio, EMBEDDED)
    folder.mkdir(parents=True)
    pd.DataFrame({"question": [f"q{i}" for i in range(len(scores))], "task": list(tasks),
                  "score": scores, "nll": nll, "press_seconds": 1.0, "prefill_seconds": 10.0,
                  "predicted_answer": ""}).to_csv(folder / "predictions.csv", index=False)
    (folder / "metrics.json").write_text("{}")


def test_report_pairs_each_row_with_its_reference(tmp_path):
    chunk = tmp_path / "data" / "ruler1024_2tasks2_size2_chunk000.jsonl"
    runs = tmp_path / "runs"
    rows = {("no_press", 0.0): [100, 100, 100, 0], ("tova", 0.5): [100, 0, 100, 0],
            ("streaming_llm", 0.5): [0, 0, 100, 0], ("expert_balanced_streaming_llm", 0.5): [100, 100, 100, 0]}
    for (press, ratio), scores in rows.items():
        _write_run(runs, chunk, press, ratio, scores, [1.0, 2.0, 3.0, 4.0])
    presses = [p for p, _ in rows]
    text = ra.report(tmp_path, [chunk], presses, [0.5])
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| press ")}
    eb = table["expert_balanced_streaming_llm"]
    # task means: streaming (0 + 50) / 2 = 25, expert-balanced (100 + 50) / 2 = 75: +50 over its base
    assert eb[2].startswith("75.0") and eb[4].startswith("+50.0") and eb[5] == "streaming_llm"
    assert table["streaming_llm"][4].startswith("-25.0") and table["streaming_llm"][5] == "tova"
    assert table["tova"][5] == "" and table["tova"][4] == ""
    assert eb[3].startswith("+0.0")  # against the full cache
    assert "10.0%" in eb[-2] and eb[-1].strip(" |") == ""  # replay / prefill; no kv_tokens_per_layer: no rows held
    assert "4 samples (2 tasks, 2 per task)" in text


def test_report_says_the_range_of_samples_per_task_when_uneven(tmp_path):
    chunk = tmp_path / "data" / "ruler4096_task-a_size1_chunk000.jsonl"
    tasks = ("a", "a", "a", "b")
    for press, ratio in (("no_press", 0.0), ("tova", 0.5)):
        _write_run(tmp_path / "runs", chunk, press, ratio, [100, 0, 0, 100], [1.0] * 4, tasks)
    text = ra.report(tmp_path, [chunk], ["no_press", "tova"], [0.5])
    assert "4 samples (2 tasks, 1-3 per task)" in text


def test_report_of_generated_runs_has_no_nll_and_a_base_of_choice(tmp_path):
    chunk = tmp_path / "data" / "ruler4096_2tasks2_size2_chunk000.jsonl"
    runs = tmp_path / "runs"
    rows = {("no_press", 0.0): [100, 100, 100, 0], ("pikv", 0.5): [100, 0, 100, 0], ("tova", 0.5): [0, 0, 100, 0]}
    for (press, ratio), scores in rows.items():
        folder = ra._run_dir(runs, chunk, press, ratio, EMBEDDED, "generate")
        folder.mkdir(parents=True)
        pd.DataFrame({"question": [f"q{i}" for i in range(4)], "task": ["a", "a", "b", "b"], "score": scores,
                      "press_seconds": 1.0, "prefill_seconds": 10.0, "predicted_answer": "x"}).to_csv(
            folder / "predictions.csv", index=False)
        (folder / "metrics.json").write_text("{}")
    assert ra.report(tmp_path, [chunk], list(p for p, _ in rows), [0.5]) == "no finished chunk yet"  # teacher-forced
    text = ra.report(tmp_path, [chunk], [p for p, _ in rows], [0.5], base="pikv", scoring="generate")
    assert "generated (greedy answers" in text
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| press ")}
    # tova (0 + 50) / 2 = 25 against pikv (50 + 50) / 2 = 50
    assert table["tova"][4].startswith("-25.0") and table["tova"][5] == "pikv" and table["tova"][6] == ""
    assert table["pikv"][5] == ""


def test_chunk_files_of_single_tasks_never_collide(tmp_path, monkeypatch):
    """Tasks whose names have the same length (niah_single_1/2/3) get their own chunk files."""
    import evaluation.routing_ablation as module

    loaded = []

    def fake_load(length, tasks, samples_per_task):
        loaded.append(tasks[0])
        names = list(tasks) * samples_per_task
        return pd.DataFrame({"task": names, "context": ["c"] * len(names)})

    monkeypatch.setattr(module.ruler, "load_samples", fake_load)
    paths = {ra.chunk_file(tmp_path, 4096, 0, 1, [task]) for task in ("niah_single_1", "niah_single_2", "qa_1")}
    assert len(paths) == 3 and loaded == ["niah_single_1", "niah_single_2", "qa_1"]
    assert ra.chunk_file(tmp_path, 1024, 0, 1, ["a", "b"]).name == "ruler1024_2tasks2_size1_chunk000.jsonl"


def test_report_finds_the_runs_that_evaluate_writes_for_either_scoring(tmp_path):
    """The report reads the folders evaluate.py names (a generated run has no scoring suffix, a teacher-forced one
    has): a real sweep on a tiny model, then the report of each scoring."""
    from pikv_press.testing import TRAINING_TEXT, build_model, build_tokenizer

    model_dir = tmp_path / "tiny"
    build_model("qwen3_moe").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    chunk = tmp_path / "data" / "ruler64_task-niah_single_1_size1_chunk000.jsonl"
    chunk.parent.mkdir()
    pd.DataFrame([{"context": " ".join(TRAINING_TEXT[:4]) + " The number is 7481.", "question": " The number?",
                   "answer_prefix": " Answer:", "answer": ["7481"], "task": "niah_single_1",
                   "max_new_tokens": 3}]).to_json(chunk, orient="records", lines=True)
    for scoring in ("generate", "teacher_forced"):
        assert ra.run_chunk(chunk, ["no_press", "knorm"], "0.5", tmp_path / "runs", 1, str(model_dir), scoring) == 0
        text = ra.report(tmp_path, [chunk], ["no_press", "knorm"], [0.5], model=str(model_dir), scoring=scoring)
        assert "1 samples (1 tasks, 1 per task)" in text, (scoring, text)
        if scoring == "teacher_forced":  # the rows each cache holds, against the full cache's
            held = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1]
                    for line in text.splitlines() if line.startswith("| no_press") or line.startswith("| knorm")}
            assert held["no_press"] == "100%" and held["knorm"] in ("49%", "50%"), held
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 4
    # one chunk's sweep writes no results.md / results.png of its own: the ablation's report pools every chunk
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.is_dir()) == []


def test_tasks_short_of_samples_are_skipped_per_task_and_the_report_generates_no_data(tmp_path, monkeypatch,
                                                                                       capsys):
    """RULER cannot make every sample of every task at every length (qa_2 has 6 at 2k): with --split_tasks that
    task's chunk is skipped with a message and the others run; without it, a clear exit. --report_only never
    generates a chunk file."""
    import evaluation.routing_ablation as module
    from evaluation.data.ruler import RulerGenerationError

    def fake_load(length, tasks, samples_per_task):
        if "short" in tasks and samples_per_task > 1:
            raise RulerGenerationError("RULER short/2048: cannot be generated")
        names = list(tasks) * samples_per_task
        return pd.DataFrame({"task": names, "context": ["c"] * len(names)})

    ran = []
    monkeypatch.setattr(module.ruler, "load_samples", fake_load)
    monkeypatch.setattr(module, "run_chunk", lambda path, *a, **k: ran.append(path.name) or 0)
    monkeypatch.setattr(module, "report", lambda *a, **k: "table")
    args = ["--length", "2048", "--chunks", "2", "--tasks", "long,short", "--output_dir", str(tmp_path)]
    assert module.main([*args, "--split_tasks"]) == 0
    assert ran == ["ruler2048_task-long_size1_chunk000.jsonl", "ruler2048_task-short_size1_chunk000.jsonl",
                   "ruler2048_task-long_size1_chunk001.jsonl"]
    assert "skipped: RULER short/2048" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--split_tasks"):
        module.main([*args, "--chunks", "2", "--first_chunk", "1"])
    monkeypatch.setattr(module.ruler, "load_samples", lambda *a, **k: pytest.fail("the report generated data"))
    assert module.main([*args, "--split_tasks", "--chunks", "3", "--report_only"]) == 0
    assert (tmp_path / "ablation.md").read_text() == "table\n"
    assert module.main([*args, "--split_tasks", "--report_only", "--report_name", "sub.md"]) == 0
    assert (tmp_path / "sub.md").read_text() == "table\n"
