"""The embedded model's shipped artifact: what the fit decided, in a few MB, and the hashes of what it assembles to.

An artifact is two files in ``artifacts/`` next to this module, named after the first 10 hex digits of the sha256 of
the tensor file:

* ``smollm2-moe-<hash>.safetensors``: per layer ``layers.<i>.shared_idx`` (int16 [S]) and ``layers.<i>.expert_idx``
  (int16 [E, m]), indices into the dense FFN's intermediate neurons; ``layers.<i>.gate_weight`` (float32 [E, H]) and
  ``layers.<i>.gate_bias`` (float32 [E]), the router as the ``Glm4Moe`` gate stores it (already scaled); and
  ``router_logit_scale`` (float64 [L]). The safetensors metadata holds the recipe and the seed.
* ``smollm2-moe-<hash>.json``, the manifest: recipe, seed, fit command and machine, per-layer fit metrics, the
  artifact's sha256, and the sha256 of every tensor of the assembled model's state dict (:func:`tensor_sha256`), which
  every build checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evaluation.embedded_model.moefy import Glm4MoeLayer, MoEficationRecipe

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
PREFIX = "smollm2-moe-"
FORMAT = "pikv-embedded-moe"
FORMAT_VERSION = 1
FIT_COMMAND = "python -m evaluation.embedded_model.fit"


def artifact_path(name: str) -> Path:
    return ARTIFACT_DIR / f"{name}.safetensors"


def manifest_path(name: str) -> Path:
    return ARTIFACT_DIR / f"{name}.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (row-major)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> dict[str, str]:
    """``{name: sha256}`` of every tensor of ``model.state_dict()`` (tied weights under each name), sorted by name."""
    state = model.state_dict()
    return {name: tensor_sha256(state[name]) for name in sorted(state)}


def combined_sha256(hashes: Mapping[str, str]) -> str:
    """One hash over ``{name: sha256}`` (names sorted): the model's fingerprint."""
    return hashlib.sha256(json.dumps(dict(sorted(hashes.items()))).encode()).hexdigest()


def write_artifact(layers: Sequence[Glm4MoeLayer], recipe: MoEficationRecipe, seed: int, directory: Path) -> str:
    """Write the tensor file of ``layers`` into ``directory``, named after its hash; returns the name (no suffix)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        if max(int(layer.expert_idx.max()), int(layer.shared_idx.max())) > torch.iinfo(torch.int16).max:
            raise ValueError(f"layer {i}: neuron indices do not fit int16 (FFNs over 32767 neurons need int32)")
        tensors[f"layers.{i}.shared_idx"] = layer.shared_idx.to(torch.int16).contiguous()
        tensors[f"layers.{i}.expert_idx"] = layer.expert_idx.to(torch.int16).contiguous()
        tensors[f"layers.{i}.gate_weight"] = layer.gate_weight.float().contiguous()
        tensors[f"layers.{i}.gate_bias"] = layer.gate_bias.float().contiguous()
    tensors["router_logit_scale"] = torch.tensor([layer.router_logit_scale for layer in layers], dtype=torch.float64)
    # one metadata key: the header's bytes (hence the file's hash) must not depend on a map's iteration order
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": recipe.__dict__, "seed": seed}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "artifact.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"pikv": json.dumps(info, sort_keys=True)})
    tmp.chmod(0o644)
    name = PREFIX + file_sha256(tmp)[:10]
    tmp.replace(directory / f"{name}.safetensors")
    return name


def read_manifest(name: str, directory: Path = ARTIFACT_DIR) -> dict:
    path = directory / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no manifest {path} for the embedded-model artifact {name!r}: the artifacts this checkout ships are "
            f"{shipped_artifacts(directory)}; regenerate one with `{FIT_COMMAND}`"
        )
    return json.loads(path.read_text())


def shipped_artifacts(directory: Path = ARTIFACT_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob(f"{PREFIX}*.safetensors"))


def read_artifact(name: str, directory: Path = ARTIFACT_DIR) -> tuple[list[Glm4MoeLayer], MoEficationRecipe, int]:
    """``(layers, recipe, seed)`` of the artifact ``name``, after checking the file against its name and manifest."""
    from safetensors import safe_open

    path = directory / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"embedded-model artifact {path} missing (shipped: {shipped_artifacts(directory)}); it is committed with "
            f"the repository, so restore it from git, or regenerate one with `{FIT_COMMAND}`"
        )
    digest = file_sha256(path)
    manifest = read_manifest(name, directory)
    if not name.endswith(digest[:10]) or manifest["artifact_sha256"] != digest:
        raise ValueError(
            f"{path} is corrupt or was edited: its sha256 {digest[:10]}... matches neither its name nor its manifest "
            f"(a Git LFS pointer? restore it with `git checkout -- {path}`, or regenerate with `{FIT_COMMAND}`)"
        )
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["pikv"])
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format {info.get('format')} v{info.get('format_version')}, this code reads "
                f"{FORMAT} v{FORMAT_VERSION}"
            )
        scales = f.get_tensor("router_logit_scale").tolist()
        layers = [
            Glm4MoeLayer(
                f.get_tensor(f"layers.{i}.shared_idx"),
                f.get_tensor(f"layers.{i}.expert_idx"),
                f.get_tensor(f"layers.{i}.gate_weight"),
                f.get_tensor(f"layers.{i}.gate_bias"),
                scale,
            )
            for i, scale in enumerate(scales)
        ]
    return layers, MoEficationRecipe(**info["recipe"]), int(info["seed"])


def hash_mismatches(expected: Mapping[str, str], got: Mapping[str, str]) -> list[str]:
    """Names whose hash differs, is missing or is extra (empty: bit-identical)."""
    return sorted(name for name in set(expected) | set(got) if expected.get(name) != got.get(name))
