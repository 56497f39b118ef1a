"""``RoutingRecorder``: the routing of every token of every MoE layer, cheap and on-device, for presses.

>>> with RoutingRecorder(model) as recorder:
...     model.model(input_ids=context_ids, past_key_values=cache)
>>> recorder.routing(layer_idx).topk_ids        # (tokens, top_k), on the layer's device

The recorder reads what each MoE block dispatches to its experts (a forward pre-hook on the fused experts module: the
selected ids and weights, no second router pass, no copy to the CPU). With ``scores=True`` it also keeps each token's
normalised router scores over all experts, which needs the router applied once more to the block input. Families
without a fused experts module (Granite-MoE, transformers 4.x layouts) are routed from the block input.

Unlike :class:`~pikv_press.moe.RouterTap` (an analysis tool that also predicts routing from the attention input and
copies everything to the CPU), the recorder is meant for the hot path of a press. Tokens of successive forward passes
(prefill, then decoding steps) are appended; ``max_tokens`` keeps the most recent ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pikv_press.moe.anatomy import MoEAnatomy, get_anatomy
from pikv_press.moe.families import RouterScoring
from pikv_press.moe.routing import TopKRouting


@dataclass
class ContextRouting(TopKRouting):
    """Routing of the recorded tokens of one MoE layer, oldest first, on the layer's device.

    ``topk_ids`` (tokens, top_k) int64: the experts each token was dispatched to, best first by routing weight;
    ``topk_weights`` (tokens, top_k) float32: their weights; ``scores`` (tokens, num_experts) float32 or ``None``: the
    router's scores normalised to sum to one per token (softmax probabilities; sigmoid scores divided by their sum for
    DeepSeek-V3 / GLM-4-MoE), so that features built on them do not depend on a family's logit scale.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    scores: torch.Tensor | None = None



def _ordered(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = weights.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), weights.gather(-1, order)


class RoutingRecorder:
    """Context manager recording the routing of every MoE layer of ``model`` (see the module docstring).

    Parameters
    ----------
    model : a model of a supported MoE family (``ValueError`` for a dense model).
    scores : also keep normalised router scores over all experts (one extra router pass per MoE layer).
    max_tokens : keep only the most recent ``max_tokens`` tokens per layer (``None``: all).
    """

    def __init__(self, model: nn.Module, scores: bool = False, max_tokens: int | None = None):
        self.anatomy: MoEAnatomy = get_anatomy(model)
        if not self.anatomy.has_router:
            raise ValueError(f"RoutingRecorder needs an MoE model; {self.anatomy.describe()}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.keep_scores = scores
        self.max_tokens = max_tokens
        self._chunks: dict[int, list[ContextRouting]] = {i: [] for i in self.anatomy.moe_layers}
        self._handles: list = []

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _append(self, layer_idx: int, routing: ContextRouting) -> None:
        chunks = self._chunks[layer_idx]
        chunks.append(routing)
        if self.max_tokens is not None:
            total = sum(c.num_tokens for c in chunks)
            while total - chunks[0].num_tokens >= self.max_tokens:
                total -= chunks.pop(0).num_tokens

    def _scores(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        probs = self.anatomy.route(layer_idx, hidden_states).probs
        if self.anatomy.scoring == RouterScoring.SIGMOID_GROUPED:
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        return probs

    def _experts_hook(self, layer_idx: int):
        def hook(module, args):
            ids, weights = _ordered(args[1].long(), args[2].float())
            self._append(layer_idx, ContextRouting(ids, weights, self._pending.pop(layer_idx, None)))

        return hook

    def _block_hook(self, layer_idx: int, dispatch_hook: bool):
        def hook(module, args):
            hidden_states = args[0]
            if dispatch_hook:  # ids come from the experts hook; only scores are needed here
                self._pending[layer_idx] = self._scores(layer_idx, hidden_states)
                return
            routing = self.anatomy.route(layer_idx, hidden_states)
            scores = self._scores(layer_idx, hidden_states) if self.keep_scores else None
            ids, weights = _ordered(routing.topk_ids, routing.topk_weights)
            self._append(layer_idx, ContextRouting(ids, weights, scores))

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._pending: dict[int, torch.Tensor] = {}
        try:
            for layer_idx in self.anatomy.moe_layers:
                block = self.anatomy.moe_block(layer_idx)
                experts = getattr(block, "experts", None)
                fused = isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList)
                if fused:
                    self._handles.append(experts.register_forward_pre_hook(self._experts_hook(layer_idx)))
                if not fused or self.keep_scores:
                    self._handles.append(block.register_forward_pre_hook(self._block_hook(layer_idx, fused)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- results ---------------------------------------------------------------------------------------------------
    def routing(self, layer_idx: int) -> ContextRouting:
        """The recorded routing of MoE layer ``layer_idx`` (``ValueError`` for a dense layer or nothing recorded)."""
        if layer_idx not in self._chunks:
            raise ValueError(f"Layer {layer_idx} is not an MoE layer (MoE layers: {list(self.anatomy.moe_layers)}).")
        chunks = self._chunks[layer_idx]
        if not chunks:
            raise ValueError("Nothing recorded for this layer yet: run a forward pass inside the recorder.")
        ids = torch.cat([c.topk_ids for c in chunks])
        weights = torch.cat([c.topk_weights for c in chunks])
        scores = torch.cat([c.scores for c in chunks]) if self.keep_scores else None
        if self.max_tokens is not None and ids.shape[0] > self.max_tokens:
            keep = slice(ids.shape[0] - self.max_tokens, None)
            ids, weights = ids[keep], weights[keep]
            scores = None if scores is None else scores[keep]
        return ContextRouting(ids, weights, scores)

    def reset(self) -> None:
        """Forget everything recorded (hooks stay while the recorder is entered)."""
        self._chunks = {i: [] for i in self.anatomy.moe_layers}
