"""Tokenizer plumbing for the offline data generators: the default SmolLM2 tokenizer, names and fingerprints.

Reading the SmolLM2 tokenizer from its GGUF file (:func:`evaluation.smollm2.load_tokenizer`) takes about 20 s on this
machine, because the whole GGUF file is parsed. The generators only count tokens and map text to token offsets, which
needs nothing but the Rust ``tokenizers`` backend. :func:`load_default_tokenizer` therefore stores that backend once,
as ``<cache_root>/tokenizers/SmolLM2-135M-Instruct/tokenizer.json``, after checking on a probe text that the stored copy
tokenizes exactly like the GGUF tokenizer; later calls load it in well under a second. The copy is keyed on the GGUF
file's size and modification time and rebuilt when those change. It is a bare ``PreTrainedTokenizerFast`` (no chat
template, no special-token settings): use :func:`evaluation.smollm2.load_tokenizer` for anything else than counting.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from evaluation.data.cache import cache_root, read_json, safe_name, write_json

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_NAME = "SmolLM2-135M-Instruct"
_PROBE_CHARS = 200_000
_default_tokenizer: Any = None  # the tokenizer loaded by load_default_tokenizer in this process


def _probe_text() -> str:
    """Text used to check that a stored tokenizer matches the original: essays plus a few awkward strings."""
    from evaluation.data.sources import paul_graham_text

    extras = "\n\n  Tabs\tand  double  spaces, ünïcödé, 中文, emoji 🙂, numbers 1234567 and a uuid 3f2b-11aa.\n"
    return paul_graham_text()[:_PROBE_CHARS] + extras


def _gguf_key() -> dict[str, Any]:
    from evaluation.smollm2 import gguf_path

    path = gguf_path()
    stat = path.stat()
    return {"gguf": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _wrap_backend(path: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)))
    tok.name_or_path = DEFAULT_TOKENIZER_NAME
    return tok


def load_default_tokenizer(use_cache: bool = True):
    """The SmolLM2-135M-Instruct tokenizer for token counting (see the module docstring for the cached fast path).

    With ``use_cache=False`` the GGUF tokenizer itself is returned (about 20 s). Loaded once per process.
    """
    global _default_tokenizer
    if _default_tokenizer is not None and use_cache:
        return _default_tokenizer

    from evaluation.smollm2 import load_tokenizer

    cache_dir = cache_root() / "tokenizers" / DEFAULT_TOKENIZER_NAME
    backend_path, meta_path = cache_dir / "tokenizer.json", cache_dir / "meta.json"
    key = _gguf_key()
    if use_cache and backend_path.exists() and read_json(meta_path) == {**key, "verified": True}:
        _default_tokenizer = _wrap_backend(backend_path)
        logger.debug("default tokenizer loaded from %s", backend_path)
        return _default_tokenizer

    logger.info("loading the SmolLM2 tokenizer from its GGUF file (about 20 s, once)")
    original = load_tokenizer()
    original.name_or_path = DEFAULT_TOKENIZER_NAME
    if not use_cache:
        return original
    cache_dir.mkdir(parents=True, exist_ok=True)
    original.backend_tokenizer.save(str(backend_path))
    copy = _wrap_backend(backend_path)
    probe = _probe_text()
    if copy.tokenize(probe) == original.tokenize(probe) and copy.encode(
        probe, add_special_tokens=False
    ) == original.encode(probe, add_special_tokens=False):
        write_json(meta_path, {**key, "verified": True})
        _default_tokenizer = copy
    else:  # keep using the slow path rather than a copy that tokenizes differently
        logger.warning("stored tokenizer backend differs from the GGUF tokenizer; not using the fast path")
        backend_path.unlink(missing_ok=True)
        _default_tokenizer = original
    return _default_tokenizer


def resolve_tokenizer(tokenizer: Any = None):
    """``tokenizer`` itself, a tokenizer loaded from a local path when given a string, or the default for ``None``."""
    if tokenizer is None:
        return load_default_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def tokenizer_name(tokenizer: Any = None) -> str:
    """Cache-directory name of ``tokenizer``: ``SmolLM2-135M-Instruct`` for the default, else the last component of
    its ``name_or_path`` (or of the path string), made filesystem-safe."""
    if tokenizer is None:
        return DEFAULT_TOKENIZER_NAME
    if isinstance(tokenizer, (str, Path)):
        return safe_name(Path(str(tokenizer)).name)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return safe_name(Path(str(name)).name)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying what ``tokenizer`` does: of its serialized backend for fast tokenizers, else of its
    vocabulary. Two tokenizers with the same fingerprint produce the same tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = repr(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class TokenCounter:
    """Adapter with the interface RULER's generators expect from their tokenizer (``text_to_tokens`` and
    ``tokens_to_text``), backed by a Hugging Face tokenizer (same calls as RULER's own ``HFTokenizer``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text_to_tokens(self, text: str) -> list[str]:
        """Tokens of ``text``, without special tokens."""
        return self.tokenizer.tokenize(text)

    def tokens_to_text(self, tokens: list[str]) -> str:
        """Inverse of :meth:`text_to_tokens`."""
        return self.tokenizer.convert_tokens_to_string(tokens)
