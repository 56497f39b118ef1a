"""95% intervals for results tables: bootstrap over samples, paired against the full cache.

A benchmark's score is the mean over its tasks of each task's mean sample score (kvpress's average). The bootstrap
resamples samples within each task (stratified, so every draw keeps the task mix) and recomputes that score; a paired
interval resamples the same samples for both runs and recomputes the difference, which removes the variation that
comes from which samples were drawn (the part both runs share).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DRAWS = 2000
LEVEL = 0.95


def _strata(groups: Sequence | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.arange(n)]
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} samples.")
    return [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]


def task_mean(scores: Sequence[float], groups: Sequence | None = None) -> float:
    """Mean over tasks (``groups``) of the mean score of each task's samples."""
    scores = np.asarray(scores, dtype=float)
    return float(np.mean([scores[idx].mean() for idx in _strata(groups, len(scores))]))


def _draws(scores: np.ndarray, strata: list[np.ndarray], draws: int, seed: int) -> np.ndarray:
    """``(draws,)`` bootstrap replicates of the task-mean of ``scores`` (``(n,)`` or ``(runs, n)`` -> ``(runs,
    draws)``)."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for idx in strata:
        picks = idx[rng.integers(0, len(idx), size=(draws, len(idx)))]  # (draws, task samples)
        total = total + scores[..., picks].mean(axis=-1)
    return total / len(strata)


def bootstrap_interval(
    scores: Sequence[float], groups: Sequence | None = None, draws: int = DRAWS, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of :func:`task_mean` of ``scores``."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return float("nan"), float("nan")
    replicates = _draws(scores, _strata(groups, len(scores)), draws, seed)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(
    scores: Sequence[float], reference: Sequence[float], groups: Sequence | None = None, draws: int = DRAWS,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: :func:`task_mean` of ``scores`` minus that of ``reference`` (the same samples, in
    the same order) and its paired 95% bootstrap interval."""
    scores, reference = np.asarray(scores, dtype=float), np.asarray(reference, dtype=float)
    if scores.shape != reference.shape:
        raise ValueError(f"paired scores need the same samples: got {scores.shape} and {reference.shape}.")
    diff = scores - reference
    low, high = bootstrap_interval(diff, groups, draws, seed)
    return task_mean(diff, groups), low, high
