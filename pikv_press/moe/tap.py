"""``RouterTap``: record the routing of every MoE layer during prefill and decoding, with bounded memory.

Two things are recorded per MoE layer and per token:

* **actual** routing: the layer's router applied to the MoE block's input, exactly as the block routes it;
* **predicted** routing: the same router applied to the *attention input* of the layer (the hidden states a press
  sees in its attention hook, before the layer's router has run). A routing-aware press needs this: at the time it
  compresses layer ``i``'s cache, layer ``i``'s router has not yet seen the tokens.

Records keep the most recent ``max_tokens`` tokens of each layer (older ones are dropped), on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pikv_press.moe.anatomy import MoEAnatomy, get_anatomy
from pikv_press.moe.routing import Routing, TopKRouting


@dataclass
class RoutingRecord(TopKRouting):
    """Routing of the recorded tokens of one layer, oldest first.

    ``probs`` (tokens, num_experts) float32 (``None`` when the tap does not keep probabilities), ``topk_ids``
    (tokens, top_k) int64, ``topk_weights`` (tokens, top_k) float32. Tokens of a batch are laid out batch-major per
    forward pass.
    """

    probs: torch.Tensor | None
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor



@dataclass
class _Buffer:
    max_tokens: int
    keep_probs: bool
    chunks: list[Routing] = field(default_factory=list)
    num_tokens: int = 0

    def append(self, routing: Routing) -> None:
        routing = Routing(
            probs=routing.probs.detach().float().cpu() if self.keep_probs else torch.empty(0),
            topk_ids=routing.topk_ids.detach().cpu(),
            topk_weights=routing.topk_weights.detach().float().cpu(),
        )
        self.chunks.append(routing)
        self.num_tokens += routing.topk_ids.shape[0]
        while self.num_tokens > self.max_tokens:  # drop the oldest tokens, chunk by chunk
            excess = self.num_tokens - self.max_tokens
            first = self.chunks[0]
            n = first.topk_ids.shape[0]
            if n <= excess:
                self.chunks.pop(0)
                self.num_tokens -= n
            else:
                self.chunks[0] = Routing(
                    probs=first.probs[excess:] if self.keep_probs else first.probs,
                    topk_ids=first.topk_ids[excess:],
                    topk_weights=first.topk_weights[excess:],
                )
                self.num_tokens -= excess

    def record(self) -> RoutingRecord:
        if not self.chunks:
            raise ValueError("Nothing recorded for this layer yet: run a forward pass inside the tap.")
        return RoutingRecord(
            probs=torch.cat([c.probs for c in self.chunks]) if self.keep_probs else None,
            topk_ids=torch.cat([c.topk_ids for c in self.chunks]),
            topk_weights=torch.cat([c.topk_weights for c in self.chunks]),
        )


class RouterTap:
    """Context manager recording router decisions of every MoE layer of ``model``.

    Parameters
    ----------
    model : a Hugging Face MoE causal LM (any family of :mod:`pikv_press.moe`).
    max_tokens : int, default 65536
        Most recent tokens kept per layer and per kind (actual, predicted); memory is bounded by
        ``max_tokens * (num_experts + 2 * top_k) * 4`` bytes per layer with probabilities.
    predict : bool, default True
        Also record the predicted routing (router applied to the attention input).
    keep_probs : bool, default True
        Keep the router probabilities over all experts (else only top-k ids and weights).

    Example
    -------
    >>> with RouterTap(model) as tap:
    ...     model.generate(input_ids, max_new_tokens=8)
    >>> tap.actual(layer_idx).topk_ids.shape  # (prompt + generated tokens, top_k)
    >>> tap.top1_agreement()                   # predicted vs actual top-1 expert, all layers
    """

    def __init__(self, model: nn.Module, max_tokens: int = 65536, predict: bool = True, keep_probs: bool = True):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}.")
        self.anatomy: MoEAnatomy = get_anatomy(model)
        if not self.anatomy.has_router:
            raise ValueError(
                f"{self.anatomy.family.name} models are dense: there is no router to tap. Use an MoE model "
                "(Qwen3-MoE, Mixtral, OLMoE, DeepSeek, GLM-4-MoE, GPT-OSS, ...)."
            )
        self.max_tokens = max_tokens
        self.predict = predict
        self.keep_probs = keep_probs
        # Records accumulate over every `with` block of this tap (make a new tap to start afresh).
        self._actual = {idx: _Buffer(max_tokens, keep_probs) for idx in self.anatomy.moe_layers}
        self._predicted = {idx: _Buffer(max_tokens, keep_probs) for idx in self.anatomy.moe_layers} if predict else {}
        self._hooks: list = []

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> RouterTap:
        if self._hooks:
            raise RuntimeError("This RouterTap is already active.")
        try:
            for idx in self.anatomy.moe_layers:
                block = self.anatomy.moe_block(idx)
                self._hooks.append(block.register_forward_pre_hook(self._actual_hook(idx), with_kwargs=True))
                if self.predict:
                    attention = self.anatomy.attention(idx)
                    self._hooks.append(
                        attention.register_forward_pre_hook(self._predicted_hook(idx), with_kwargs=True)
                    )
        except Exception:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _actual_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._actual[layer_idx].append(self.anatomy.route(layer_idx, hidden))

        return hook

    def _predicted_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._predicted[layer_idx].append(self.anatomy.route(layer_idx, hidden))

        return hook

    # -- results ---------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return self.anatomy.moe_layers

    def actual(self, layer_idx: int) -> RoutingRecord:
        """Actual routing of the recorded tokens of MoE layer ``layer_idx``."""
        return self._buffer(self._actual, layer_idx).record()

    def predicted(self, layer_idx: int) -> RoutingRecord:
        """Predicted routing (router applied to the attention input) of the recorded tokens."""
        if not self.predict:
            raise ValueError("This tap was created with predict=False.")
        return self._buffer(self._predicted, layer_idx).record()

    def _buffer(self, buffers: dict[int, _Buffer], layer_idx: int) -> _Buffer:
        if layer_idx not in buffers:
            raise ValueError(f"Layer {layer_idx} is not an MoE layer; MoE layers: {list(self.anatomy.moe_layers)}.")
        return buffers[layer_idx]

    def top1_agreement(self, layer_idx: int | None = None) -> float:
        """Share of tokens whose predicted top-1 expert is the actual top-1 (one layer, or all layers pooled)."""
        layers = self.anatomy.moe_layers if layer_idx is None else (layer_idx,)
        hits = total = 0
        for idx in layers:
            actual, predicted = self.actual(idx).top1, self.predicted(idx).top1
            hits += int((actual == predicted).sum())
            total += actual.numel()
        return hits / total

    def topk_recall(self, layer_idx: int | None = None) -> float:
        """Mean share of a token's actual top-k experts that the predicted top-k contains."""
        layers = self.anatomy.moe_layers if layer_idx is None else (layer_idx,)
        recalls = []
        for idx in layers:
            actual, predicted = self.actual(idx).topk_ids, self.predicted(idx).topk_ids
            match = (actual.unsqueeze(-1) == predicted.unsqueeze(-2)).any(-1).float().mean(-1)
            recalls.append(match)
        return float(torch.cat(recalls).mean())

    def expert_load(self, layer_idx: int) -> torch.Tensor:
        """Share of routed slots that went to each expert, ``(num_experts,)``, from the actual routing."""
        ids = self.actual(layer_idx).topk_ids.flatten()
        counts = torch.bincount(ids, minlength=self.anatomy.num_experts).float()
        return counts / counts.sum()
