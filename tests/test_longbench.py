"""LongBench (https://arxiv.org/abs/2308.14508): official metrics on hand-computed examples, loading, hub errors.

The expected values are derived by hand in the comments, following LongBench's ``metrics.py`` / ``eval.py`` and the
``rouge`` / ``fuzzywuzzy`` packages they call. Loading reads ``tests/fixtures/longbench_tiny.jsonl``: hand-written
records of seven subsets, some in the raw THUDM/LongBench layout (``input``, ``answers``) and some already split as in
kvpress's ``Xnhyacinth/LongBench`` (``question``, ``answer_prefix``). Nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from evaluation.benchmarks import longbench
from evaluation.benchmarks.longbench import (
    DATASET2MAXLEN,
    LONGBENCH_METRICS,
    LongBenchUnavailableError,
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    load_longbench,
    longbench_scores,
    qa_f1_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    score_record,
    split_prompt,
)

FIXTURE = Path(__file__).parent / "fixtures" / "longbench_tiny.jsonl"
FIXTURE_SUBSETS = {
    "narrativeqa": 2,
    "hotpotqa": 2,
    "gov_report": 1,
    "trec": 2,
    "passage_retrieval_en": 1,
    "passage_count": 1,
    "lcc": 1,
}
LAYOUT = ["context", "question", "answer_prefix", "answer", "task", "max_new_tokens"]


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_qa_f1_score():
    # "The cat sat on the mat." -> "cat sat on mat" (4 tokens); "A cat sat." -> "cat sat" (2 tokens); 2 in common:
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert qa_f1_score("The cat sat on the mat.", "A cat sat.") == pytest.approx(2 / 3)
    # Case, punctuation and articles vanish: "hello world" on both sides.
    assert qa_f1_score("Hello, the World!", "hello world") == 1.0
    # Repeated tokens count as a multiset: "paris paris" vs "paris": 1 common, P = 1/2, R = 1, F1 = 2/3.
    assert qa_f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0


def test_rouge_score_matches_the_rouge_package():
    # One sentence each; words: the cat sat on the mat / the cat lay on the mat, 5 unique words each.
    # LCS = "the cat on the mat", whose *set* of words is {the, cat, on, mat}: 4.
    # R = 4/5, P = 4/5, F = 2 * (0.64 / (1.6 + 1e-8)) = 0.8 - 5e-9 (the package counts unique words, not 5/6).
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-8)
    # Sentences are split on ".": hyp [a b, c d], ref [a c, b d]; LCS(a c, a b) = a, LCS(a c, c d) = c,
    # LCS(b d, a b) = b, LCS(b d, c d) = d: union {a, b, c, d} = 4 of 4 unique words on each side, F = 1 - 5e-9.
    # (Without the split the LCS of "a b c d" and "a c b d" has 3 words: 0.75.)
    assert rouge_score("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-8)
    # The LCS walk-back of the package: ref "a b" vs hyp "b a" ties (table[1][2] = table[2][1] = 1), so it moves left
    # and keeps "b"; ref "b" vs "b a" gives "b" too. Union {b}: R = 1/2, P = 1/2, F = 0.5 - 5e-9.
    # (Keeping "a" in the tie would give the union {a, b} and F = 1.)
    assert rouge_score("b a", "a b. b") == pytest.approx(0.5, abs=1e-8)
    # No sentence at all: the package raises ValueError, LongBench's try/except scores 0.0.
    assert rouge_score("", "a summary") == 0.0
    assert rouge_score("...", "a summary") == 0.0
    # Two empty "sentences" give the single word "" on the reference side, shared with nothing: R = P = 0, F = 0.
    assert rouge_score("a summary", " . ") == 0.0


def test_rouge_score_long_sentences():
    # The rouge package rebuilds the LCS recursively and fails past ~1000 words; this one is iterative.
    text = " ".join(f"w{i}" for i in range(1500))
    assert rouge_score(text, text) == pytest.approx(1.0, abs=1e-8)


def test_classification_score():
    classes = ["Animal", "City", "Country", "Date"]
    # Only "City" is found and it is the reference: 1/1.
    assert classification_score("City", "City", all_classes=classes) == 1.0
    # "City" and "Country" found, reference among them: 1/2.
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert classification_score("Date", "City", all_classes=classes) == 0.0
    # Classes that are substrings of the reference (but not the reference) are dropped: "Animal" is dropped from
    # [Animal, Animal product], leaving 1 match.
    assert classification_score("Animal product", "Animal product", all_classes=["Animal", "Animal product"]) == 1.0
    # LongBench removes from the list it iterates over, so the element after a dropped one is skipped:
    # matches [a, ab, abc]; "a" is dropped, the loop then looks at index 1 = "abc" (kept), "ab" is never examined:
    # [ab, abc] -> 1/2.
    assert classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("City", "City")


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    # Numbers found: 2 and 12 -> 1 of 2 is right.
    assert retrieval_score("Paragraph 2 or Paragraph 12", "Paragraph 2") == 0.5
    # Numbers compare as whole strings: "12" is not "2".
    assert retrieval_score("Paragraph 12", "Paragraph 2") == 0.0
    assert retrieval_score("I do not know", "Paragraph 2") == 0.0
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    assert retrieval_zh_score("答案是：段落5和段落7", "段落5") == 0.5
    with pytest.raises(ValueError, match="paragraph number"):
        retrieval_score("Paragraph 2", "two")
    # Numbers 4 and 14: one is the count.
    assert count_score("There are 4 unique paragraphs out of 14", "4") == 0.5
    assert count_score("4", "4") == 1.0
    assert count_score("four", "4") == 0.0


def test_fuzz_ratio_and_code_sim_score():
    # difflib: "abcd" / "abce" share the block "abc": ratio = 2 * 3 / 8 = 0.75 -> 75.
    assert fuzz_ratio("abcd", "abce") == 75
    # One matching character in 8 + 8: 2 / 16 = 0.125 -> 12.5 -> int(round(12.5)) = 12 (half to even).
    assert fuzz_ratio("abcdefgh", "aXXXXXXX") == 12
    # Three matching characters: 6 / 16 = 0.375 -> 37.5 -> 38 (half to even).
    assert fuzz_ratio("abcdefgh", "abcXXXXX") == 38
    # fuzzywuzzy checks equality before emptiness: "" vs "" is 100, "" vs "x" is 0.
    assert fuzz_ratio("", "") == 100
    assert fuzz_ratio("", "x") == 0
    # The first line without ` # // after leading newlines is compared: "return a * b" == reference -> 1.0.
    prediction = "\n\n```python\n# multiply\nreturn a * b\nprint(1)"
    assert code_sim_score(prediction, "return a * b") == 1.0
    # "return a + b" vs "return a * b": 11 of 12 characters match, 22 / 24 = 0.9167 -> 92 -> 0.92.
    assert code_sim_score("return a + b", "return a * b") == 0.92
    # Only comment lines: the empty string is compared -> 0.
    assert code_sim_score("# nothing\n// here", "return a * b") == 0.0


def test_metric_table():
    assert LONGBENCH_METRICS["narrativeqa"] is qa_f1_score
    assert LONGBENCH_METRICS["triviaqa"] is qa_f1_score
    assert LONGBENCH_METRICS["gov_report"] is rouge_score
    assert LONGBENCH_METRICS["samsum"] is rouge_score
    assert LONGBENCH_METRICS["trec"] is classification_score
    assert LONGBENCH_METRICS["passage_retrieval_en"] is retrieval_score
    assert LONGBENCH_METRICS["passage_count"] is count_score
    assert LONGBENCH_METRICS["lcc"] is code_sim_score
    assert LONGBENCH_METRICS["repobench-p"] is code_sim_score
    for unsupported in ("multifieldqa_zh", "dureader", "vcsum"):
        assert unsupported not in LONGBENCH_METRICS
    assert set(LONGBENCH_METRICS) <= set(DATASET2MAXLEN)


def test_max_over_references():
    # "paris" vs "london": 0; vs "paris france": P = 1, R = 1/2, F1 = 2/3. The record keeps the maximum.
    assert score_record("hotpotqa", "Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert score_record("hotpotqa", "Paris", ["London"]) == 0.0
    assert score_record("hotpotqa", "Paris", []) == 0.0


def test_first_line_rule():
    prediction = "\n\nParis\nLondon is wrong"
    # triviaqa scores the first line after leading newlines only: "Paris" -> 1.0.
    assert score_record("triviaqa", prediction, ["Paris"]) == 1.0
    # hotpotqa scores all of it: tokens paris london is wrong, P = 1/4, R = 1, F1 = 0.4.
    assert score_record("hotpotqa", prediction, ["Paris"]) == pytest.approx(0.4)
    # Only newlines are stripped (LongBench's lstrip('\n')): the first line of " \nParis" is " " -> 0.
    assert score_record("triviaqa", " \nParis", ["Paris"]) == 0.0
    # trec: the model goes on with a new few-shot example; its second "Type:" line is ignored.
    classes = ["City", "Date"]
    assert score_record("trec", "City\nQuestion: When ?\nType: Date", ["City"], classes) == 1.0
    assert score_record("samsum", "a b\nc d", ["c d"]) == 0.0


def test_longbench_scores():
    df = pd.DataFrame(
        {
            "task": ["hotpotqa"] * 3 + ["passage_count"] * 2 + ["trec"],
            "predicted_answer": ["Paris", "Rome", "the Paris", "2", "2 or 3", "City or Date"],
            "answer": [["Paris"], ["Paris"], ["London", "Paris"], ["2"], ["2"], ["City"]],
            "all_classes": [None] * 5 + [["City", "Date"]],
        }
    )
    scores = longbench_scores(df)
    # hotpotqa: 1, 0, 1 -> 66.67; passage_count: 1, 1/2 -> 75.0; trec: City and Date found -> 1/2 -> 50.0.
    assert scores == {"hotpotqa": {"score": 66.67}, "passage_count": {"score": 75.0}, "trec": {"score": 50.0}}
    # LongBench's own column name `answers` is accepted as well.
    assert longbench_scores(df.rename(columns={"answer": "answers"})) == scores
    with pytest.raises(ValueError, match="predicted_answer"):
        longbench_scores(df.drop(columns="predicted_answer"))


# ---------------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", sorted(FIXTURE_SUBSETS))
def test_load_fixture_layout(subset):
    df = load_longbench(subset, data_dir=FIXTURE)
    assert list(df.columns[:6]) == LAYOUT
    assert "all_classes" in df.columns
    assert len(df) == FIXTURE_SUBSETS[subset]
    assert (df["task"] == subset).all()
    assert (df["max_new_tokens"] == DATASET2MAXLEN[subset]).all()
    for answer in df["answer"]:
        assert isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    assert list(df.index) == list(range(len(df)))


def test_load_splits_raw_records_like_longbench_prompts():
    records = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    raw = {}
    for record in records:  # the first raw record of each subset
        if "dataset" in record:
            raw.setdefault(record["dataset"], record)
    # narrativeqa: LongBench's dataset2prompt, typo "asconcisely" included.
    narrativeqa = (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}"
        "\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    )
    row = load_longbench("narrativeqa", data_dir=FIXTURE).iloc[0]
    assert row["context"] + row["question"] + row["answer_prefix"] == narrativeqa.format(**raw["narrativeqa"])
    assert row["question"] == "Question: Who carries the lantern up the cliff?\n\n"
    assert row["answer_prefix"] == "Answer:"
    assert row["answer"] == ["Mara", "Mara, the fisherman's daughter"]
    assert row["length"] == 24
    # trec: the "Type:" cue at the end of `input` becomes the answer prefix.
    row = load_longbench("trec", data_dir=FIXTURE).iloc[0]
    trec = "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    assert row["context"] + row["question"] + row["answer_prefix"] == trec.format(**raw["trec"])
    assert row["question"] == "What city hosts the Rijksmuseum ?\n"
    assert row["answer_prefix"] == "Type:"
    assert "City" in row["all_classes"]
    # lcc: the whole prompt is context, then LongBench's answer cue.
    row = load_longbench("lcc", data_dir=FIXTURE).iloc[0]
    assert row["context"] == "Please complete the code given below. \n" + raw["lcc"]["context"]
    assert (row["question"], row["answer_prefix"]) == ("", "Next line of code:\n")
    # passage_retrieval_en: the abstract goes to the question.
    row = load_longbench("passage_retrieval_en", data_dir=FIXTURE).iloc[0]
    assert row["context"].endswith("The following is an abstract.\n\n")
    assert row["question"].startswith(raw["passage_retrieval_en"]["input"] + "\n\nPlease enter the number")
    assert row["answer_prefix"] == "The answer is: "


def test_load_keeps_split_records():
    # hotpotqa records are already split (kvpress hub layout): kept as they are, `answers` renamed `answer`, the
    # budget reset from the hub's 32 + 20 to LongBench's 32.
    df = load_longbench("hotpotqa", data_dir=FIXTURE)
    assert df["question"].iloc[1] == "Question: Where was the composer of Glass Tide born?\n"
    assert df["answer_prefix"].iloc[1] == "Answer:"
    assert df["answer"].iloc[1] == ["Bergen", "Bergen, Norway"]
    assert df["context"].iloc[0].startswith("Answer the question based on the given passages.")
    assert (df["max_new_tokens"] == 32).all()


def test_load_folder_and_parquet(tmp_path):
    records = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    trec = [r for r in records if r.get("dataset") == "trec"]
    (tmp_path / "trec").mkdir()
    pd.DataFrame(trec).to_parquet(tmp_path / "trec" / "test-00000.parquet")
    from_folder = load_longbench("trec", data_dir=tmp_path)
    from_jsonl = load_longbench("trec", data_dir=FIXTURE)
    pd.testing.assert_frame_equal(from_folder, from_jsonl)
    with pytest.raises(ValueError, match="No LongBench records"):
        load_longbench("gov_report", data_dir=tmp_path / "trec")
    with pytest.raises(FileNotFoundError):
        load_longbench("trec", data_dir=tmp_path / "missing")


def test_fraction_sampling_is_deterministic():
    full = load_longbench("trec", data_dir=FIXTURE)
    assert len(full) == 2
    first = load_longbench("trec", data_dir=FIXTURE, fraction=0.5, seed=7)
    again = load_longbench("trec", data_dir=FIXTURE, fraction=0.5, seed=7)
    pd.testing.assert_frame_equal(first, again)
    assert len(first) == 1
    # kvpress's sampling: df.sample(frac=fraction, random_state=seed), original index kept.
    pd.testing.assert_frame_equal(first, full.sample(frac=0.5, random_state=7))
    row = first.index[0]
    assert first.loc[row, "question"] == full.loc[row, "question"]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            load_longbench("trec", data_dir=FIXTURE, fraction=bad)


def test_unknown_and_unsupported_subsets():
    with pytest.raises(ValueError, match="Unknown LongBench subset 'nope'") as error:
        load_longbench("nope", data_dir=FIXTURE)
    for known in ("narrativeqa", "gov_report", "trec", "passage_count", "lcc", "repobench-p"):
        assert known in str(error.value)
    with pytest.raises(ValueError, match="jieba"):
        load_longbench("dureader", data_dir=FIXTURE)
    with pytest.raises(ValueError, match="Unknown LongBench subset"):
        longbench_scores(pd.DataFrame({"task": ["nope"], "predicted_answer": ["x"], "answer": [["x"]]}))


def test_split_prompt_few_shot_without_cue():
    # A few-shot input without the trailing cue keeps the prompt intact: no answer prefix is invented.
    context, question, prefix = split_prompt("triviaqa", "C", "Question: Q?")
    assert (question, prefix) == ("Question: Q?", "")
    assert context.endswith("C\n\n")


def test_hub_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def fail(*args, **kwargs):
        raise AssertionError("load_dataset must not be called offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(LongBenchUnavailableError, match="data_dir") as error:
        load_longbench("hotpotqa")
    assert "offline" in str(error.value) and "Xnhyacinth/LongBench" in str(error.value)


def test_hub_unreachable_error(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(LongBenchUnavailableError, match="pass a local data_dir|Pass a local data_dir") as error:
        load_longbench("hotpotqa")
    assert isinstance(error.value.__cause__, ConnectionError)


def test_hub_records_are_normalised(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    row = {
        "context": "Article body.\n\n",
        "question": "Question: What is it?\n\n",
        "answer_prefix": "Answer:",
        "answers": ["final answer", "backup answer"],
        "task": "qasper",
        "max_new_tokens": 148,
        "all_classes": None,
        "length": 5,
    }
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([row])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    df = load_longbench("qasper")
    assert calls == [(("Xnhyacinth/LongBench", "qasper"), {"split": "test"})]
    assert df["answer"].iloc[0] == ["final answer", "backup answer"]
    assert df["max_new_tokens"].iloc[0] == 128
    assert df["question"].iloc[0] == "Question: What is it?\n\n"
    assert df["all_classes"].iloc[0] is None


def test_module_has_no_print():
    source = Path(longbench.__file__).read_text(encoding="utf-8")
    assert "print(" not in source


def test_gold_answers_score_100_on_the_fixture():
    df = pd.concat([load_longbench(subset, data_dir=FIXTURE) for subset in FIXTURE_SUBSETS], ignore_index=True)
    df["predicted_answer"] = [answer[0] for answer in df["answer"]]
    assert longbench_scores(df) == {subset: {"score": 100.0} for subset in FIXTURE_SUBSETS}
