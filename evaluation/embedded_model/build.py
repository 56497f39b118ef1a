"""Assemble (once) and load the embedded default model: SmolLM2-135M-Instruct MoEfied into a ``Glm4MoeForCausalLM``.

``python -m evaluation.embedded_model.build [--variant sparse8 | --artifact NAME] [--out DIR] [--force]``

The build is pure assembly, in seconds: the dense weights come from the SmolLM2 GGUF (dequantized once with
transformers' GGUF loader, elementwise numpy arithmetic, into ``<cache>/models/smollm2-135m-instruct-dense``), and the
shipped artifact (``artifacts/<ARTIFACT>.safetensors``, written by ``python -m evaluation.embedded_model.fit``, see
:mod:`evaluation.embedded_model.artifact`) says which FFN neurons form the shared block and each expert and holds the
router as the ``Glm4Moe`` gate stores it. Assembling indexes and copies tensors, nothing else, so it gives the same
bits on every CPU and thread count; every build checks the sha256 of every tensor against the artifact's manifest and
refuses a model that differs. The model is written with ``save_pretrained`` together with the tokenizer into
``<cache>/models/<ARTIFACT>`` (``<cache>`` is ``$PIKV_CACHE_DIR`` or ``<repo>/.cache/pikv``), so builds of different
artifacts never share a folder; later calls reuse it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.embedded_model.artifact import (
    ARTIFACT_DIR,
    FIT_COMMAND,
    file_sha256,
    hash_mismatches,
    read_artifact,
    read_manifest,
    state_dict_sha256,
)
from evaluation.embedded_model.moefy import MoEficationRecipe, assemble_glm4moe

logger = logging.getLogger(__name__)

RECIPE = MoEficationRecipe()
"""The recipe of the embedded default model (what ``python -m evaluation.embedded_model.fit`` fits)."""

ARTIFACT = "smollm2-moe-ed1da41ac4"
"""The shipped artifact the embedded default model is assembled from (``artifacts/<ARTIFACT>.safetensors``)."""

DEFAULT_VARIANT = "default"
RECIPES: dict[str, MoEficationRecipe] = {
    DEFAULT_VARIANT: RECIPE,
    # sparse routing, as real MoEs route (Mixtral 2 of 8, Qwen3-MoE 8 of 128): 8 of the 64 routed experts per token,
    # everything else as the default recipe (so it shares the default's calibration ids)
    "sparse8": MoEficationRecipe(top_k=8),
}
"""The embedded model's variants by name: their recipes (``python -m evaluation.embedded_model.fit --recipe NAME``)."""

ARTIFACTS: dict[str, str] = {DEFAULT_VARIANT: ARTIFACT, "sparse8": "smollm2-moe-d124916212"}
"""The shipped artifact of each variant (``load_model("embedded-<variant>")`` in :mod:`evaluation.models`)."""


def variant_artifact(variant: str) -> str:
    """The shipped artifact of the variant ``variant``; ``ValueError`` naming the variants for an unknown one."""
    if variant not in ARTIFACTS:
        raise ValueError(f"unknown embedded-model variant {variant!r}; choose one of {sorted(ARTIFACTS)}")
    return ARTIFACTS[variant]

DENSE_DIRNAME = "smollm2-135m-instruct-dense"
META_FILENAME = "embedded_model.json"


def start_command(threads: int) -> None:
    """What every command of this package does first: log to stderr, keep the hub offline, set torch's threads."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran ``module`` with ``argv`` (``sys.argv[1:]`` when ``None``), as reports quote it."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def write_report(out: Path, stem: str, report: dict, markdown: str) -> None:
    """Write ``<out>/<stem>.json`` (the figures) and ``<out>/<stem>.md`` (their table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """``$PIKV_CACHE_DIR`` if set, else ``<repo>/.cache/pikv``."""
    env = os.environ.get("PIKV_CACHE_DIR")
    return Path(env) if env else repo_root() / ".cache" / "pikv"


# ----------------------------------------------------------------------------------------------------------------------
# Dense model
# ----------------------------------------------------------------------------------------------------------------------


def load_dense(num_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct; cached as safetensors after the first GGUF load.

    ``num_layers`` keeps only the first layers (for quick builds and tests).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_root() / "models" / DENSE_DIRNAME
    if not (path / "config.json").exists():
        from evaluation.smollm2 import load_dense_model, load_tokenizer

        logger.info("dequantizing the SmolLM2 GGUF (once) into %s", path)
        model, tokenizer = load_dense_model(torch.float32), load_tokenizer()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (path / "config.json").exists():  # another process finished first: keep its copy (the same bits)
            shutil.rmtree(tmp)
        else:
            tmp.rename(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if num_layers is not None:
        slice_layers(model, num_layers)
    return model, tokenizer


def slice_layers(model, num_layers: int) -> None:
    """Keep the first ``num_layers`` decoder layers of a Llama-style model (in place)."""
    if not 1 <= num_layers <= len(model.model.layers):
        raise ValueError(f"num_layers must lie in [1, {len(model.model.layers)}]")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


# ----------------------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------------------


def default_model_dir(artifact: str = ARTIFACT) -> Path:
    """``<cache>/models/<artifact>``: the build folder is named after the artifact (hence after its hash)."""
    return cache_root() / "models" / artifact


def assemble(artifact: str = ARTIFACT, directory: Path = ARTIFACT_DIR, verify: bool = True):
    """``(Glm4MoeForCausalLM, tokenizer, manifest)`` assembled in memory from the dense weights and an artifact.

    ``verify`` checks the sha256 of every tensor against the manifest and raises ``RuntimeError`` on any difference.
    """
    layers, recipe, _ = read_artifact(artifact, directory)
    manifest = read_manifest(artifact, directory)
    dense, tokenizer = load_dense(num_layers=len(layers))
    model = assemble_glm4moe(dense.config, dense.state_dict(), layers, recipe)
    del dense
    if verify:
        check_hashes(model, manifest)
    return model, tokenizer, manifest


def check_hashes(model: torch.nn.Module, manifest: dict) -> None:
    """Raise ``RuntimeError`` (saying what to do) unless every tensor's sha256 equals the manifest's."""
    expected = manifest.get("tensors")
    if not expected:
        raise ValueError(f"the manifest of {manifest.get('artifact')} holds no tensor hashes: rerun `{FIT_COMMAND}`")
    bad = hash_mismatches(expected, state_dict_sha256(model))
    if not bad:
        return
    from evaluation.smollm2 import gguf_path

    base = manifest.get("base_model", {})
    gguf_note = (
        "the SmolLM2 GGUF file is the fitted one"
        if file_sha256(gguf_path()) == base.get("sha256")
        else f"the SmolLM2 GGUF file differs from the fitted one ({base.get('distribution')})"
    )
    raise RuntimeError(
        f"the model assembled from artifact {manifest.get('artifact')} differs from the one its manifest describes in "
        f"{len(bad)} of {len(expected)} tensors (first: {', '.join(bad[:3])}); {gguf_note}. Delete "
        f"{cache_root() / 'models' / DENSE_DIRNAME} to dequantize the GGUF again; if the difference remains, this "
        f"transformers or gguf version dequantizes differently from the fit's ({manifest.get('fit', {})}): install "
        f"the versions of `make setup`, or fit an artifact of your own with `{FIT_COMMAND}` (its figures are then not "
        "the README's)."
    )


def build(
    out: Path | None = None,
    artifact: str = ARTIFACT,
    force: bool = False,
    directory: Path = ARTIFACT_DIR,
) -> Path:
    """Assemble the embedded model of ``artifact`` into ``out`` (default :func:`default_model_dir`) unless already
    there; returns the folder."""
    out = Path(out) if out is not None else default_model_dir(artifact)
    if (out / META_FILENAME).exists() and not force:
        logger.info("embedded model already built in %s", out)
        return out
    start = time.perf_counter()
    model, tokenizer, manifest = assemble(artifact, directory)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {**manifest, "build_seconds": round(time.perf_counter() - start, 1), "verified": True}
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("assembled the embedded model %s in %.1f s into %s", artifact, meta["build_seconds"], out)
    return out


def load_embedded_model(
    path: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    build_if_missing: bool = True,
    dense_masked: bool = True,
    artifact: str = ARTIFACT,
):
    """``(Glm4MoeForCausalLM, tokenizer)`` of the embedded default model, assembling it on first use (seconds).

    ``artifact`` chooses another shipped artifact (a variant, see :data:`ARTIFACTS`); ``path`` defaults to its build
    folder, and a missing build is assembled from it.

    ``dense_masked`` runs its 64 small experts as two large matmuls (:mod:`pikv_press.moe.experts`; same outputs to
    rounding; a 2048-token prefill 1.5-1.6x faster than transformers' eager loop and 1.7x faster than its default
    ``grouped_mm`` on a 2-core AVX2 CPU, see ``python -m evaluation.experts_speed``); ``False`` keeps transformers'
    default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_dir(artifact)
    if not (path / META_FILENAME).exists():
        if not build_if_missing:
            raise FileNotFoundError(
                f"no embedded model in {path}: run `python -m evaluation.embedded_model.build --artifact {artifact}`"
            )
        build(path, artifact)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    # the gate was scaled down after fitting (see README): tell routing-aware code by how much, per layer
    from pikv_press.moe import set_router_logit_scale

    set_router_logit_scale(model, model.config.router_logit_scale)
    if dense_masked:
        from pikv_press.moe.experts import use_dense_masked_experts

        use_dense_masked_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=None, help="artifact name in artifacts/ (default: the shipped one)")
    parser.add_argument(
        "--variant", choices=sorted(ARTIFACTS), default=DEFAULT_VARIANT, help="build this variant's shipped artifact"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <cache>/models/<artifact>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a build")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    start_command(args.threads)
    print(build(args.out, args.artifact or variant_artifact(args.variant), force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
