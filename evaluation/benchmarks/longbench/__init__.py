"""LongBench (Bai et al., 2023, https://arxiv.org/abs/2308.14508): loading in kvpress's record layout, official metrics.

Loading
-------
:func:`load_longbench` returns one subset as a DataFrame with the columns of kvpress's hub dataset
``Xnhyacinth/LongBench``: ``context``, ``question``, ``answer_prefix``, ``answer`` (list of str), ``task`` (the subset
name), ``max_new_tokens`` (LongBench's ``dataset2maxlen``), plus ``all_classes`` (list of str or ``None``; needed by
the classification subsets) and ``length`` where the source has it. The source is either a local jsonl/parquet file
or folder (``data_dir``), or the hub (online only). Two record layouts are accepted:

* already split records (``question`` present, as in ``Xnhyacinth/LongBench``): ``context``, ``question`` and
  ``answer_prefix`` are kept, ``answers`` is renamed ``answer``;
* raw THUDM/LongBench records (``input``, ``context``, ``answers``, ...): LongBench's prompt
  (``config/dataset2prompt.json``) is cut into three parts the way kvpress's ``create_huggingface_dataset.py`` does:
  ``context`` = the template up to and including ``{context}`` and the text before the question, ``question`` = the
  ``{input}`` part with its instruction (for the few-shot subsets trec / triviaqa / samsum / lsht the trailing answer
  cue of ``input`` is cut off), ``answer_prefix`` = the final answer cue. ``context + question + answer_prefix`` is
  exactly LongBench's prompt.

Metrics (LongBench ``metrics.py`` / ``eval.py``, re-implemented here)
----------------------------------------------------------------------
=====================================================================  ============================
subsets                                                                metric
=====================================================================  ============================
narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique,     :func:`qa_f1_score`
triviaqa
gov_report, qmsum, multi_news, samsum                                  :func:`rouge_score`
trec, lsht                                                             :func:`classification_score`
passage_retrieval_en                                                   :func:`retrieval_score`
passage_retrieval_zh                                                   :func:`retrieval_zh_score`
passage_count                                                          :func:`count_score`
lcc, repobench-p                                                       :func:`code_sim_score`
=====================================================================  ============================

A record scores the maximum of the metric over its reference answers; for trec, triviaqa, samsum and lsht only the
first line of the prediction (after leading newlines) is scored. A subset's score is ``round(100 * mean, 2)``.

Not supported: multifieldqa_zh (``qa_f1_zh_score``), dureader and vcsum (``rouge_zh_score``): LongBench tokenises them
with ``jieba``, which is not installed, and a character tokenisation would not be the official metric.

Deviations from the official code, all outside the normal path:

* ``rouge_score`` re-implements the ``rouge`` package (pltrdy, 1.0.1) ROUGE-L F: sentences split on ``"."``, union LCS
  over unique words, precision / recall over the *unique* words. The package rebuilds the LCS recursively and so raises
  ``RecursionError`` (scored 0.0 by LongBench's ``try``) when one prediction sentence and one reference sentence
  together have about 1,000 words or more; here the LCS is rebuilt iteratively and such pairs are scored.
* ``code_sim_score`` uses ``difflib.SequenceMatcher`` (what ``fuzzywuzzy.fuzz.ratio`` uses without
  ``python-Levenshtein``); with ``python-Levenshtein`` installed fuzzywuzzy's ratio may differ by a few points.
* ``retrieval_score`` / ``classification_score`` raise ``ValueError`` where the official code would fail with
  ``IndexError`` / ``TypeError`` (reference without a paragraph number, no ``all_classes``); a missing prediction
  (``None`` / NaN) is scored as the empty string; ``all_classes`` is read per record (LongBench takes the file's last
  record's, the same list for every record of a subset).

Differences from kvpress (which copies LongBench's metrics): ``max_new_tokens`` is LongBench's ``dataset2maxlen``,
not kvpress's ``+ 20``; the first-line rule strips leading newlines only (LongBench's ``lstrip('\\n')``; kvpress strips
all leading whitespace); the lcc question part is empty as in LongBench's prompt (kvpress puts ``input`` there, which is
empty in the data anyway); the scores come back as ``{"score": ...}`` per task.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

LONGBENCH_HUB_DATASET = "Xnhyacinth/LongBench"
"""kvpress's LongBench on the Hugging Face hub (one config per subset, split ``test``)."""

COLUMNS: tuple[str, ...] = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")
"""The record layout of kvpress's datasets; :func:`load_longbench` adds ``all_classes`` (and ``length`` if known)."""

DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
"""LongBench's generation budget per subset (``config/dataset2maxlen.json``)."""

UNSUPPORTED_SUBSETS: dict[str, str] = {
    "multifieldqa_zh": "qa_f1_zh_score needs jieba word segmentation (not installed)",
    "dureader": "rouge_zh_score needs jieba word segmentation (not installed)",
    "vcsum": "rouge_zh_score needs jieba word segmentation (not installed)",
}
"""LongBench subsets left out, with the reason."""

FIRST_LINE_SUBSETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Subsets whose predictions are cut to their first line before scoring (LongBench ``eval.py``)."""

# LongBench's dataset2prompt.json, each template cut into (context part, question part, answer prefix):
# context part + question part + answer prefix == the official template (for the few-shot subsets the official
# ``{input}`` ends with the answer cue, which moves from the question part to the answer prefix).
# The wording is LongBench's, typos included ("asconcisely" in narrativeqa), as in kvpress's hub dataset.
_PROMPTS: dict[str, tuple[str, str, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}"
        "\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\n",
        "Question: {input}\n\n",
        "Answer:",
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\n',
        "Question: {input}\n\n",
        "Answer:",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\n",
        "Question: {input}\n",
        "Answer:",
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words."
        "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only "
        "give me the answer and do not output any other words.\n\n",
        "Question: {input}\n",
        "Answer:",
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\n",
        "Now, write a one-page summary of the report.\n\n",
        "Summary:",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\n",
        "Query: {input}\n",
        "Answer:",
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n",
        "Now, write a one-page summary of all the news.\n\n",
        "Summary:",
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n",
        "{input}",
        "Type:",
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n",
        "{input}",
        "Answer:",
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n",
        "{input}",
        "Summary:",
    ),
    "lsht": ("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n", "{input}", "类别："),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n",
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should only "
        "contain the number, such as 1, 2, 3, and so on.\n\n",
        "The final answer is: ",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n",
        "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "
        '"Paragraph 1", "Paragraph 2", etc.\n\n',
        "The answer is: ",
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n",
        '{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n',
        "答案是：",
    ),
    # lcc's official prompt has no {input} (the field is empty in the data): the question part is empty.
    "lcc": ("Please complete the code given below. \n{context}", "", "Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}", "{input}", "Next line of code:\n"),
}
_PROMPTS["2wikimqa"] = _PROMPTS["musique"] = _PROMPTS["hotpotqa"]

_FEW_SHOT_CUE_IN_INPUT = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Subsets whose official prompt is ``...{input}`` with the answer cue at the end of ``input`` itself."""


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """LongBench's English normalisation: lowercase, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of two token multisets (0.0 when they share no token)."""
    num_same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after :func:`normalize_answer` (LongBench's single/multi-doc QA and triviaqa metric), in [0, 1]."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _rouge_sentences(text: str) -> list[str]:
    """The ``rouge`` package's preprocessing: split on ``"."``, drop empty pieces, collapse whitespace in each."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_tokens(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence of ``x`` and ``y``, chosen with the ``rouge`` package's tie-breaking.

    The table is the usual LCS dynamic programme; the walk back from ``(len(x), len(y))`` takes the diagonal on a
    match, else moves up (drops from ``x``) only when that cell is strictly larger, else left. Iterative, so long
    sentences do not hit Python's recursion limit.
    """
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    out.reverse()
    return out


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]`` (summaries).

    Re-implementation of the ``rouge`` package (pltrdy, 1.0.1, default ``exclusive=True``) that LongBench uses: both
    texts are split into sentences on ``"."`` (see :func:`_rouge_sentences`) and sentences into words on single
    spaces; the union LCS is the *set* of words in the LCS of any (reference sentence, prediction sentence) pair;
    ``r = |union| / |unique reference words|``, ``p = |union| / |unique prediction words|``,
    ``f = 2 p r / (p + r + 1e-8)``. A text without any sentence makes the package raise, which LongBench scores 0.0.
    """
    hyp = _rouge_sentences(prediction)
    ref = _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hyp_words = [sentence.split(" ") for sentence in hyp]
    ref_words = [sentence.split(" ") for sentence in ref]
    union: set[str] = set()
    for reference_sentence in ref_words:
        for hypothesis_sentence in hyp_words:
            union.update(_lcs_tokens(reference_sentence, hypothesis_sentence))
    recall = len(union) / len({w for s in ref_words for w in s})
    precision = len(union) / len({w for s in hyp_words for w in s})
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None, **kwargs: Any
) -> float:
    """LongBench's classification score (trec, lsht): ``1 / #matched classes`` if the right class is matched, else 0.

    The classes of ``all_classes`` found as substrings of the prediction are collected; a matched class that is a
    substring of the reference (but not the reference itself) is then dropped. As in the official loop, which removes
    items from the list it iterates over, the element right after a dropped one is not examined.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the list of class names of the subset)")
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):  # mimics `for term in matches: if ...: matches.remove(term)`
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers(prediction: str, target: str) -> float:
    """Fraction of the digit runs of ``prediction`` equal to ``target`` (0.0 when the prediction has none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_count: share of the numbers in the prediction that equal the reference count."""
    return _share_of_numbers(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"reference {ground_truth!r} holds no paragraph number ({pattern!r})")
    return _share_of_numbers(prediction, found[0])


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_retrieval_en: share of the numbers in the prediction equal to N of the reference ``Paragraph N``."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_retrieval_zh: share of the numbers in the prediction equal to N of the reference ``段落N``."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def fuzz_ratio(s1: str, s2: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` without ``python-Levenshtein``, i.e. difflib-based.

    100 if the strings are equal (even both empty), 0 if exactly one is empty, else
    ``int(round(100 * difflib.SequenceMatcher(None, s1, s2).ratio()))`` (Python's round: half to even).
    """
    if s1 == s2:
        return 100
    if not s1 or not s2:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, s1, s2).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """lcc / repobench-p: :func:`fuzz_ratio` / 100 between the reference line and the first code-like predicted line.

    The prediction is stripped of leading newlines and split into lines; the first line without a backtick, ``#`` or
    ``//`` is compared (the empty string if there is none). The similarity is difflib-based (``fuzzywuzzy``'s pure
    Python fallback), not ``python-Levenshtein``.
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


Metric = Callable[..., float]

LONGBENCH_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
"""Supported LongBench subset -> its official metric (a record score in [0, 1])."""

LONGBENCH_SUBSETS: tuple[str, ...] = tuple(LONGBENCH_METRICS)
"""The supported subsets, in LongBench's order."""


def _check_subset(subset: str) -> None:
    if subset in LONGBENCH_METRICS:
        return
    known = ", ".join(LONGBENCH_SUBSETS)
    if subset in UNSUPPORTED_SUBSETS:
        raise ValueError(f"LongBench subset {subset!r} is not supported: {UNSUPPORTED_SUBSETS[subset]}. Known: {known}")
    raise ValueError(f"Unknown LongBench subset {subset!r}. Known subsets: {known}")


def _as_list(value: Any) -> list[Any]:
    """A list from a list, tuple, numpy array or scalar (``None`` / NaN -> empty list)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def score_record(subset: str, prediction: Any, answers: Any, all_classes: Sequence[str] | None = None) -> float:
    """One record's LongBench score in [0, 1]: the metric's maximum over the reference answers.

    For trec, triviaqa, samsum and lsht the prediction is first cut to its first line (after leading newlines).
    """
    _check_subset(subset)
    text = _as_text(prediction)
    if subset in FIRST_LINE_SUBSETS:
        text = text.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[subset]
    classes = None if all_classes is None else [str(c) for c in _as_list(all_classes)]
    score = 0.0
    for reference in _as_list(answers):
        score = max(score, metric(text, str(reference), all_classes=classes))
    return score


def longbench_scores(df: pd.DataFrame, prediction_column: str = "predicted_answer") -> dict[str, dict[str, float]]:
    """Per task, ``{"score": round(100 * mean record score, 2)}`` (LongBench's ``eval.py`` scorer, kvpress's scale).

    ``df`` needs ``task``, the predictions (``predicted_answer``, kvpress's column) and the references (``answer``, or
    LongBench's ``answers``), both lists of str per record; ``all_classes`` is read per record when present.
    """
    answer_column = "answer" if "answer" in df.columns else "answers"
    for column in ("task", prediction_column, answer_column):
        if column not in df.columns:
            raise ValueError(f"longbench_scores needs a {column!r} column; got {list(df.columns)}")
    has_classes = "all_classes" in df.columns
    results: dict[str, dict[str, float]] = {}
    for task, group in df.groupby("task", sort=False):
        task = str(task)
        _check_subset(task)
        classes_column = group["all_classes"] if has_classes else [None] * len(group)
        rows = zip(group[prediction_column], group[answer_column], classes_column, strict=True)
        scores = [
            score_record(task, prediction, answers, None if _is_missing(classes) else classes)
            for prediction, answers, classes in rows
        ]
        results[task] = {"score": round(100 * sum(scores) / len(scores), 2)}
    return results


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


class LongBenchUnavailableError(RuntimeError):
    """LongBench could not be read from the Hugging Face hub (offline or unreachable): pass a local ``data_dir``."""


def split_prompt(subset: str, context: str, input_text: str) -> tuple[str, str, str]:
    """``(context, question, answer_prefix)`` for a raw LongBench record; their concatenation is LongBench's prompt."""
    _check_subset(subset)
    context_template, question_template, answer_prefix = _PROMPTS[subset]
    if subset in _FEW_SHOT_CUE_IN_INPUT:
        if input_text.endswith(answer_prefix):
            input_text = input_text[: -len(answer_prefix)]
        else:
            answer_prefix = ""
    return (
        context_template.replace("{context}", context),
        question_template.replace("{input}", input_text),
        answer_prefix,
    )


def _record_task(record: dict[str, Any]) -> str | None:
    for key in ("task", "dataset"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _normalise_record(subset: str, record: dict[str, Any]) -> dict[str, Any]:
    if not _is_missing(record.get("question")):
        context = _as_text(record.get("context"))
        question = _as_text(record.get("question"))
        prefix = record.get("answer_prefix")
        answer_prefix = _PROMPTS[subset][2] if _is_missing(prefix) else str(prefix)
    else:
        if "input" not in record and "context" not in record:
            raise ValueError(f"LongBench record has neither question nor input/context: keys {sorted(record)}")
        context, question, answer_prefix = split_prompt(
            subset, _as_text(record.get("context")), _as_text(record.get("input"))
        )
    answers = record.get("answer")
    if _is_missing(answers):
        answers = record.get("answers")
    classes = record.get("all_classes")
    out = {
        "context": context,
        "question": question,
        "answer_prefix": answer_prefix,
        "answer": [str(a) for a in _as_list(answers)],
        "task": subset,
        "max_new_tokens": DATASET2MAXLEN[subset],
        "all_classes": None if _is_missing(classes) else [str(c) for c in _as_list(classes)],
    }
    if not _is_missing(record.get("length")):
        out["length"] = int(record["length"])
    return out


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    raise ValueError(f"Unsupported LongBench file {path} (expected .jsonl, .json or .parquet)")


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)


def _local_files(subset: str, data_dir: Path) -> list[Path]:
    """Files for ``subset`` under ``data_dir``: the file itself, ``<subset>.<ext>``, ``<subset>/*``, else all files."""
    if data_dir.is_file():
        return [data_dir]
    if not data_dir.is_dir():
        raise FileNotFoundError(f"LongBench data_dir {data_dir} does not exist")
    for suffix in _DATA_SUFFIXES:
        if (data_dir / f"{subset}{suffix}").is_file():
            return [data_dir / f"{subset}{suffix}"]
    if (data_dir / subset).is_dir():
        files = [p for p in sorted((data_dir / subset).rglob("*")) if p.is_file() and p.suffix in _DATA_SUFFIXES]
        if files:
            return files
    files = _data_files(data_dir)
    if not files:
        raise FileNotFoundError(f"No .jsonl/.json/.parquet LongBench files in {data_dir}")
    return files


def _hub_offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(os.environ.get(k, "").upper() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        import datasets.config

        return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False


def _load_hub_records(subset: str) -> list[dict[str, Any]]:
    hint = (
        f"Pass a local data_dir (a .jsonl/.parquet file or folder with the {subset!r} records, e.g. a saved copy of "
        f"{LONGBENCH_HUB_DATASET} or THUDM/LongBench) to load_longbench."
    )
    if _hub_offline():
        raise LongBenchUnavailableError(
            f"Cannot load LongBench subset {subset!r} from the hub ({LONGBENCH_HUB_DATASET}): the Hugging Face hub is "
            f"offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). {hint}"
        )
    try:
        from datasets import load_dataset

        dataset = load_dataset(LONGBENCH_HUB_DATASET, subset, split="test")
    except Exception as error:  # network, missing config, authentication: all end up here
        raise LongBenchUnavailableError(
            f"Cannot load LongBench subset {subset!r} from the hub ({LONGBENCH_HUB_DATASET}): {error}. {hint}"
        ) from error
    return dataset.to_pandas().to_dict("records")


def load_longbench(
    subset: str, data_dir: str | Path | None = None, fraction: float = 1.0, seed: int = 42
) -> pd.DataFrame:
    """One LongBench subset in kvpress's record layout (see the module docstring).

    Args:
        subset: a supported subset (:data:`LONGBENCH_SUBSETS`); ``ValueError`` listing them otherwise.
        data_dir: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder holding ``<subset>.<ext>``, a
            ``<subset>/`` folder of such files, or such files directly. Records whose ``task`` / ``dataset`` field
            names another subset are skipped. ``None``: the hub dataset :data:`LONGBENCH_HUB_DATASET` (online only;
            :class:`LongBenchUnavailableError` offline or when the hub cannot be reached).
        fraction: share of the records to keep, sampled as kvpress does (``df.sample(frac=..., random_state=seed)``);
            ``1.0`` keeps all, in source order.
        seed: the sampling seed.

    Returns:
        Columns ``context``, ``question``, ``answer_prefix``, ``answer``, ``task``, ``max_new_tokens``,
        ``all_classes`` and, where every record has one, ``length``; the index numbers the records of the whole
        subset in source order (kept after sampling).
    """
    _check_subset(subset)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if data_dir is None:
        records = _load_hub_records(subset)
        source = LONGBENCH_HUB_DATASET
    else:
        path = Path(data_dir)
        records = [r for f in _local_files(subset, path) for r in _read_file(f)]
        source = str(path)
    rows = [_normalise_record(subset, r) for r in records if _record_task(r) in (None, subset)]
    if not rows:
        raise ValueError(f"No LongBench records for subset {subset!r} in {source}")
    columns = [*COLUMNS, "all_classes"]
    if all("length" in row for row in rows):
        columns.append("length")
    df = pd.DataFrame(rows, columns=columns)
    if fraction < 1.0:
        df = df.sample(frac=fraction, random_state=seed)
    return df


# -- the harness's interface (evaluation.registry) ------------------------------------------------------------------
def load_samples(data_dir: str | None, *, tokenizer: Any = None, **_: Any) -> pd.DataFrame:
    """``data_dir`` is ``subset[:local file or folder]`` (the harness's ``--data_dir``)."""
    subset, _, local = str(data_dir).partition(":")
    return load_longbench(subset, data_dir=local or None)


def sample_scores(df: pd.DataFrame) -> pd.Series:
    """Each record's score (0-100): the subset's metric, maximum over the references."""
    has_classes = "all_classes" in df.columns
    scores = []
    for _, row in df.iterrows():
        classes = row["all_classes"] if has_classes and not _is_missing(row["all_classes"]) else None
        scores.append(100 * score_record(str(row["task"]), row["predicted_answer"], row["answer"], classes))
    return pd.Series(scores, index=df.index, dtype=float)


calculate_metrics = longbench_scores


def match_mode(task: str) -> str:
    """Teacher-forced scoring: the references of a record are alternatives."""
    return "any"
