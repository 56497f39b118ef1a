"""The shipped artifact assembles the embedded model bit for bit: every tensor's sha256 equals its manifest's.

The fast test assembles every MoE tensor (shared block, experts, gate of all 30 layers) from the GGUF, dequantized
here directly, with 1 and 2 torch threads; the slow one assembles the whole model as every build does.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from evaluation.embedded_model.artifact import (
    artifact_path,
    combined_sha256,
    file_sha256,
    read_artifact,
    read_manifest,
    state_dict_sha256,
    tensor_sha256,
)
from evaluation.embedded_model.build import ARTIFACT, RECIPE

MAX_ARTIFACT_BYTES = 8 * 2**20


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_shipped_artifact_is_small_named_after_its_hash_and_of_the_default_recipe():
    path = artifact_path(ARTIFACT)
    manifest = read_manifest(ARTIFACT)
    assert path.stat().st_size < MAX_ARTIFACT_BYTES
    digest = file_sha256(path)
    assert ARTIFACT.endswith(digest[:10]) and manifest["artifact_sha256"] == digest
    assert manifest["artifact"] == ARTIFACT and manifest["recipe"] == RECIPE.__dict__ and manifest["seed"] == 0
    assert manifest["model_sha256"] == combined_sha256(manifest["tensors"])
    layers, recipe, _ = read_artifact(ARTIFACT)
    assert recipe == RECIPE and len(layers) == manifest["num_layers"] == 30


def test_moe_tensors_assembled_from_the_gguf_equal_the_manifest_with_1_and_2_threads():
    """Every MoE tensor (shared block, experts, gate of all 30 layers), assembled from the GGUF dequantized here
    directly (not through transformers' loader), has the manifest's sha256 with 1 and with 2 torch threads."""
    from evaluation.embedded_model.moefy import glm4moe_state_dict
    from evaluation.smollm2 import dequantized_ffn

    layers, _, _ = read_artifact(ARTIFACT)
    expected = read_manifest(ARTIFACT)["tensors"]
    ffn = dequantized_ffn()
    moe_names = {name for name in expected if ".mlp." in name}
    assert len(moe_names) == 7 * len(layers)  # shared gate/up/down, experts gate_up/down, gate weight/bias
    for threads in (1, 2):
        with torch_threads(threads):
            state = glm4moe_state_dict(ffn, layers)
            got = {name: tensor_sha256(tensor) for name, tensor in state.items()}
        assert got == {name: expected[name] for name in moe_names}, f"{threads} threads"


@pytest.mark.slow
def test_shipped_artifact_assembles_to_its_hashes_with_1_and_2_threads():
    """Every tensor of the assembled model (embeddings, attention, norms, MoE) has the manifest's sha256."""
    from evaluation.embedded_model.build import assemble

    expected = read_manifest(ARTIFACT)["tensors"]
    for threads in (1, 2):
        with torch_threads(threads):
            model, _, _ = assemble(ARTIFACT, verify=False)
            assert state_dict_sha256(model) == expected, f"{threads} threads"
        del model
