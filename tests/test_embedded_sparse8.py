"""The sparse-routing variant of the embedded model (``sparse8``: 8 of 64 routed experts per token).

Fast: its recipe differs from the default only in ``top_k``, and its shipped artifact and manifest agree with that
recipe (top_k 8, named after its hash, tensor hashes present); the harness names (``embedded-sparse8``) resolve to its
artifact and name runs after it. Slow: the model assembled from the artifact has the manifest's sha256 for every
tensor, and its config routes 8 experts per token.
"""

from __future__ import annotations

import dataclasses

import pytest

from evaluation.embedded_model import artifact as art
from evaluation.embedded_model.build import ARTIFACT, ARTIFACTS, RECIPE, RECIPES, default_model_dir, variant_artifact
from evaluation.models import EMBEDDED, embedded_artifact, is_embedded, model_tag

VARIANT = "sparse8"
MAX_ARTIFACT_BYTES = 8 * 2**20


def test_sparse8_recipe_is_the_default_with_8_routed_experts_per_token():
    recipe = RECIPES[VARIANT]
    assert recipe.top_k == 8 and recipe.num_experts == 64
    assert dataclasses.replace(recipe, top_k=RECIPE.top_k) == RECIPE
    assert RECIPES["default"] is RECIPE and ARTIFACTS["default"] == ARTIFACT


def test_sparse8_artifact_and_manifest_agree_with_its_recipe():
    name = variant_artifact(VARIANT)
    assert name != ARTIFACT
    path = art.artifact_path(name)
    assert path.stat().st_size < MAX_ARTIFACT_BYTES
    digest = art.file_sha256(path)
    manifest = art.read_manifest(name)
    assert name.endswith(digest[:10]) and manifest["artifact_sha256"] == digest and manifest["artifact"] == name
    assert manifest["recipe"] == RECIPES[VARIANT].__dict__ and manifest["recipe"]["top_k"] == 8
    assert manifest["recipe_fingerprint"] == RECIPES[VARIANT].fingerprint() != RECIPE.fingerprint()
    assert "--recipe sparse8" in manifest["fit"]["command"]
    tensors = manifest["tensors"]
    assert len(tensors) == len(art.read_manifest(ARTIFACT)["tensors"])  # the same model layout as the default
    assert all(len(h) == 64 for h in tensors.values())
    assert manifest["model_sha256"] == art.combined_sha256(tensors) != art.read_manifest(ARTIFACT)["model_sha256"]
    layers, recipe, seed = art.read_artifact(name)
    assert recipe == RECIPES[VARIANT] and seed == manifest["seed"] == 0
    assert len(layers) == manifest["num_layers"] == 30
    assert all(layer.gate_weight.shape[0] == recipe.num_experts for layer in layers)


def test_harness_names_resolve_to_each_variants_artifact_and_never_share_a_run_folder():
    assert embedded_artifact(EMBEDDED) == ARTIFACT
    assert embedded_artifact(f"{EMBEDDED}-{VARIANT}") == ARTIFACTS[VARIANT]
    assert embedded_artifact(f"{EMBEDDED}-default") == ARTIFACT
    assert is_embedded(f"{EMBEDDED}-{VARIANT}") and not is_embedded("Qwen/Qwen3-30B-A3B")
    assert embedded_artifact("embedded-models/local") is None  # a path is not a variant
    assert model_tag(f"{EMBEDDED}-{VARIANT}") == f"{EMBEDDED}-{default_model_dir(ARTIFACTS[VARIANT]).name}"
    assert model_tag(f"{EMBEDDED}-{VARIANT}") != model_tag(EMBEDDED) == f"{EMBEDDED}-{ARTIFACT}"
    with pytest.raises(ValueError, match="sparse8"):
        embedded_artifact(f"{EMBEDDED}-sparse4")


@pytest.mark.slow
def test_sparse8_artifact_assembles_to_its_hashes():
    """Every tensor of the model assembled from the sparse8 artifact has the manifest's sha256 (the build's check)."""
    from evaluation.embedded_model.build import assemble

    name = variant_artifact(VARIANT)
    model, _, manifest = assemble(name, verify=False)
    assert art.state_dict_sha256(model) == manifest["tensors"]
    assert model.config.num_experts_per_tok == 8 and model.config.routed_scaling_factor == 8.0
    assert model.config.n_routed_experts == 64
