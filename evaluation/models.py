"""Loading the model a harness command names: ``embedded`` (the embedded MoE, built on first use) or a path / hub id."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = "embedded"


def model_tag(name: str) -> str:
    """The model's part of a run folder's name: ``embedded-<build folder>`` for the embedded model (the folder is
    named after the shipped artifact's hash), so that a run of another artifact is never taken for a finished run of
    the current one; otherwise the name with ``/`` replaced by ``--`` (kvpress's layout)."""
    if name == EMBEDDED:
        from evaluation.embedded_model.build import default_model_dir

        return f"{EMBEDDED}-{default_model_dir().name}"
    return name.replace("/", "--")


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer, label)`` in eval mode.

    ``embedded``: the embedded MoE in ``dtype`` (default float32) on ``device`` (default the CPU). A path or hub id:
    ``from_pretrained`` with ``dtype`` (default the checkpoint's own, ``"auto"``) and, without ``device``,
    ``device_map="auto"`` (spread over the accelerators there are); with ``device``, moved there. ``label`` names the
    model in tables and plots.
    """
    if name == EMBEDDED:
        from evaluation.embedded_model.build import default_model_dir, load_embedded_model

        model, tokenizer = load_embedded_model(None, dtype=dtype or torch.float32)
        return model.to(device or "cpu").eval(), tokenizer, f"embedded ({default_model_dir().name})"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or "auto"}
    if device is None:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if device is not None:
        model = model.to(device)
    label = Path(name).name if Path(name).exists() else name
    return model.eval(), AutoTokenizer.from_pretrained(name), label
