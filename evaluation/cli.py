"""Command-line helpers shared by the evaluation commands: comma-separated lists, threads, logging."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def comma_list(text: str | int | float | None, cast: Callable[[str], T] = str) -> list[T]:
    """``"0.25, 0.5,"`` -> ``[0.25, 0.5]`` with ``cast=float``: items stripped, empty items dropped.

    A value that ``cast`` rejects raises ``ValueError`` naming it.
    """
    items = [item.strip() for item in str("" if text is None else text).split(",")]
    values = []
    for item in items:
        if not item:
            continue
        try:
            values.append(cast(item))
        except ValueError as error:
            name = getattr(cast, "__name__", str(cast))
            raise ValueError(f"{item!r} in {text!r} is not a valid {name}: give a comma-separated list.") from error
    return values


def setup(threads: int | None = None, level: int = logging.INFO) -> None:
    """Logging as the commands print it (kvpress's warnings silenced) and torch's CPU threads (``None``: torch's
    default)."""
    import torch

    logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)


def print_report(path: Path, report: Callable[[Path], str], plot: Callable[[Path, Path], Path] | None = None,
                 png: Path | None = None) -> None:
    """Print ``report(path)`` of a results file and, with ``png``, write ``plot(path, png)`` and name it."""
    print(report(path))
    if png is not None and plot is not None:
        print(f"plot: {plot(path, png)}")
