"""Per-token routing features of the routing presses, batched over layers.

Input: the expert ids of every context token in every layer, ``ids`` ``(layers, seq, top_k)`` best first (the
routing record of :mod:`pikv_press.moe.record`, stacked). With ``m`` the experts counted per token (its first
``experts_per_token``, all ``top_k`` when ``None``) and ``W = min(window_size, seq)``:

* ``counts`` ``(layers, num_experts)`` int64: tokens whose first ``m`` experts include ``e`` (the group capacities of
  :class:`~pikv_press.presses.ExpertBalancedPress`; its group sizes are ``counts / m``);
* ``window_counts`` ``(layers, num_experts)`` int64: the same over the last ``W`` tokens;
* ``affinity`` ``(layers, seq)`` float32: ``sum_j window_counts[e_j] / (m * m * W)`` over the token's first ``m``
  experts ``e_j``, i.e. ``m_t . w`` with ``m_t`` the token's membership (``1 / m`` per expert) and ``w`` the window's
  mean membership (:class:`~pikv_press.presses.RouterAffinityPress`'s feature);
* ``novelty`` ``(layers, seq)`` float32: ``(1 / m) sum_j -log(counts[e_j] / (m * seq))``, the cross-entropy of the
  token's membership under the context's mean membership, in nats (:class:`~pikv_press.presses.RoutingNoveltyPress`'s
  feature).

The affinity is computed from integer counts, so it is exact up to one final (IEEE) division: equal memberships give
equal affinities, and RouterAffinityPress's feature, computed the same way, equals it bit for bit. The novelty's
``log`` may differ by an ulp between torch and Triton; RoutingNoveltyPress computes it with float matrix products
(equal to float32 rounding). The presses compute their features per layer in torch and do not call this kernel: on an
H200 it is 8-14 times slower than the torch reference (``measurements/kernel_benchmark/kernel_benchmark_h200.jsonl``),
so ``auto`` takes the reference.

Implementations (chosen by :mod:`pikv_press.kernels._dispatch`): the torch reference here (the CPU path and the
oracle) and :mod:`pikv_press.kernels.routing_features_triton` (one program per layer: a histogram pass, then a pass
that looks the counts up for every token). ExpertBalancedPress's per-head ranking inside groups is not a kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pikv_press.kernels._dispatch import triton_module, true_divide, use_triton

__all__ = ["RoutingFeatures", "routing_features"]


class RoutingFeatures(NamedTuple):
    counts: torch.Tensor  # (layers, num_experts) int64
    window_counts: torch.Tensor  # (layers, num_experts) int64
    affinity: torch.Tensor  # (layers, seq) float32
    novelty: torch.Tensor  # (layers, seq) float32


def _check(ids: torch.Tensor, num_experts: int, experts_per_token: int | None, window_size: int) -> int:
    if ids.dim() != 3:
        raise ValueError(f"ids must be (layers, seq, top_k) expert ids, got shape {tuple(ids.shape)}: stack the "
                         "layers' (seq, top_k) routing.")
    if torch.is_floating_point(ids) or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor of expert ids, got {ids.dtype}.")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
    if experts_per_token is not None and (isinstance(experts_per_token, bool)
                                          or not isinstance(experts_per_token, int) or experts_per_token < 1):
        raise ValueError(f"experts_per_token must be an integer >= 1 or None, got {experts_per_token!r}.")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}.")
    if ids.shape[2] < 1:
        raise ValueError("ids has no expert per token (top_k = 0).")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {int(ids.min())}..{int(ids.max())}.")
    return ids.shape[2] if experts_per_token is None else min(experts_per_token, ids.shape[2])


def _reference(ids: torch.Tensor, num_experts: int, m: int, window: int) -> RoutingFeatures:
    layers, seq, _ = ids.shape
    first = ids[:, :, :m].long()
    ones = torch.ones_like(first)
    counts = torch.zeros(layers, num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, first.reshape(layers, -1), ones.reshape(layers, -1))
    window_counts = torch.zeros_like(counts)
    recent = first[:, seq - window:].reshape(layers, -1)
    window_counts.scatter_add_(1, recent, torch.ones_like(recent))
    surprise = true_divide(counts.float(), m * seq).log().neg()  # only looked up for experts with tokens
    hits = window_counts.gather(1, first.reshape(layers, -1)).view(layers, seq, m)
    nats = surprise.gather(1, first.reshape(layers, -1)).view(layers, seq, m)
    total_hits, total_nats = hits[..., 0], nats[..., 0]
    for j in range(1, m):  # in order, as the kernel adds
        total_hits = total_hits + hits[..., j]
        total_nats = total_nats + nats[..., j]
    affinity = true_divide(total_hits.float(), m * m * window)
    novelty = true_divide(total_nats, m)
    return RoutingFeatures(counts, window_counts, affinity, novelty)


def routing_features(ids: torch.Tensor, num_experts: int, experts_per_token: int | None = None,
                     window_size: int = 64, backend: str | None = None) -> RoutingFeatures:
    """The routing features of every layer (see the module docstring).

    Args:
        ids: ``(layers, seq, top_k)`` integer expert ids, best first.
        num_experts: experts of the MoE layers (ids lie in ``[0, num_experts)``).
        experts_per_token: experts counted per token, >= 1, or ``None`` for all ``top_k``.
        window_size: tokens at the end of the context whose routing is the affinity's target (all when shorter).
        backend: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    m = _check(ids, num_experts, experts_per_token, window_size)
    layers, seq, _ = ids.shape
    window = min(window_size, seq)
    if seq == 0:
        empty = torch.zeros(layers, num_experts, dtype=torch.int64, device=ids.device)
        nothing = torch.zeros(layers, 0, dtype=torch.float32, device=ids.device)
        return RoutingFeatures(empty, empty.clone(), nothing, nothing.clone())
    if use_triton(ids, backend=backend, faster_on_gpu=False):  # x8-x14 slower on an H200
        return triton_module("routing_features_triton").routing_features(ids, num_experts, m, window)
    return _reference(ids, num_experts, m, window)
