"""Needle in a haystack (Kamradt, 2023): a sentence hidden at several depths of Paul Graham essays.

Samples: :func:`evaluation.data.build_niah` (offline). Metric: the share of samples whose prediction contains the
answer, overall (``all``) and per (context length, depth).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from evaluation.metrics import sample_string_match

DEFAULT_LENGTH = 4096


def load_samples(
    data_dir: str | None, *, tokenizer: Any = None, needle_depth: str | None = None, **_: Any
) -> pd.DataFrame:
    """``data_dir``: comma-separated context lengths; ``needle_depth``: comma-separated depths in percent."""
    from evaluation.cli import comma_list
    from evaluation.data import build_niah

    lengths = comma_list(data_dir or DEFAULT_LENGTH, int)
    if needle_depth:
        return build_niah(lengths, comma_list(needle_depth, float), tokenizer)
    return build_niah(lengths, tokenizer=tokenizer)


def match_mode(task: str) -> str:
    return "all"


def sample_scores(df: pd.DataFrame) -> pd.Series:
    scores = [sample_string_match(pred, refs, "any") for pred, refs in zip(df["predicted_answer"], df["answer"],
                                                                              strict=True)]
    return pd.Series(scores, index=df.index, dtype=float)


def calculate_metrics(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{"all": ..., "length<L>_depth<D>": ...}``, each ``{"string_match": score}``."""
    scores = sample_scores(df)
    metrics = {"all": {"string_match": round(float(scores.mean()), 2)}}
    if "context_length" in df and "depth" in df:
        for (length, depth), group in df.groupby(["context_length", "depth"]):
            metrics[f"length{int(length)}_depth{float(depth):g}"] = {
                "string_match": round(float(scores[group.index].mean()), 2)}
    return metrics
