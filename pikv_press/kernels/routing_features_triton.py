"""Triton kernel of :mod:`pikv_press.kernels.routing_features` (import through ``_dispatch.triton_module``).

One program per layer: a pass over the tokens builds the expert histograms of the whole context and of the window
(one-hot comparisons against the experts, summed), then a pass looks each token's experts up in them (again one-hot,
so no gather from registers) and writes the affinity and the novelty. Counts are exact integers; the features follow
the reference's order of operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pikv_press.kernels._dispatch import interpreting

INTERPRETED = interpreting()


@triton.jit
def _routing_kernel(
    ids_ptr, i_sl, i_st, i_sk,
    counts_ptr, window_ptr, affinity_ptr, novelty_ptr,
    S, E, WINDOW, aff_den, nov_den, m_float,
    M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    base = ids_ptr + layer * i_sl
    counts = tl.full([BLOCK_E], 0, dtype=tl.int32)
    window = tl.full([BLOCK_E], 0, dtype=tl.int32)
    for t0 in range(0, S, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < S
        in_window = t_ok & (t >= S - WINDOW)
        for j in range(M):
            e = tl.load(base + t.to(tl.int64) * i_st + j * i_sk, mask=t_ok, other=-1)
            hit = (e[:, None] == experts[None, :]).to(tl.int32)
            counts += tl.sum(hit, axis=0)
            window += tl.sum(hit * in_window[:, None].to(tl.int32), axis=0)
    tl.store(counts_ptr + layer * E + experts, counts.to(tl.int64), mask=experts < E)
    tl.store(window_ptr + layer * E + experts, window.to(tl.int64), mask=experts < E)
    # (BLOCK_E,); experts without tokens are never looked up (log(1) keeps them finite)
    surprise = -tl.log(tl.div_rn(tl.where(counts > 0, counts, 1).to(tl.float32), nov_den))
    for t0 in range(0, S, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < S
        hits = tl.full([BLOCK_T], 0, dtype=tl.int32)
        nats = tl.full([BLOCK_T], 0.0, dtype=tl.float32)
        for j in range(M):  # in order, as the reference adds (0.0 + x == x)
            e = tl.load(base + t.to(tl.int64) * i_st + j * i_sk, mask=t_ok, other=-1)
            hit = e[:, None] == experts[None, :]
            hits += tl.sum(tl.where(hit, window[None, :], 0), axis=1)
            nats += tl.sum(tl.where(hit, surprise[None, :], 0.0), axis=1)  # one expert matches: exact
        tl.store(affinity_ptr + layer * S + t, tl.div_rn(hits.to(tl.float32), aff_den), mask=t_ok)
        tl.store(novelty_ptr + layer * S + t, tl.div_rn(nats, m_float), mask=t_ok)


NUM_WARPS = 4


def block_tokens(num_experts: int) -> int:
    """Tokens a step: the one-hot (tokens, experts) tile stays at 4096 elements."""
    return max(16, 4096 // triton.next_power_of_2(num_experts))


def routing_features(ids: torch.Tensor, num_experts: int, m: int, window: int, block_t: int | None = None):
    """Launch the kernel (inputs checked by the reference module)."""
    from pikv_press.kernels.routing_features import RoutingFeatures

    layers, seq, _ = ids.shape
    counts = torch.empty(layers, num_experts, dtype=torch.int64, device=ids.device)
    window_counts = torch.empty_like(counts)
    affinity = torch.empty(layers, seq, dtype=torch.float32, device=ids.device)
    novelty = torch.empty_like(affinity)
    if layers:
        _routing_kernel[(layers,)](
            ids, *ids.stride(), counts, window_counts, affinity, novelty,
            seq, num_experts, window, float(m * m * window), float(m * seq), float(m),
            M=m, BLOCK_T=block_t or block_tokens(num_experts), BLOCK_E=triton.next_power_of_2(num_experts),
            num_warps=NUM_WARPS,
        )
    return RoutingFeatures(counts, window_counts, affinity, novelty)
