"""The evaluation harness on a tiny random model and a tiny local dataset."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from evaluation import evaluate
from evaluation.metrics import average_score, ruler_scores, string_match_all, string_match_part
from pikv_press.testing import TRAINING_TEXT, build_model, build_tokenizer

# AdaKV(ExpectedAttention) is covered by tests/test_prefill_replay.py: on tiny random models its fake-key search
# fails for long questions (kvpress limitation), so the sweep here uses plain ExpectedAttention.
PRESSES = "no_press,knorm,snapkv,streaming_llm,tova,expected_attention_no_adakv,pyramidkv"


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


def test_longbench_through_the_harness(tiny_model_dir, tmp_path):
    data = "trec:tests/fixtures/longbench_tiny.jsonl"
    args = ["--model", str(tiny_model_dir), "--dataset", "longbench", "--data_dir", data,
            "--press_name", "no_press,knorm", "--output_dir", str(tmp_path), "--max_new_tokens", "3"]
    assert evaluate.main(args) == 0
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("longbench__trec") and "knorm" in p.name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"trec"} and 0.0 <= metrics["trec"]["score"] <= 100.0


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
