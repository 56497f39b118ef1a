"""RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654): samples and metrics.

Samples come from the offline generator (:func:`evaluation.data.load_ruler`, any length, SmolLM2's tokenizer by
default) or from kvpress's hub copy ``simonjegou/ruler`` (``data_source="hub"``, online only). Metrics, on kvpress's
scale (0-100 per task): ``qa`` tasks count a prediction right when it contains any reference answer (string match,
part); the other tasks give the share of the reference answers the prediction contains (string match, all).
Teacher-forced scoring (:func:`pikv_press.answer.teacher_forced_score`) follows the same split: the references of
``qa`` tasks are alternatives (``match="any"``), the others are values listed in RULER's order (``match="all"``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from evaluation.metrics import sample_string_match

HUB_DATASET = "simonjegou/ruler"


def load_samples(
    data_dir: str | None,
    *,
    tokenizer: Any = None,
    tasks: list[str] | None = None,
    samples_per_task: int | None = None,
    data_source: str = "offline",
    **_: Any,
) -> pd.DataFrame:
    """RULER at ``data_dir`` tokens (default 4096). ``tokenizer=None``: SmolLM2's (the embedded model's)."""
    length = int(data_dir or 4096)
    if data_source == "hub":
        import datasets

        return datasets.load_dataset(HUB_DATASET, data_dir=str(length), split="test").to_pandas()
    if data_source != "offline":
        raise ValueError(f"RULER data_source is 'offline' or 'hub', got {data_source!r}.")
    from evaluation.data import load_ruler

    return load_ruler(length, tasks=tasks, n_per_task=samples_per_task, tokenizer=tokenizer)


def match_mode(task: str) -> str:
    """``"any"`` for the qa tasks (alternatives), ``"all"`` for the others (every value, in order)."""
    return "any" if str(task).split("_")[0] == "qa" else "all"


def sample_scores(df: pd.DataFrame) -> pd.Series:
    """Each sample's string-match score (0-100) of ``predicted_answer`` against ``answer``."""
    scores = [sample_string_match(pred, refs, match_mode(task))
              for pred, refs, task in zip(df["predicted_answer"], df["answer"], df["task"], strict=True)]
    return pd.Series(scores, index=df.index, dtype=float)


def calculate_metrics(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per-task RULER scores ``{task: {"string_match": score}}`` from ``predicted_answer`` and ``answer``."""
    scores = sample_scores(df)
    return {str(task): {"string_match": round(float(scores[group.index].mean()), 2)}
            for task, group in df.groupby("task")}
