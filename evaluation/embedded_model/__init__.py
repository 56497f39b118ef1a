"""The embedded default model: SmolLM2-135M-Instruct turned into a genuine MoE (``Glm4MoeForCausalLM``) by MoEfication.

``load_embedded_model()`` returns ``(model, tokenizer)``, building the model into the cache folder on first use
(``python -m evaluation.embedded_model.build``); the recipe lives in :mod:`evaluation.embedded_model.moefy`.
"""

from evaluation.embedded_model.build import RECIPE, build, default_model_dir, load_embedded_model
from evaluation.embedded_model.moefy import LayerSplit, MoEficationRecipe

__all__ = ["RECIPE", "LayerSplit", "MoEficationRecipe", "build", "default_model_dir", "load_embedded_model"]
