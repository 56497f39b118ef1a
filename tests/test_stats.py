"""Intervals of the results tables, and the command-line list parser."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.cli import comma_list
from evaluation.stats import bootstrap_interval, paired_difference, task_mean


def test_task_mean_weights_tasks_equally():
    assert task_mean([100, 0, 0, 0], ["a", "b", "b", "b"]) == 50.0
    assert task_mean([100, 0, 0, 0]) == 25.0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_samples():
    rng = np.random.default_rng(1)
    small = 100.0 * (rng.random(40) < 0.5)
    large = 100.0 * (rng.random(4000) < 0.5)
    low, high = bootstrap_interval(small)
    assert low <= small.mean() <= high and high - low > 20  # 40 samples: a 3-point difference is noise
    low_l, high_l = bootstrap_interval(large)
    assert high_l - low_l < (high - low) / 5
    assert bootstrap_interval([100.0] * 10) == (100.0, 100.0)
    assert bootstrap_interval(small) == bootstrap_interval(small)  # seeded: tables do not change between runs


def test_paired_difference_removes_the_shared_variation():
    rng = np.random.default_rng(2)
    full = 100.0 * (rng.random(60) < 0.5)
    same = full.copy()
    assert paired_difference(same, full) == (0.0, 0.0, 0.0)
    worse = full.copy()
    worse[np.flatnonzero(full)[:3]] = 0.0  # three samples lost
    delta, low, high = paired_difference(worse, full)
    assert delta == pytest.approx(-5.0) and low <= delta <= high <= 0.0
    unpaired = bootstrap_interval(worse)
    assert high - low < unpaired[1] - unpaired[0]
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(full[:10], full)


def test_comma_list():
    assert comma_list("0.25, 0.5,", float) == [0.25, 0.5]
    assert comma_list("knorm,,snapkv") == ["knorm", "snapkv"]
    assert comma_list(4096, int) == [4096] and comma_list(None) == []
    with pytest.raises(ValueError, match="'x' in 'x,1' is not a valid int"):
        comma_list("x,1", int)
