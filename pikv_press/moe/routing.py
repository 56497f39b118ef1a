"""Routing of tokens to experts, computed with each family's own router modules.

``route`` returns exactly what the model's MoE block computes (selected experts and their weights), plus the
router's probabilities over all experts, so that a tap, a press or a test can apply any layer's router to any hidden
state (for instance the attention input, before the layer's router has run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pikv_press.moe.families import FamilySpec, RouterScoring


@dataclass
class Routing:
    """Routing of ``tokens`` tokens of one layer.

    Attributes
    ----------
    probs : (tokens, num_experts) float32
        The router's probabilities over all experts: softmax of the logits for softmax families, sigmoid scores for
        DeepSeek-V3 / GLM-4-MoE (which do not sum to one).
    topk_ids : (tokens, top_k) int64
        Selected experts, sorted by the family's selection score, best first (``topk_ids[:, 0]`` is the top-1).
    topk_weights : (tokens, top_k) float32
        The weight the MoE block gives each selected expert's output, aligned with ``topk_ids``.
    """

    probs: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        return self.topk_ids[:, 0]


def _sorted(selection: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort selected experts by their selection score, best first (routers may return them unsorted)."""
    order = selection.gather(1, ids).argsort(dim=1, descending=True, stable=True)
    return ids.gather(1, order), weights.gather(1, order)


def route(
    spec: FamilySpec, moe_block: nn.Module, router: nn.Module, hidden_states: torch.Tensor, top_k: int, config
) -> Routing:
    """Route ``hidden_states`` (..., hidden) through ``router`` as the family's MoE block does (eval mode).

    Parameters
    ----------
    spec : the model family.
    moe_block, router : the layer's MoE block and its router module.
    hidden_states : (..., hidden) tensor; flattened to tokens.
    top_k : experts per token.
    config : the text config (for ``norm_topk_prob`` on softmax families).
    """
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    # Routers are called through .forward: hooks and output recorders (output_router_logits) must not see our calls.
    scoring = spec.scoring
    if scoring == RouterScoring.SOFTMAX:
        out = router.forward(x)
        if isinstance(out, tuple):  # transformers 5.x TopKRouter: (probabilities, weights, ids)
            probs, weights, ids = out
            probs = probs.float()
        else:  # transformers 4.x: a plain nn.Linear gate returning logits
            probs = F.softmax(out.float(), dim=-1)
            weights, ids = probs.topk(top_k, dim=-1)
            if spec.name == "mixtral" or getattr(config, "norm_topk_prob", False):
                weights = weights / weights.sum(dim=-1, keepdim=True)
        selection = probs
    elif scoring == RouterScoring.SOFTMAX_TOPK:
        out = router.forward(x)
        logits = out[-1] if spec.name == "granitemoe" else out[0]
        logits = logits.float()
        if spec.name == "granitemoe":  # GraniteMoeTopKGating returns sorted dispatch tensors; recompute the routing
            top_logits, ids = logits.topk(top_k, dim=1)
            weights = F.softmax(top_logits, dim=1)
        else:
            _, weights, ids = out
        probs = F.softmax(logits, dim=-1)
        selection = logits
    elif scoring == RouterScoring.SIGMOID_GROUPED:
        logits = router.forward(x).float()
        ids, weights = moe_block.route_tokens_to_experts(logits)
        probs = logits.sigmoid()
        selection = probs + router.e_score_correction_bias.float()
    elif scoring == RouterScoring.SOFTMAX_GROUPED:
        logits = F.linear(x.float(), router.weight.float())
        ids, weights = moe_block.route_tokens_to_experts(logits.unsqueeze(0))
        probs = logits.softmax(dim=-1)
        selection = probs
    elif scoring == RouterScoring.SPARSEMIXER:
        logits, weights, ids = router.forward(x)
        logits = logits.float()
        probs = F.softmax(logits, dim=-1)
        selection = logits
    else:  # pragma: no cover - every MoE family has a scoring
        raise ValueError(f"Family {spec.name} has no router.")
    ids, weights = _sorted(selection, ids.long(), weights.float())
    return Routing(probs=probs, topk_ids=ids, topk_weights=weights)
