"""Offline long-context data: RULER through NVIDIA's generators, the needle-in-a-haystack grid, Punkt without network.

Fast tests generate two samples of the quick RULER tasks (vt, cwe, fwe, qa_1) at 1k tokens with the real SmolLM2
tokenizer into a temporary cache. The eight niah tasks cost 15-20 s each to set up (RULER's niah script sorts six
million word pairs on import), so their fast checks read ``tests/fixtures/ruler_niah_1024.jsonl`` (two samples each at
1k tokens, seed 42, SmolLM2 tokenizer) and a slow test regenerates them and compares. To rewrite the fixture after an
intended change: ``PIKV_UPDATE_FIXTURES=1 .venv/bin/python -m pytest -q -m slow tests/test_data.py``.

The SmolLM2 tokenizer is loaded once per module: from its GGUF file on the very first run (about 20 s), then from the
verified copy in the pikv cache (about a second).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from evaluation.data import niah, ruler
from evaluation.data.niah import build_niah
from evaluation.data.ruler import COLUMNS, RulerGenerationError, load_ruler, split_ruler_input
from evaluation.data.tokenization import load_default_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "ruler_niah_1024.jsonl"
LENGTH = 1024
FAST_TASKS = ["vt", "cwe", "fwe", "qa_1"]
NIAH_TASKS = [t for t in ruler.RULER_TASKS if t.startswith("niah")]
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # RULER's constants, as in kvpress


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def ruler_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ruler-cache")


@pytest.fixture(scope="module")
def fast_ruler(smol_tokenizer, ruler_cache) -> pd.DataFrame:
    return load_ruler(LENGTH, tasks=FAST_TASKS, n_per_task=2, tokenizer=smol_tokenizer, cache_dir=ruler_cache)


@pytest.fixture(scope="module")
def niah_fixture() -> pd.DataFrame:
    with open(FIXTURE, encoding="utf-8") as f:
        return pd.DataFrame.from_records([json.loads(line) for line in f], columns=list(COLUMNS))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def check_layout(df: pd.DataFrame, tasks: list[str], n: int) -> None:
    assert list(df.columns) == list(COLUMNS)
    assert list(df.index) == list(range(len(tasks) * n))
    assert df["task"].tolist() == [t for t in tasks for _ in range(n)]
    for row in df.itertuples():
        for column in ("context", "question", "answer_prefix"):
            assert isinstance(getattr(row, column), str) and getattr(row, column)
        assert isinstance(row.answer, list) and row.answer and all(isinstance(a, str) and a for a in row.answer)
        assert row.max_new_tokens == MAX_NEW_TOKENS[row.task.split("_")[0]]
        # kvpress's split: the question follows the haystack, the answer prefix follows the question
        context, question, answer_prefix = split_ruler_input(row.context + row.question + row.answer_prefix, row.task)
        assert (context, question, answer_prefix) == (row.context, row.question, row.answer_prefix)


def check_lengths(df: pd.DataFrame, tokenizer, length: int) -> None:
    for row in df.itertuples():
        prompt = n_tokens(tokenizer, row.context + row.question + row.answer_prefix)
        assert prompt <= length, (row.task, prompt)
        if row.task != "fwe":  # RULER's fwe generator bounds the input alone, without the generation budget
            assert prompt + row.max_new_tokens <= length, (row.task, prompt)
        assert prompt >= 0.5 * length, (row.task, prompt)


# --- RULER, generated -----------------------------------------------------------------------------------------------


def test_ruler_layout(fast_ruler):
    check_layout(fast_ruler, FAST_TASKS, 2)
    assert fast_ruler["question"].str.startswith("Question: ").sum() == 6  # vt, cwe, fwe
    assert (fast_ruler["answer_prefix"].str.startswith("Answer:")).all()


def test_ruler_lengths_fit(fast_ruler, smol_tokenizer):
    check_lengths(fast_ruler, smol_tokenizer, LENGTH)


def test_ruler_answers(fast_ruler):
    for row in fast_ruler.itertuples():
        if row.task == "vt":  # the variables of the chain are assigned in the context
            assert all(re.search(rf"VAR {v} = ", row.context) for v in row.answer)
        elif row.task == "cwe":  # the ten common words, numbered in the list
            assert len(row.answer) == 10 and all(f". {w} " in row.context for w in row.answer)
        elif row.task == "fwe":
            assert len(row.answer) == 3 and all(row.context.count(w) > 10 for w in row.answer)
        elif row.task == "qa_1":
            assert any(a in row.context for a in row.answer)


def test_ruler_cache_is_read_back(fast_ruler, smol_tokenizer, ruler_cache, monkeypatch):
    directory = ruler_cache / "SmolLM2-135M-Instruct" / str(LENGTH)
    assert sorted(p.name for p in directory.glob("*.jsonl")) == sorted(f"{t}.jsonl" for t in FAST_TASKS)
    meta = json.loads((directory / "vt.meta.json").read_text())
    assert (meta["seed"], meta["num_samples"], meta["length"], meta["notes"]) == (42, 2, LENGTH, [])
    # RULER's qa.py cannot fit its 10-document step in 1k tokens: the deviation is recorded
    qa_meta = json.loads((directory / "qa_1.meta.json").read_text())
    assert qa_meta["notes"] == ["qa document step 1 instead of RULER's 10"]

    def fail(*args, **kwargs):
        raise AssertionError("cached data should have been read, not regenerated")

    monkeypatch.setattr(ruler, "generate_ruler_task", fail)
    again = load_ruler(LENGTH, tasks=FAST_TASKS, n_per_task=2, tokenizer=smol_tokenizer, cache_dir=ruler_cache)
    pd.testing.assert_frame_equal(again, fast_ruler)
    # without a tokenizer, the default's cache directory is read and no tokenizer is needed
    monkeypatch.setattr(ruler, "resolve_tokenizer", fail)
    first = load_ruler(LENGTH, tasks=["vt", "cwe"], n_per_task=1, cache_dir=ruler_cache)
    expected = fast_ruler[fast_ruler.index.isin([0, 2])].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, expected)


def test_ruler_deterministic(fast_ruler, smol_tokenizer, tmp_path):
    tasks = ["vt", "cwe", "fwe"]
    again = load_ruler(LENGTH, tasks=tasks, n_per_task=2, tokenizer=smol_tokenizer, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, fast_ruler[fast_ruler["task"].isin(tasks)].reset_index(drop=True))
    other_seed = load_ruler(LENGTH, tasks=["vt"], n_per_task=2, tokenizer=smol_tokenizer, cache_dir=tmp_path, seed=7)
    assert other_seed["answer"].tolist() != again["answer"][:2].tolist()


def test_ruler_unfittable_task_raises_instead_of_hanging(smol_tokenizer, tmp_path):
    # HotpotQA questions come with 10 documents (~1500 tokens): RULER's qa.py would retry forever at 1k tokens
    with pytest.raises(RulerGenerationError):
        load_ruler(LENGTH, tasks=["qa_2"], n_per_task=1, tokenizer=smol_tokenizer, cache_dir=tmp_path)
    skipped = load_ruler(
        LENGTH, tasks=["qa_2"], n_per_task=1, tokenizer=smol_tokenizer, cache_dir=tmp_path, skip_infeasible=True
    )
    assert skipped.empty and list(skipped.columns) == list(COLUMNS)


def test_generators_leave_process_state_alone(fast_ruler, smol_tokenizer):
    import random
    import sys

    import numpy as np

    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    path, argv = list(sys.path), list(sys.argv)
    modules = {name: sys.modules.get(name) for name in ("tokenizer", "constants")}
    ruler.generate_ruler_task("vt", LENGTH, 1, smol_tokenizer)
    assert (random.random(), np.random.random()) == expected
    assert sys.path == path and sys.argv == argv
    assert {name: sys.modules.get(name) for name in modules} == modules


# --- RULER niah tasks, from the committed fixture -------------------------------------------------------------------


def test_niah_fixture_layout(niah_fixture):
    check_layout(niah_fixture, NIAH_TASKS, 2)


def test_niah_fixture_answers_in_context(niah_fixture):
    for row in niah_fixture.itertuples():
        expected = 4 if row.task in ("niah_multivalue", "niah_multiquery") else 1
        assert len(row.answer) == expected
        for answer in row.answer:
            assert answer in row.context, (row.task, answer)
            assert f"is: {answer}." in row.context  # inside a needle sentence
        assert row.answer_prefix.startswith("The special magic")


def test_niah_fixture_lengths_fit(niah_fixture, smol_tokenizer):
    check_lengths(niah_fixture, smol_tokenizer, LENGTH)


@pytest.mark.slow
def test_niah_fixture_is_reproducible(tmp_path):
    generated = load_ruler(LENGTH, tasks=NIAH_TASKS, n_per_task=2, cache_dir=tmp_path)
    if os.environ.get("PIKV_UPDATE_FIXTURES") == "1":
        with open(FIXTURE, "w", encoding="utf-8") as f:
            for record in generated.to_dict(orient="records"):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(FIXTURE, encoding="utf-8") as f:
        fixture = pd.DataFrame.from_records([json.loads(line) for line in f], columns=list(COLUMNS))
    pd.testing.assert_frame_equal(generated, fixture)


# --- Needle in a haystack -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def niah_grid(smol_tokenizer) -> pd.DataFrame:
    return build_niah([1024, 4096], [0, 25, 50, 75, 100], smol_tokenizer)


def test_build_niah_layout(niah_grid):
    assert list(niah_grid.columns) == list(niah.COLUMNS)
    assert list(niah_grid.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert niah_grid[["context_length", "depth"]].values.tolist() == [
        [length, depth] for length in (1024, 4096) for depth in (0, 25, 50, 75, 100)
    ]
    assert (niah_grid["task"] == "niah").all()
    for row in niah_grid.itertuples():
        assert row.context.count(row.needle) == 1
        assert all(a in row.context for a in row.answer)
        assert row.question.rstrip().endswith(niah.DEFAULT_QUESTION)


def test_build_niah_lengths_fit(niah_grid, smol_tokenizer):
    for row in niah_grid.itertuples():
        total = n_tokens(smol_tokenizer, row.context + row.question + row.answer_prefix) + row.max_new_tokens
        assert 0.97 * row.context_length <= total <= row.context_length


def test_build_niah_needle_at_depth(niah_grid, smol_tokenizer):
    for row in niah_grid.itertuples():
        encoding = smol_tokenizer(row.context, add_special_tokens=False, return_offsets_mapping=True)
        start = row.context.index(row.needle)
        position = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > start)
        relative = position / len(encoding["input_ids"])
        # the needle goes to the nearest sentence start: within a sentence or two of the requested depth
        tolerance = 0.08 if row.context_length <= 1024 else 0.03
        assert abs(relative - row.depth / 100) <= tolerance, (row.context_length, row.depth, relative)


def test_build_niah_deterministic(niah_grid, smol_tokenizer):
    pd.testing.assert_frame_equal(build_niah([1024, 4096], [0, 25, 50, 75, 100], smol_tokenizer), niah_grid)
    other = build_niah([1024], [50], smol_tokenizer, seed=1)
    assert other["context"][0] != niah_grid["context"][2]


def test_build_niah_custom_needle(smol_tokenizer):
    df = build_niah([2048], [30], smol_tokenizer, needle="The secret code is 4711.", question="What is the code?")
    row = df.iloc[0]
    assert row["answer"] == ["The secret code is 4711."] and "The secret code is 4711." in row["context"]
    assert "What is the code?" in row["question"]


# --- Punkt, offline -------------------------------------------------------------------------------------------------


def test_punkt_tab_installed_offline(tmp_path, monkeypatch):
    import nltk
    import punkt as punkt_package
    from nltk.tokenize import sent_tokenize

    from evaluation.data.punkt import ensure_punkt
    from evaluation.data.sources import paul_graham_text

    monkeypatch.setattr(nltk.data, "path", [])  # nothing but the directory written here
    root = ensure_punkt(tmp_path / "nltk_data")
    files = sorted(p.name for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir())
    assert files == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    text = " ".join(paul_graham_text()[:20000].split())
    sentences = sent_tokenize(text)
    assert len(sentences) > 50 and "".join(sentences).replace(" ", "") == text.replace(" ", "")
    assert sentences == punkt_package.sent_tokenize(text)
    assert sent_tokenize("Dr. Smith went to Washington D.C. yesterday. He was tired.") == [
        "Dr. Smith went to Washington D.C. yesterday.",
        "He was tired.",
    ]
    before = {p.name: p.read_bytes() for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir()}
    ensure_punkt(tmp_path / "nltk_data")  # idempotent
    assert before == {p.name: p.read_bytes() for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir()}
