"""The resumable dense-vs-MoE RULER comparison (evaluation.embedded_model.retrieval) on a tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from evaluation.embedded_model import retrieval
from pikv_press.testing import TRAINING_TEXT, build_model, build_tokenizer


def frame() -> pd.DataFrame:
    base = " ".join(TRAINING_TEXT[:4])
    rows = [
        {"context": base + f" The special magic number is {n}.", "question": " What is the number?",
         "answer_prefix": " Answer:", "answer": [str(n)], "task": task, "max_new_tokens": 128}
        for task, n in (("niah_single_1", 11), ("niah_single_1", 12), ("qa_1", 13))
    ]
    df = pd.DataFrame(rows)
    return df.assign(index=df.groupby("task").cumcount())


def test_answers_are_appended_per_sample_and_resumed(tmp_path, monkeypatch):
    calls = []

    def fake_load(variant, model_dir=None):
        calls.append(variant)
        return build_model("qwen3_moe"), build_tokenizer()

    monkeypatch.setattr(retrieval, "load_variant", fake_load)
    build = tmp_path / "smollm2-moe-aaaa"
    assert retrieval.answer_samples("moe", frame().iloc[:2], tmp_path, max_new_tokens=3, model_dir=build) == 2
    lines = (tmp_path / "moe.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]
    assert {json.loads(line)["model"] for line in lines} == {"smollm2-moe-aaaa"}
    # a line cut by a kill is ignored and that sample redone; finished samples are not
    with (tmp_path / "moe.jsonl").open("a") as f:
        f.write('{"task": "qa_1", "ind')
    assert retrieval.done_keys(tmp_path / "moe.jsonl") == {("niah_single_1", 0), ("niah_single_1", 1)}
    assert retrieval.answer_samples("moe", frame(), tmp_path, max_new_tokens=3, model_dir=build) == 1
    assert retrieval.answer_samples("moe", frame(), tmp_path, max_new_tokens=3, model_dir=build) == 0
    assert calls == ["moe", "moe"]  # the model is not even loaded when nothing is left
    answers = retrieval.read_answers(tmp_path / "moe.jsonl")
    assert len(answers) == 3 and answers["predicted_answer"].map(type).eq(str).all()
    # another build of the embedded model answers everything anew, in the same file
    other = tmp_path / "smollm2-moe-bbbb"
    assert retrieval.done_keys(tmp_path / "moe.jsonl", "smollm2-moe-bbbb") == set()
    assert retrieval.answer_samples("moe", frame(), tmp_path, max_new_tokens=3, model_dir=other) == 3
    assert len(retrieval.read_answers(tmp_path / "moe.jsonl", "smollm2-moe-aaaa")) == 3
    assert len(retrieval.read_answers(tmp_path / "moe.jsonl", "smollm2-moe-bbbb")) == 3


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(task, i, refs, pred, model):
    return {"task": task, "index": i, "answer": refs, "predicted_answer": pred, "seconds": 1.0, "model": model}


def test_report_scores_paired_samples(tmp_path):
    dense = retrieval.model_label("dense")
    build = tmp_path / "smollm2-moe-aaaa"

    def d(*args):
        return row(*args, dense)

    def m(*args):
        return row(*args, build.name)

    write(tmp_path / "dense.jsonl", [
        d("niah_single_1", 0, ["123"], "123."), d("niah_single_1", 1, ["456"], "456"),
        d("niah_multivalue", 0, ["1", "2"], "1 and 2"), d("qa_1", 0, ["Paris", "France"], "france"),
        d("qa_1", 1, ["Rome"], "Milan"),  # answered by dense only: not scored
    ])
    write(tmp_path / "moe.jsonl", [
        m("niah_single_1", 0, ["123"], "123"), m("niah_single_1", 1, ["456"], "no idea"),
        m("niah_multivalue", 0, ["1", "2"], "only 2"), m("qa_1", 0, ["Paris", "France"], "Paris"),
        row("qa_1", 1, ["Rome"], "Rome", "smollm2-moe-older"),  # another build's answer: not scored
    ])
    result = retrieval.report(tmp_path, "cmd", build)
    assert result["model"] == "smollm2-moe-aaaa"
    assert result["tasks"]["niah_single_1"] == {"samples": 2, "dense": 100.0, "moe": 50.0}
    assert result["tasks"]["niah_multivalue"] == {"samples": 1, "dense": 100.0, "moe": 50.0}
    assert result["tasks"]["qa_1"] == {"samples": 1, "dense": 100.0, "moe": 100.0}
    niah = result["niah"]
    assert niah["samples"] == 3 and niah["both_right"] == 1 and niah["only_dense_right"] == 2
    assert niah["only_moe_right"] == 0
    assert niah["moe_minus_dense"] == pytest.approx(-50.0)  # per-sample differences 0, -1, -0.5
    low, high = niah["moe_minus_dense_95ci"]
    assert -100 <= low <= niah["moe_minus_dense"] <= high <= 0
    md = (tmp_path / "retrieval.md").read_text()
    assert "| niah_single_1 | 2 | 100.0 | 50.0 | -50.0 |" in md
    assert (tmp_path / "retrieval.png").stat().st_size > 1000


def test_report_without_paired_samples_says_what_to_run(tmp_path):
    write(tmp_path / "dense.jsonl", [row("qa_1", 0, ["a"], "a", retrieval.model_label("dense"))])
    write(tmp_path / "moe.jsonl", [row("qa_1", 0, ["a"], "a", "smollm2-moe-older")])
    with pytest.raises(SystemExit, match="--variant moe"):
        retrieval.report(tmp_path, "cmd", tmp_path / "smollm2-moe-aaaa")


def test_samples_are_interleaved_across_tasks():
    df = pd.DataFrame({"task": ["b"] * 3 + ["a"] * 2, "context": list("xyzuv")})
    df = retrieval.interleave_tasks(df.assign(index=df.groupby("task").cumcount()))
    assert list(zip(df["task"], df["index"], strict=True)) == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2)]
