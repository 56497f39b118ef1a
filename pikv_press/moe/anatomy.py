"""``MoEAnatomy``: where a model's layers, attention modules and routers are, and which layers are MoE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from pikv_press.moe.families import FamilySpec, family_for_config
from pikv_press.moe.routing import Routing, route

# Attribute names of the MoE block in transformers 4.x, tried when the 5.x name is absent.
_LEGACY_MOE_ATTRS = ("block_sparse_moe", "mlp")


def language_model_of(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (decoder layers) and ``rotary_emb`` of a causal LM or its base model."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    if not hasattr(base, "layers"):
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__}: expected `model.model.layers` or "
            "`model.model.language_model.layers`. Pass a Hugging Face causal LM (e.g. AutoModelForCausalLM)."
        )
    return base


@dataclass
class MoEAnatomy:
    """The anatomy of one loaded model, as pikv-press needs it.

    Build it with :func:`get_anatomy`. Dense models are accepted: ``has_router`` is False and ``moe_layers`` empty.
    """

    family: FamilySpec
    model: nn.Module
    config: PretrainedConfig
    language_model: nn.Module
    _moe_blocks: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    # -- layers ----------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, layer_idx: int) -> nn.Module:
        """The attention module of decoder layer ``layer_idx``."""
        return self.layers[layer_idx].self_attn

    @cached_property
    def sliding_layers(self) -> tuple[int, ...]:
        """Layers with sliding-window attention: their cache is already bounded and presses leave them alone."""
        layer_types = getattr(self.config, "layer_types", None) or ()
        return tuple(idx for idx, kind in enumerate(layer_types) if kind == "sliding_attention")

    @cached_property
    def compressible_layers(self) -> tuple[int, ...]:
        """Layers whose KV cache presses compress (all but sliding-window layers)."""
        return tuple(i for i in range(self.num_layers) if i not in self.sliding_layers)

    # -- experts ---------------------------------------------------------------------------------------------------
    @property
    def has_router(self) -> bool:
        return self.family.is_moe and bool(self._moe_blocks)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers with an MoE block (the others are dense)."""
        return tuple(sorted(self._moe_blocks))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self._moe_blocks)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return int(getattr(self.config, self.family.num_experts_key)) if self.family.is_moe else 0

    @property
    def top_k(self) -> int:
        """Routed experts selected per token (0 for a dense model)."""
        return int(getattr(self.config, self.family.top_k_key)) if self.family.is_moe else 0

    @property
    def shared_expert_size(self) -> int:
        """FFN neurons of the always-on shared expert(s) per MoE layer (0 when none)."""
        return self.family.shared_expert_size(self.config) if self.family.is_moe else 0

    @property
    def scoring(self):
        """How router probabilities are formed (a :class:`RouterScoring`), ``None`` for a dense model."""
        return self.family.scoring

    def router_logit_scale(self, layer_idx: int) -> float:
        """Factor by which layer ``layer_idx``'s stored router logits were scaled (1.0 for models as trained).

        Models whose gate was rescaled after fitting declare it with :func:`set_router_logit_scale` when they are
        loaded (the embedded MoEfied SmolLM2 does: its logits are ~1e-3 so that every selected expert weighs ~1).
        Dividing the router's logits by it restores their fitted scale; the ranking, hence the routing, is unchanged.
        """
        scales = getattr(self.language_model, ROUTER_LOGIT_SCALE_ATTR, None)
        return 1.0 if scales is None else float(scales[layer_idx])

    def moe_block(self, layer_idx: int) -> nn.Module | None:
        return self._moe_blocks.get(layer_idx)

    def router(self, layer_idx: int) -> nn.Module | None:
        block = self.moe_block(layer_idx)
        return None if block is None else getattr(block, self.family.router_attr)

    @torch.no_grad()
    def route(self, layer_idx: int, hidden_states: torch.Tensor) -> Routing:
        """Apply layer ``layer_idx``'s router to ``hidden_states`` (..., hidden) exactly as its MoE block does."""
        block = self.moe_block(layer_idx)
        if block is None:
            raise ValueError(
                f"Layer {layer_idx} of this {self.family.name} model is dense (MoE layers: {list(self.moe_layers)})."
            )
        return route(self.family, block, self.router(layer_idx), hidden_states, self.top_k, self.config)

    def describe(self) -> str:
        """One-line summary, for logs and the quickstart."""
        if not self.has_router:
            return f"{self.family.name}: dense, {self.num_layers} layers, no router"
        return (
            f"{self.family.name}: {self.num_layers} layers ({len(self.moe_layers)} MoE), {self.num_experts} experts, "
            f"top-{self.top_k}, shared expert neurons {self.shared_expert_size}, router {self.scoring.value}, "
            f"sliding-window layers {list(self.sliding_layers)}"
        )


def _find_moe_block(layer: nn.Module, spec: FamilySpec) -> nn.Module | None:
    for attr in (spec.moe_attr, *_LEGACY_MOE_ATTRS):
        block = getattr(layer, attr, None)
        if block is not None and getattr(block, spec.router_attr, None) is not None:
            return block
    return None


ROUTER_LOGIT_SCALE_ATTR = "pikv_router_logit_scale"


def set_router_logit_scale(model: nn.Module, scales: Sequence[float] | None) -> None:
    """Declare that ``model``'s stored router logits of decoder layer ``i`` are the fitted ones times ``scales[i]``
    (one factor per decoder layer; ``None`` forgets it). Read back by :meth:`MoEAnatomy.router_logit_scale`.

    A hook for models whose gate was rescaled after fitting (the embedded model's loader calls it); a model as trained
    needs nothing.
    """
    language_model = language_model_of(model)
    if scales is not None:
        scales = tuple(float(x) for x in scales)
        if len(scales) != len(language_model.layers):
            raise ValueError(f"router_logit_scale needs one factor per decoder layer: got {len(scales)} for "
                             f"{len(language_model.layers)} layers.")
        if any(not x > 0 for x in scales):
            raise ValueError(f"router_logit_scale factors must be positive, got {scales}.")
    object.__setattr__(language_model, ROUTER_LOGIT_SCALE_ATTR, scales)


def get_anatomy(model: nn.Module) -> MoEAnatomy:
    """The :class:`MoEAnatomy` of a Hugging Face model (cheap: walks the decoder layers once).

    Raises ``ValueError`` naming the supported families for anything else.
    """
    if not isinstance(model, (PreTrainedModel, nn.Module)) or not hasattr(model, "config"):
        raise TypeError(f"Expected a Hugging Face PreTrainedModel, got {type(model).__name__}.")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = family_for_config(config)
    language_model = language_model_of(model)
    anatomy = MoEAnatomy(family=spec, model=model, config=config, language_model=language_model)
    if spec.is_moe:
        for idx, layer in enumerate(language_model.layers):
            block = _find_moe_block(layer, spec)
            expected = spec.is_moe_layer(config, idx)
            if (block is not None) != expected:
                raise ValueError(
                    f"{spec.name} layer {idx}: the config says it is {'MoE' if expected else 'dense'} but the module "
                    f"{'has' if block is not None else 'has no'} router `{spec.router_attr}`. This transformers "
                    "version lays the model out differently from what pikv-press knows; please report it."
                )
            if block is not None:
                anatomy._moe_blocks[idx] = block
    return anatomy
