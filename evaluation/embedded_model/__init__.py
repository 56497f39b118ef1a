"""The embedded default model: SmolLM2-135M-Instruct turned into a genuine MoE (``Glm4MoeForCausalLM``) by MoEfication.

``load_embedded_model()`` returns ``(model, tokenizer)``, assembling the model on first use, in seconds, from the GGUF
weights and the shipped artifact ``artifacts/<ARTIFACT>`` (``python -m evaluation.embedded_model.build``); the fit
that writes an artifact is ``python -m evaluation.embedded_model.fit``, its recipe in
:mod:`evaluation.embedded_model.moefy`. See this folder's README.
"""

from evaluation.embedded_model.build import ARTIFACT, RECIPE, assemble, build, default_model_dir, load_embedded_model
from evaluation.embedded_model.moefy import LayerSplit, MoEficationRecipe

__all__ = [
    "ARTIFACT",
    "RECIPE",
    "LayerSplit",
    "MoEficationRecipe",
    "assemble",
    "build",
    "default_model_dir",
    "load_embedded_model",
]
