"""String-match scores shared by the benchmarks (RULER's, on kvpress's 0-100 scale) and the tasks' average.

Case-insensitive; control characters are stripped from predictions. Each benchmark's metrics live in its folder
(:mod:`evaluation.benchmarks`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def _clean(prediction: str) -> str:
    return _CONTROL.sub("", str(prediction).strip()).strip().lower()


def sample_string_match(prediction: str, references: Sequence[str], match: str = "all") -> float:
    """One sample's score, 0-100: the share of ``references`` found in ``prediction`` (``match="all"``), or 100 if
    any is found (``match="any"``)."""
    found = [str(ref).lower() in _clean(prediction) for ref in references]
    if match == "any":
        return 100.0 * any(found)
    if match != "all":
        raise ValueError(f"match must be 'all' or 'any', got {match!r}.")
    return 100.0 * sum(found) / len(found)


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of the share of a sample's references found in its prediction, x100."""
    pairs = zip(predictions, references, strict=True)
    return round(sum(sample_string_match(p, r, "all") for p, r in pairs) / len(predictions), 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """Share of samples whose prediction contains at least one reference, x100."""
    pairs = zip(predictions, references, strict=True)
    return round(sum(sample_string_match(p, r, "any") for p, r in pairs) / len(predictions), 2)


def average_score(metrics: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's (first) score; the needle grid's ``all`` entry stands alone if present."""
    if "all" in metrics:
        return float(next(iter(metrics["all"].values())))
    values = [float(next(iter(task.values()))) for task in metrics.values()]
    return round(sum(values) / len(values), 2) if values else float("nan")
