"""Scores of the evaluation harness, on kvpress's scale (0-100 per task).

* RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654): ``qa`` tasks count a prediction right when it
  contains any reference answer (string match, part); the other tasks give the share of reference answers the
  prediction contains (string match, all). Case-insensitive; control characters are stripped from predictions.
* Needle in a haystack: the share of samples whose prediction contains the answer.
* LongBench: :mod:`evaluation.benchmarks.longbench`.
"""

from __future__ import annotations

import re

import pandas as pd

_CONTROL = re.compile(r"[\x00-\x1f]")


def _clean(prediction: str) -> str:
    return _CONTROL.sub("", str(prediction).strip()).strip().lower()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of the share of a sample's references found in its prediction, x100."""
    pairs = zip(predictions, references, strict=True)
    per_sample = [sum(ref.lower() in _clean(pred) for ref in refs) / len(refs) for pred, refs in pairs]
    return round(100 * sum(per_sample) / len(per_sample), 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """Share of samples whose prediction contains at least one reference, x100."""
    pairs = zip(predictions, references, strict=True)
    hits = [any(ref.lower() in _clean(pred) for ref in refs) for pred, refs in pairs]
    return round(100 * sum(hits) / len(hits), 2)


def ruler_scores(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per-task RULER scores ``{task: {"string_match": score}}`` from ``predicted_answer`` and ``answer`` columns."""
    scores = {}
    for task, group in df.groupby("task"):
        metric = string_match_part if str(task).split("_")[0] == "qa" else string_match_all
        scores[str(task)] = {"string_match": metric(group["predicted_answer"].tolist(), list(group["answer"]))}
    return scores


def needle_scores(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Needle retrieval per (context length, depth) and overall, as ``{key: {"string_match": score}}``."""
    scores = {"all": {"string_match": string_match_part(df["predicted_answer"].tolist(), list(df["answer"]))}}
    if "context_length" in df and "depth" in df:
        for (length, depth), group in df.groupby(["context_length", "depth"]):
            key = f"length{int(length)}_depth{float(depth):g}"
            scores[key] = {"string_match": string_match_part(group["predicted_answer"].tolist(), list(group["answer"]))}
    return scores


def average_score(metrics: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's (single) score; the needle grid's ``all`` entry stands alone if present."""
    if "all" in metrics:
        return float(next(iter(metrics["all"].values())))
    values = [float(next(iter(task.values()))) for task in metrics.values()]
    return round(sum(values) / len(values), 2) if values else float("nan")
