"""Loading the model a harness command names: ``embedded`` (the embedded MoE, built on first use), a variant of it
(``embedded-sparse8``), or a path / hub id."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = "embedded"


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


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer, label)`` in eval mode.

    ``embedded``: the embedded MoE in ``dtype`` (default float32) on ``device`` (default the CPU);
    ``embedded-<variant>`` (e.g. ``embedded-sparse8``, 8 of 64 routed experts per token) the same for a variant's
    artifact, assembled into its own build folder on first use. A path or hub id:
    ``from_pretrained`` with ``dtype`` (default the checkpoint's own, ``"auto"``) and, without ``device``,
    ``device_map="auto"`` (spread over the accelerators there are); with ``device``, moved there. ``label`` names the
    model in tables and plots.
    """
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
