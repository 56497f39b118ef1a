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

from pikv_press.moe.families import FamilySpec, RouterOutput, RouterScoring


class TopKRouting:
    """What every routing record shares: ``topk_ids`` (tokens, top_k), best first."""

    topk_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top1(self) -> torch.Tensor:
        return self.topk_ids[:, 0]


@dataclass
class Routing(TopKRouting):
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
    spec : the model family (its ``scoring`` and ``router_output`` say how to read the router).
    moe_block, router : the layer's MoE block and its router module.
    hidden_states : (..., hidden) tensor; flattened to tokens.
    top_k : experts per token.
    config : the text config (for ``norm_topk_prob`` on softmax families).
    """
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    # Routers are called through .forward: hooks and output recorders (output_router_logits) must not see our calls.
    scoring, output = spec.scoring, spec.router_output
    if output == RouterOutput.LINEAR_WEIGHT:
        logits = F.linear(x.float(), router.weight.float())
        ids, weights = moe_block.route_tokens_to_experts(logits.unsqueeze(0))
    elif output == RouterOutput.LOGITS:
        logits = router.forward(x).float()
        ids, weights = moe_block.route_tokens_to_experts(logits)
    else:
        out = router.forward(x)
        if not isinstance(out, tuple):  # transformers 4.x: a plain nn.Linear gate returning logits
            logits = out.float()
            probs = F.softmax(logits, dim=-1)
            weights, ids = probs.topk(top_k, dim=-1)
            renormalize = spec.renormalize_topk
            if renormalize is None:
                renormalize = bool(getattr(config, "norm_topk_prob", False))
            if renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        elif output == RouterOutput.PROBS_WEIGHTS_IDS:
            probs, weights, ids = out
            logits = None
        elif output == RouterOutput.DISPATCH_LOGITS_LAST:  # sorted dispatch tensors: recompute the routing
            logits = out[-1].float()
            top_logits, ids = logits.topk(top_k, dim=1)
            weights = F.softmax(top_logits, dim=1)
        else:  # LOGITS_WEIGHTS_IDS
            logits, weights, ids = out
            logits = logits.float()
    if scoring == RouterScoring.SIGMOID_GROUPED:
        probs = logits.sigmoid()
        selection = probs + router.e_score_correction_bias.float()
    elif scoring == RouterScoring.SOFTMAX_GROUPED:
        probs = logits.softmax(dim=-1)
        selection = probs
    elif scoring in (RouterScoring.SOFTMAX_TOPK, RouterScoring.SPARSEMIXER):
        probs = F.softmax(logits, dim=-1)
        selection = logits
    elif scoring == RouterScoring.SOFTMAX:
        probs = probs.float() if logits is None else F.softmax(logits, dim=-1)
        selection = probs
    else:  # pragma: no cover - every MoE family has a scoring
        raise ValueError(f"Family {spec.name} has no router.")
    ids, weights = _sorted(selection, ids.long(), weights.float())
    return Routing(probs=probs, topk_ids=ids, topk_weights=weights)
