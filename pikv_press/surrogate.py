"""Fitting a linear surrogate of KVzip's scores (the KVzap recipe, arXiv 2601.07891) for one model.

KVzip (:mod:`pikv_press.kvzip`) rates every cached token by the largest attention a *context reconstruction* pass
gives it, which costs several prefills. KVzap fits a small model per layer that predicts the logarithm of those scores
from the hidden state that enters the layer's attention, so that the scores come at the price of one matrix product.
This module collects the regression data (a prefill that records the attention inputs, then KVzip's reconstruction on
the prefilled cache) and fits the linear variant in closed form (ridge regression, bias included); the result is a
kvpress :class:`~kvpress.presses.kvzap_press.KVzapModel` (``hidden_dim=None``: one ``nn.Linear`` per layer), read by
:class:`pikv_press.presses.KVzipSurrogatePress`.

Differences from KVzap, stated: the targets are plain KVzip scores (kvpress's ``KVzipPress`` defaults, the press
measured here), not KVzip+; only the linear surrogate is fitted, not the MLP; and the fit is closed-form least squares
on sufficient statistics (so that a context's data is a few ``(d+1) x (d+1)`` matrices per layer, not its hidden
states), not gradient descent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import KVzipPress
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

from pikv_press import kvzip
from pikv_press.moe.anatomy import get_anatomy

# Floor of the scores before the logarithm: KVzip's scores are attention probabilities, so exact zeros (underflow on
# long contexts) would be -inf.
SCORE_FLOOR = 1e-12


@dataclass
class SurrogateStats:
    """Sufficient statistics of the per-layer regression ``log score ~ [hidden, 1] @ W``, in float64.

    ``xtx``: ``(layers, d + 1, d + 1)``, ``xty``: ``(layers, d + 1, kv_heads)``, ``yty``: ``(layers, kv_heads)``,
    ``count``: rows per layer. Statistics of several contexts add up (:meth:`__add__`)."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor
    count: int

    def __add__(self, other: SurrogateStats) -> SurrogateStats:
        return SurrogateStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty,
                              self.count + other.count)

    def mse(self, weights: torch.Tensor) -> torch.Tensor:
        """Mean squared error per layer and head ``(layers, kv_heads)`` of ``weights`` ``(layers, d + 1, kv_heads)``
        on these rows, from the statistics alone."""
        w = weights.double()
        quad = torch.einsum("lih,lij,ljh->lh", w, self.xtx, w)
        cross = torch.einsum("lih,lih->lh", w, self.xty)
        return (self.yty - 2 * cross + quad) / self.count


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def collect(model: torch.nn.Module, tokenizer, context_ids: torch.Tensor, skip_first: int = 4,
            press: KVzipPress | None = None, keep_rows: int = 0,
            generator: torch.Generator | None = None) -> tuple[SurrogateStats, dict]:
    """Regression data of one context: prefill ``context_ids`` ``(1, seq)`` recording every attention layer's input,
    score the context with MoE-correct KVzip (``press``, default ``KVzipPress()``), and return the statistics of
    ``[hidden, 1] -> log(max(score, SCORE_FLOOR))`` over the tokens after the first ``skip_first`` (the attention
    sinks, which KVzip keeps whatever their score) and a sample of ``keep_rows`` raw rows per layer
    (``{"hidden": (layers, rows, d), "target": (layers, rows, kv_heads)}``, for rank checks of a fit)."""
    from transformers import DynamicCache

    from pikv_press.compat import moe_anatomy_for_press
    from pikv_press.prefill import PrefillRecorder

    anatomy = moe_anatomy_for_press(model)
    if anatomy is None:
        raise ValueError("collect() runs KVzip MoE-correct, which needs a Mixture-of-Experts family of "
                         "pikv_press.moe; this model is not one.")
    press = press or KVzipPress()
    press.tokenizer = tokenizer
    if context_ids.ndim != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"collect() takes one context, shaped (1, seq); got {tuple(context_ids.shape)}.")
    if context_ids.shape[1] <= skip_first:
        raise ValueError(f"the context has {context_ids.shape[1]} tokens, not more than skip_first={skip_first}.")
    # the recorded attention inputs are the very tensors a press's hooks receive (live and in replay)
    with torch.no_grad(), PrefillRecorder(model) as recorder:
        anatomy.language_model(input_ids=context_ids, past_key_values=DynamicCache())
    snapshot = recorder.snapshot
    try:
        with torch.no_grad():
            kvzip._prepare(press, tokenizer)
            scores = kvzip._scores(press, anatomy, tokenizer, context_ids, snapshot.full_cache())
    finally:
        press._reset_internal_parameters()
    targets = scores[:, 0].double().clamp_min(SCORE_FLOOR).log().transpose(1, 2)  # (layers, seq, kv_heads)
    xs = torch.stack([_with_bias(snapshot.layers[i].kwargs["hidden_states"][0].double())
                      for i in range(anatomy.num_layers)])  # (layers, seq, d + 1)
    xs, targets = xs[:, skip_first:], targets[:, skip_first:]
    stats = SurrogateStats(xtx=xs.transpose(1, 2) @ xs, xty=xs.transpose(1, 2) @ targets,
                           yty=(targets ** 2).sum(1), count=xs.shape[1])
    rows = {}
    if keep_rows:
        pick = torch.randperm(xs.shape[1], generator=generator)[:keep_rows]
        rows = {"hidden": xs[:, pick, :-1].float(), "target": targets[:, pick].float()}
    return stats, rows


def solve(stats: SurrogateStats, ridge: float) -> torch.Tensor:
    """Ridge solution ``(layers, d + 1, kv_heads)`` of ``stats``; ``ridge`` scales the identity by the mean diagonal
    of each layer's ``X^T X`` (the bias is not penalised)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    size = stats.xtx.shape[-1]
    penalty = torch.eye(size, dtype=torch.float64)
    penalty[-1, -1] = 0.0
    scale = stats.xtx.diagonal(dim1=1, dim2=2)[:, :-1].mean(-1)  # (layers,)
    lhs = stats.xtx + ridge * scale[:, None, None] * penalty
    # one layer at a time: torch 2.13's batched float64 solve on the CPU fails inside MKL (DLASWP) for 577 x 577
    return torch.stack([torch.linalg.solve(a, b) for a, b in zip(lhs, stats.xty, strict=True)])


def to_kvzap_model(weights: torch.Tensor, **metadata) -> KVzapModel:
    """kvpress's linear :class:`KVzapModel` holding ``weights`` ``(layers, d + 1, kv_heads)`` (the last row the bias);
    ``metadata`` goes into its config (how it was fitted)."""
    layers, size, heads = weights.shape
    config = KVzapConfig(input_dim=size - 1, output_dim=heads, n_modules=layers, hidden_dim=None, **metadata)
    model = KVzapModel(config)
    with torch.no_grad():
        for layer, linear in zip(weights, model.layers, strict=True):
            linear.weight.copy_(layer[:-1].T.float())
            linear.bias.copy_(layer[-1].float())
    return model.eval()


def check_fits(surrogate: KVzapModel, model: torch.nn.Module) -> None:
    """``ValueError`` unless ``surrogate`` has one module per attention layer of ``model``, reading its hidden size
    and writing one score per kv head."""
    anatomy = get_anatomy(model)
    config = surrogate.config
    hidden = getattr(model.config, "hidden_size", None)
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    problems = []
    if config.n_modules != anatomy.num_layers:
        problems.append(f"{config.n_modules} layers, the model has {anatomy.num_layers}")
    if hidden is not None and config.input_dim != hidden:
        problems.append(f"input size {config.input_dim}, the model's hidden size is {hidden}")
    if kv_heads is not None and config.output_dim != kv_heads:
        problems.append(f"{config.output_dim} outputs, the model has {kv_heads} kv heads")
    if problems:
        raise ValueError("This KVzip surrogate was not fitted for this model (" + "; ".join(problems) + "): fit one "
                         "with `python -m evaluation.fit_kvzip_surrogate --model <model>`.")
