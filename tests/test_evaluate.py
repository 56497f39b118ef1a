"""The evaluation harness on a tiny random model and a tiny local dataset."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from evaluation import evaluate
from evaluation.benchmarks.ruler import calculate_metrics as ruler_scores
from evaluation.metrics import average_score, string_match_all, string_match_part
from evaluation.registry import BASELINE_PRESSES, press_for_run
from pikv_press.testing import TRAINING_TEXT, build_model, build_tokenizer

# AdaKV(ExpectedAttention) is covered by tests/test_prefill_replay.py: on tiny random models its fake-key search
# fails for long questions (kvpress limitation), so the sweep here uses plain ExpectedAttention. KeyDiff is left out
# to keep the sweep short.
TINY_PRESSES = [p.replace("expected_attention", "expected_attention_no_adakv")
                for p in BASELINE_PRESSES if p != "keydiff"]
PRESSES = ",".join(["no_press", *TINY_PRESSES])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    build_model("qwen3_moe").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny_ruler.jsonl"
    base = " ".join(TRAINING_TEXT[:5])
    records = [
        {"context": base + " The special magic number is 7481.", "question": " What is the number?",
         "answer_prefix": " Answer:", "answer": ["7481"], "task": "niah_single_1", "max_new_tokens": 4},
        {"context": base + " The capital is Paris.", "question": " Which capital?", "answer_prefix": "",
         "answer": ["Paris", "France"], "task": "qa_1", "max_new_tokens": 4},
        # a second question on the same context: answered from the same prefill
        {"context": base + " The capital is Paris.", "question": " Which city?", "answer_prefix": "",
         "answer": ["Paris"], "task": "qa_1", "max_new_tokens": 4},
        {"context": base * 2, "question": " What jumps?", "answer_prefix": "", "answer": ["fox"],
         "task": "vt", "max_new_tokens": 3},
    ]
    pd.DataFrame(records).to_json(path, orient="records", lines=True)
    return path


def _run(model_dir, data, out, *extra):
    return evaluate.main(["--model", str(model_dir), "--data_dir", str(data), "--press_name", PRESSES,
                          "--compression_ratio", "0.25,0.5", "--output_dir", str(out), "--threads", "1", *extra])


def test_prefill_once_sweep_equals_the_naive_loop(tiny_model_dir, tiny_dataset, tmp_path):
    assert _run(tiny_model_dir, tiny_dataset, tmp_path / "once") == 0
    assert _run(tiny_model_dir, tiny_dataset, tmp_path / "naive", "--naive") == 0
    runs = sorted(p.name for p in (tmp_path / "once").iterdir() if p.is_dir())
    assert len(runs) == 1 + 6 * 2  # no_press once, six presses at two ratios
    for run in runs:
        once = pd.read_csv(tmp_path / "once" / run / "predictions.csv", keep_default_na=False)
        naive = pd.read_csv(tmp_path / "naive" / run / "predictions.csv", keep_default_na=False)
        assert once["predicted_answer"].tolist() == naive["predicted_answer"].tolist(), run
        assert json.loads((tmp_path / "once" / run / "metrics.json").read_text()) == json.loads(
            (tmp_path / "naive" / run / "metrics.json").read_text())


def test_layout_report_and_resume(tiny_model_dir, tiny_dataset, tmp_path, monkeypatch):
    assert _run(tiny_model_dir, tiny_dataset, tmp_path) == 0
    run = tmp_path / f"ruler__{tiny_dataset.stem}__{str(tiny_model_dir).replace('/', '--')}__knorm__0.50"
    assert {p.name for p in run.iterdir()} == {"predictions.csv", "metrics.json", "config.yaml"}
    predictions = pd.read_csv(run / "predictions.csv")
    assert "context" not in predictions and {"predicted_answer", "kv_tokens_per_layer"} <= set(predictions)
    assert set(json.loads((run / "metrics.json").read_text())) == {"niah_single_1", "qa_1", "vt"}
    assert (tmp_path / "results.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| knorm |" in table and "| no_press |" in table
    # a second call finds every run on disk and computes nothing
    monkeypatch.setattr(evaluate, "_save_run", lambda *a, **k: pytest.fail("finished runs must be skipped"))
    assert _run(tiny_model_dir, tiny_dataset, tmp_path) == 0


def test_bad_arguments_fail_early(tiny_model_dir, tiny_dataset, tmp_path):
    with pytest.raises(SystemExit, match="Unknown press"):
        evaluate.main(["--model", str(tiny_model_dir), "--press_name", "nope", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="key_channel_compression_ratio"):
        evaluate.main(["--model", str(tiny_model_dir), "--press_name", "think", "--output_dir", str(tmp_path)])

    with pytest.raises(SystemExit, match="compression_ratio"):
        evaluate.main(["--model", str(tiny_model_dir), "--compression_ratio", "1.5", "--output_dir", str(tmp_path)])


def test_ruler_metrics():
    assert string_match_all(["7481 and 1234", "nothing"], [["7481", "1234"], ["5"]]) == 50.0
    assert string_match_all(["only 7481"], [["7481", "1234"]]) == 50.0
    assert string_match_part(["it is PARIS"], [["paris", "rome"]]) == 100.0
    df = pd.DataFrame({"task": ["qa_1", "niah_single_1"], "predicted_answer": ["Rome\x01", "x"],
                       "answer": [["paris", "rome"], ["7481"]]})
    scores = ruler_scores(df)
    assert scores == {"niah_single_1": {"string_match": 0.0}, "qa_1": {"string_match": 100.0}}
    assert average_score(scores) == 50.0


def test_compare_naive_reports_a_ratio(tiny_model_dir, tiny_dataset, tmp_path):
    assert evaluate.main(["--model", str(tiny_model_dir), "--data_dir", str(tiny_dataset), "--press_name",
                          "knorm,snapkv", "--compression_ratio", "0.5", "--output_dir", str(tmp_path),
                          "--compare_naive"]) == 0
    report = json.loads((tmp_path / "sweep_cost.json").read_text())
    assert report["identical_predictions"] and report["runs"] == 2 and report["naive_over_prefill_once"] > 0


def _trec_score(prediction: str, gold: str, classes: list[str]) -> float:
    """LongBench's trec metric, written out independently: on the first line of the prediction, the classes it names
    (minus those that are only part of the gold class's name); 1 / their number if the gold class is among them."""
    line = prediction.lstrip("\n").split("\n")[0]
    named = [c for c in classes if c in line]
    named = [c for c in named if not (c in gold and c != gold)]
    return 1.0 / len(named) if gold in named else 0.0


def test_longbench_through_the_harness(tiny_model_dir, tmp_path):
    """The harness answers LongBench records as kvpress's pipeline does, and scores them with LongBench's metric."""
    from evaluation.benchmarks.longbench import load_longbench

    data = "trec:tests/fixtures/longbench_tiny.jsonl"
    args = ["--model", str(tiny_model_dir), "--dataset", "longbench", "--data_dir", data,
            "--press_name", "no_press,knorm", "--output_dir", str(tmp_path), "--max_new_tokens", "3"]
    assert evaluate.main(args) == 0
    records = load_longbench("trec", data_dir="tests/fixtures/longbench_tiny.jsonl")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    for name in ("no_press", "knorm"):
        run = next(p for p in tmp_path.iterdir() if p.name.startswith("longbench__trec") and f"__{name}__" in p.name)
        predictions = pd.read_csv(run / "predictions.csv", keep_default_na=False, dtype={"predicted_answer": str})
        expected = [pipe(r.context, question=r.question, answer_prefix=r.answer_prefix,
                         press=press_for_run(name, 0.5), max_new_tokens=3)["answer"] for r in records.itertuples()]
        assert predictions["predicted_answer"].tolist() == expected
        known = 100 * sum(_trec_score(p, r.answer[0], list(r.all_classes))
                          for p, r in zip(expected, records.itertuples(), strict=True)) / len(records)
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics) == {"trec"} and metrics["trec"]["score"] == pytest.approx(known)


def test_demo_prints_answers_full_cache_first(tmp_path, capsys):
    from evaluation.demo import print_answers

    for press, ratio, answer in [("knorm", "0.50", "12."), ("no_press", "0.00", "7481.")]:
        run = tmp_path / f"ruler__4096__embedded__{press}__{ratio}"
        run.mkdir()
        pd.DataFrame({"task": ["niah_single_1"], "answer": [["7481"]], "predicted_answer": [answer]}).to_csv(
            run / "predictions.csv", index=False)
    stale = tmp_path / "ruler__4096__embedded-older__knorm__0.50"  # a run of another build: not printed
    stale.mkdir()
    pd.DataFrame({"task": ["niah_single_1"], "answer": [["7481"]], "predicted_answer": ["stale"]}).to_csv(
        stale / "predictions.csv", index=False)
    print_answers(tmp_path, samples=1, model="embedded")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[1:] == ["no_press: 7481.", "knorm@0.50: 12."]


def test_think_and_decoding_presses_in_a_sweep(tiny_model_dir, tiny_dataset, tmp_path):
    """ThinK gets --key_channel_compression_ratio, decoding presses --target_size; neither is swept over ratios."""
    assert evaluate.main(["--model", str(tiny_model_dir), "--data_dir", str(tiny_dataset), "--press_name",
                          "knorm,think,decoding_knorm", "--compression_ratio", "0.25,0.5",
                          "--key_channel_compression_ratio", "0.5", "--target_size", "24", "--compression_interval",
                          "2", "--output_dir", str(tmp_path), "--threads", "1"]) == 0
    runs = sorted(p.name.split("__", 3)[3] for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["decoding_knorm__0.00__target_size24__compression_interval2", "knorm__0.25", "knorm__0.50",
                    "think__0.00__key_channel0.50"]


def test_embedded_runs_are_named_after_the_build(tmp_path, monkeypatch):
    """Runs of the embedded model carry its build folder: a new recipe never reuses an older build's finished runs."""
    import importlib

    build_module = importlib.import_module("evaluation.embedded_model.build")  # the package exports a function `build`
    config = evaluate.RunConfig(press_name="knorm", compression_ratio=0.5)
    monkeypatch.setattr(build_module, "default_model_dir", lambda *a, **k: tmp_path / "smollm2-moe-aaaa")
    first = config.results_dir(tmp_path).name
    monkeypatch.setattr(build_module, "default_model_dir", lambda *a, **k: tmp_path / "smollm2-moe-bbbb")
    second = config.results_dir(tmp_path).name
    assert first == "ruler__4096__embedded-smollm2-moe-aaaa__knorm__0.50" and first != second
    hub = evaluate.RunConfig(model="Qwen/Qwen3-30B-A3B", press_name="knorm", compression_ratio=0.5)
    assert hub.results_dir(tmp_path).name == "ruler__4096__Qwen--Qwen3-30B-A3B__knorm__0.50"


def test_teacher_forced_sweep(tiny_model_dir, tiny_dataset, tmp_path):
    """--scoring teacher_forced: its own run folders, per-sample verdicts and NLL, the same with kvpress's loop."""
    args = ["--model", str(tiny_model_dir), "--data_dir", str(tiny_dataset), "--press_name", "no_press,knorm,snapkv",
            "--compression_ratio", "0.5", "--scoring", "teacher_forced", "--threads", "1"]
    assert evaluate.main([*args, "--output_dir", str(tmp_path / "once")]) == 0
    assert evaluate.main([*args, "--output_dir", str(tmp_path / "naive"), "--naive"]) == 0
    runs = sorted(p.name for p in (tmp_path / "once").iterdir() if p.is_dir())
    assert len(runs) == 3 and all(run.endswith("__teacher_forced") for run in runs)
    for run in runs:
        once = pd.read_csv(tmp_path / "once" / run / "predictions.csv")
        naive = pd.read_csv(tmp_path / "naive" / run / "predictions.csv")
        columns = ["tf_exact", "tf_share", "tf_values", "lead_in", "score"]
        assert once[columns].values.tolist() == naive[columns].values.tolist(), run
        assert once["nll"].tolist() == pytest.approx(naive["nll"].tolist(), rel=1e-4)
        assert (once["score"] == 100 * once["tf_share"]).all() and (once["nll"] > 0).all()
        metrics = json.loads((tmp_path / "once" / run / "metrics.json").read_text())
        assert set(metrics) == {"niah_single_1", "qa_1", "vt"}
        assert set(metrics["qa_1"]) == {"teacher_forced", "nll"}
    report = (tmp_path / "once" / "results.md").read_text()
    assert "scoring: teacher-forced" in report and "| knorm | 0.5 | 4 |" in report
    assert "vs full cache [95% CI, paired]" in report


def test_teacher_forced_scoring_refuses_decoding_presses(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="use --scoring generate"):
        evaluate.main(["--model", str(tiny_model_dir), "--press_name", "decoding_knorm", "--compression_ratio", "0",
                       "--scoring", "teacher_forced", "--output_dir", str(tmp_path)])


def test_results_table_gives_samples_intervals_and_paired_differences(tmp_path):
    configs = []
    scores = {"no_press": [100, 100, 0, 100], "knorm": [100, 0, 0, 100]}
    for press, values in scores.items():
        config = evaluate.RunConfig(model="m", press_name=press, compression_ratio=0.5, data_dir="d")
        run = config.results_dir(tmp_path)
        run.mkdir()
        pd.DataFrame({"task": ["a", "a", "b", "b"], "question": list("wxyz"), "predicted_answer": "",
                      "score": values}).to_csv(run / "predictions.csv", index=False)
        configs.append(config)
    table = evaluate.results_table(configs, tmp_path).set_index("press")
    assert table.loc["knorm", "n"] == 4 and table.loc["knorm", "score"] == 50.0
    assert table.loc["knorm", "low"] <= 50.0 <= table.loc["knorm", "high"]
    assert table.loc["knorm", "delta"] == -25.0 and table.loc["knorm", "delta_high"] <= 0.0
    assert pd.isna(table.loc["no_press", "delta"])
    text = evaluate.markdown_table(table.reset_index())
    assert text.splitlines()[2].startswith("| no_press | 0 | 4 | 75.0 [")  # the full cache first


def test_teacher_forcing_check_resumes_and_reports(tiny_model_dir, tiny_dataset, tmp_path):
    """evaluation.teacher_forcing_check: resumable results and a report of agreement and cost."""
    from evaluation import teacher_forcing_check

    args = ["--model", str(tiny_model_dir), "--data_file", str(tiny_dataset), "--presses", "no_press,knorm",
            "--out", str(tmp_path / "out"), "--threads", "1"]
    assert teacher_forcing_check.main(args) == 0
    out_file = next((tmp_path / "out").glob("*.jsonl"))
    results = teacher_forcing_check.read_results(out_file)
    assert len(results) == 4 * 2 and set(results["press"]) == {"no_press", "knorm"}
    assert set(results["match"]) == {"all", "any"} and (results["model"] == out_file.stem).all()
    # a restart adds nothing
    assert teacher_forcing_check.main(args) == 0
    assert len(teacher_forcing_check.read_results(out_file)) == 8
    assert teacher_forcing_check.main([*args, "--report"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["samples"] == 4 and report["pairs"] == 8
    # teacher forcing is exact: its verdict is what the greedy tokens write, on every answer
    assert report["agreement_with_greedy_tokens_pct"] == 100.0
    assert report["cost"]["answer_cost_ratio_generate_over_tf"] > 0
    assert "Teacher-forced scoring vs generation" in (tmp_path / "out" / "report.md").read_text()


def test_cache_option(tiny_model_dir, tiny_dataset, tmp_path):
    """--cache: the press compresses, and answers read, a cache of that kind (run folders say which; the quantized
    caches themselves are tested in tests/test_answer.py: tiny contexts do not fit quanto's groups)."""
    assert evaluate.main(["--model", str(tiny_model_dir), "--data_dir", str(tiny_dataset), "--press_name", "knorm",
                          "--compression_ratio", "0.5", "--cache", "dynamic", "--output_dir", str(tmp_path),
                          "--threads", "1"]) == 0
    assert [p.name.endswith("__knorm__0.50") for p in tmp_path.iterdir() if p.is_dir()] == [True]
    config = evaluate.RunConfig(model="m", press_name="knorm", compression_ratio=0.5, cache="quantized-int4")
    assert config.results_dir(tmp_path).name == "ruler__4096__m__knorm__0.50__cache-quantized-int4"
    with pytest.raises(SystemExit):
        evaluate.main(["--cache", "int3", "--output_dir", str(tmp_path)])


def test_demo_prints_teacher_forced_verdicts(tmp_path, capsys):
    from evaluation.demo import print_answers

    for press, ratio, exact, lead_in in [("tova", "0.50", False, ' 245859.'), ("no_press", "0.00", True, ":")]:
        run = tmp_path / f"ruler__1024__embedded__{press}__{ratio}__teacher_forced"
        run.mkdir()
        pd.DataFrame({"task": ["niah_single_2"], "answer": [["2458591"]], "predicted_answer": [""],
                      "tf_exact": [exact], "lead_in": [json.dumps([lead_in])], "nll": [0.5]}).to_csv(
            run / "predictions.csv", index=False)
    print_answers(tmp_path, samples=1, model="embedded", scoring="teacher_forced")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[1:] == ["no_press: writes it (after ':'), gold NLL 0.50",
                         "tova@0.50: misses it (greedy writes '245859.' instead), gold NLL 0.50"]
