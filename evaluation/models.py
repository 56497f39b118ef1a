"""Loading the model a harness command names: ``embedded`` (the embedded MoE, built on first use), a variant of it
(``embedded-sparse8``), a random-weight MoE with a real model's layer shapes (``random-qwen3-30b-a3b-4l``: for speed
and memory only), or a path / hub id."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = "embedded"
RANDOM = "random"
# Layer shapes of real MoE models (their configs on the hub), for random-weight speed and memory measurements where the
# weights cannot be downloaded; the vocabulary is the tiny test tokenizer's, the number of layers is chosen.
RANDOM_SHAPES = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6,
                                        max_position_embeddings=40960, rms_norm_eps=1e-6)),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                                     rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5)),
}


def embedded_artifact(name: str) -> str | None:
    """The shipped artifact of the embedded model ``name`` names: ``embedded`` (the default variant) or
    ``embedded-<variant>`` (a variant of :data:`evaluation.embedded_model.build.ARTIFACTS`, e.g.
    ``embedded-sparse8``); ``None`` for any other name (a path or hub id). ``ValueError`` for an unknown variant."""
    if name != EMBEDDED and (not name.startswith(f"{EMBEDDED}-") or "/" in name):
        return None
    from evaluation.embedded_model.build import DEFAULT_VARIANT, variant_artifact

    return variant_artifact(DEFAULT_VARIANT if name == EMBEDDED else name.removeprefix(f"{EMBEDDED}-"))


def is_embedded(name: str) -> bool:
    """Whether ``name`` names the embedded model or one of its variants (see :func:`embedded_artifact`)."""
    return embedded_artifact(name) is not None


def model_tag(name: str) -> str:
    """The model's part of a run folder's name: ``embedded-<build folder>`` for the embedded model and its variants
    (the folder is named after the shipped artifact's hash), so that a run of another artifact (another variant, or a
    refit) is never taken for a finished run of the current one; otherwise the name with ``/`` replaced by ``--``
    (kvpress's layout)."""
    artifact = embedded_artifact(name)
    if artifact is not None:
        from evaluation.embedded_model.build import default_model_dir

        return f"{EMBEDDED}-{default_model_dir(artifact).name}"
    return name.replace("/", "--")


def random_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer, label)`` for ``random-<shape>-<layers>l`` (``<shape>`` a key of :data:`RANDOM_SHAPES`):
    the shape's attention and MoE layers with random weights (normal, std 0.02, routers included, so that tokens
    spread over the experts roughly evenly), built directly on ``device`` (default the CPU) in ``dtype`` (default
    bfloat16), and the tiny test tokenizer. Its outputs are meaningless: it is for timing and memory only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pikv_press.testing import build_tokenizer

    rest = name.removeprefix(f"{RANDOM}-")
    shape, _, layers = rest.rpartition("-")
    if shape not in RANDOM_SHAPES or not layers.endswith("l") or not layers[:-1].isdigit() or int(layers[:-1]) < 1:
        raise ValueError(f"random model {name!r}: use random-<shape>-<layers>l with <shape> one of "
                         f"{sorted(RANDOM_SHAPES)}, e.g. random-qwen3-30b-a3b-4l.")
    family, fields = RANDOM_SHAPES[shape]
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(family, num_hidden_layers=int(layers[:-1]), vocab_size=len(tokenizer),
                                  tie_word_embeddings=False, **fields)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "gate" in param_name and "proj" not in param_name:  # routers (zeros in some inits)
                param.normal_(0.0, 0.02)
    return model.eval(), tokenizer, name


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer, label)`` in eval mode.

    ``embedded``: the embedded MoE in ``dtype`` (default float32) on ``device`` (default the CPU);
    ``embedded-<variant>`` (e.g. ``embedded-sparse8``, 8 of 64 routed experts per token) the same for a variant's
    artifact, assembled into its own build folder on first use. ``random-<shape>-<layers>l``: :func:`random_model`.
    A path or hub id:
    ``from_pretrained`` with ``dtype`` (default the checkpoint's own, ``"auto"``) and, without ``device``,
    ``device_map="auto"`` (spread over the accelerators there are); with ``device``, moved there. ``label`` names the
    model in tables and plots.
    """
    if name.startswith(f"{RANDOM}-") and not Path(name).exists():
        return random_model(name, device, dtype)
    artifact = embedded_artifact(name)
    if artifact is not None:
        from evaluation.embedded_model.build import load_embedded_model

        model, tokenizer = load_embedded_model(None, dtype=dtype or torch.float32, artifact=artifact)
        return model.to(device or "cpu").eval(), tokenizer, f"embedded ({artifact})"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or "auto"}
    if device is None:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if device is not None:
        model = model.to(device)
    label = Path(name).name if Path(name).exists() else name
    return model.eval(), AutoTokenizer.from_pretrained(name), label
