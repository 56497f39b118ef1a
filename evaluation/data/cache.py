"""Cache locations and small file helpers shared by the offline data generators.

Everything generated here lives under one root, never in git:

* ``$PIKV_CACHE_DIR`` when that variable is set, else ``<repo>/.cache/pikv``;
* ``<root>/data/ruler/<tokenizer-name>/<length>/`` holds the RULER sets (see :mod:`evaluation.data.ruler`);
* ``<root>/nltk_data/`` holds the Punkt model NLTK's ``sent_tokenize`` reads (see :mod:`evaluation.data.punkt`);
* ``<root>/tokenizers/`` holds a fast-loading copy of the default tokenizer (see :mod:`evaluation.data.tokenization`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV_VAR = "PIKV_CACHE_DIR"


def cache_root() -> Path:
    """Root of the pikv cache: ``$PIKV_CACHE_DIR`` if set, else ``<repo>/.cache/pikv``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "pikv"


def data_root() -> Path:
    """Directory of the generated data sets: ``<cache_root>/data``."""
    return cache_root() / "data"


def safe_name(name: str) -> str:
    """``name`` reduced to a single, portable path component (letters, digits, ``.``, ``_``, ``-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or "unnamed"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` as JSON lines (UTF-8, non-ASCII kept as is), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read at most ``limit`` records (all when ``None``) from a JSON-lines file."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                records.append(json.loads(line))
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
