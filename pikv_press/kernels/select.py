"""Score, select and compact: keep the best-scored tokens of every head and gather their keys and values.

From per-token scores ``(batch, kv_heads, seq)`` (a kvpress ``ScorerPress``'s ``score()``), every head keeps its
``n`` best tokens, a uniform ``n`` or a budget per head (ragged), and their keys and values are gathered into
contiguous tensors.

The selection rule (both implementations, exactly):

* a token is kept when fewer than ``n`` tokens of its head score higher, or score the same at a lower position
  (ties broken by the lowest index, deterministically); ``-0.0`` and ``0.0`` are the same score; NaN scores are
  refused (``ValueError``);
* kept tokens stay in position order (ascending index). kvpress keeps ``topk``'s order (descending score) instead;
  the kept *set* is the same as ``topk``'s whenever no tie straddles the cut.

Outputs:

* :func:`select_and_compact` (uniform ``n``): ``indices`` ``(batch, kv_heads, n)`` int64, ``keys`` ``(batch, kv_heads,
  n, head_dim)``, ``values`` ``(batch, kv_heads, n, value_dim)``.
* :func:`select_and_compact_ragged` (``budgets`` ``(batch, kv_heads)``): a :class:`RaggedKV` with the rows of every
  head one after another: ``keys`` ``(total, head_dim)``, ``values`` ``(total, value_dim)``, ``indices``
  ``(total,)`` (positions within the head), ``offsets`` ``(batch * kv_heads + 1,)`` int64 (head ``r`` owns rows
  ``offsets[r]:offsets[r + 1]``).

Implementations (chosen by :mod:`pikv_press.kernels._dispatch`): the torch reference here (a stable descending sort:
the oracle), and the Triton kernel of :mod:`pikv_press.kernels.select_triton` (one program per head: a radix search
over the bits of the scores finds the ``n``-th best score without sorting or ``torch.topk``, then one pass writes the
kept indices and gathers their keys and values). Scores are compared in float32 (half-precision scores are widened,
exactly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pikv_press.kernels._dispatch import triton_module, use_triton

__all__ = ["RaggedKV", "keep_mask", "select_and_compact", "select_and_compact_ragged", "select_indices"]


class RaggedKV(NamedTuple):
    """Kept keys and values of every head, one head after another (see the module docstring)."""

    keys: torch.Tensor  # (total, head_dim)
    values: torch.Tensor  # (total, value_dim)
    indices: torch.Tensor  # (total,) int64, position of each kept token in its head
    offsets: torch.Tensor  # (batch * kv_heads + 1,) int64

    def head(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, indices)`` of head ``row`` (``row = batch_index * kv_heads + head``)."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.keys[start:end], self.values[start:end], self.indices[start:end]


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 3:
        raise ValueError(f"scores must be (batch, kv_heads, seq), got shape {tuple(scores.shape)}.")
    if not torch.is_floating_point(scores):
        raise TypeError(f"scores must be floating point, got {scores.dtype}.")
    if scores.dtype == torch.float64:
        raise TypeError("scores are compared in float32: pass float32, float16 or bfloat16 scores (float64 would be "
                        "rounded, which can change the selection).")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN: a NaN has no rank; replace it (e.g. scores.nan_to_num(-inf)) first.")
    return scores


def _check_budgets(scores: torch.Tensor, budgets: int | torch.Tensor) -> torch.Tensor:
    """Budgets as an int64 tensor ``(batch, kv_heads)`` on the scores' device, each in ``[0, seq]``."""
    batch, heads, seq = scores.shape
    if isinstance(budgets, bool) or not isinstance(budgets, (int, torch.Tensor)):
        raise TypeError(f"budgets must be an int or an integer tensor (batch, kv_heads), got {type(budgets).__name__}.")
    if isinstance(budgets, int):
        budgets = torch.full((batch, heads), budgets, dtype=torch.int64, device=scores.device)
    else:
        if torch.is_floating_point(budgets) or budgets.dtype == torch.bool:
            raise TypeError(f"budgets must be an integer tensor, got {budgets.dtype}.")
        if budgets.dim() == 1:
            budgets = budgets.unsqueeze(0)
        if budgets.dim() != 2 or budgets.shape[1] != heads or budgets.shape[0] not in (1, batch):
            raise ValueError(f"budgets must be (batch, kv_heads) = ({batch}, {heads}) or (kv_heads,), got "
                             f"{tuple(budgets.shape)}.")
        budgets = budgets.to(device=scores.device, dtype=torch.int64).expand(batch, heads).contiguous()
    if budgets.numel() and (int(budgets.min()) < 0 or int(budgets.max()) > seq):
        raise ValueError(f"budgets must lie in [0, seq={seq}], got {int(budgets.min())}..{int(budgets.max())}.")
    return budgets


def _check_kv(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    batch, heads, seq = scores.shape
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 4 or tuple(t.shape[:3]) != (batch, heads, seq):
            raise ValueError(f"{name} must be (batch, kv_heads, seq, dim) = ({batch}, {heads}, {seq}, dim) like the "
                             f"scores, got {tuple(t.shape)}.")
        if t.device != scores.device:
            raise ValueError(f"{name} are on {t.device} and scores on {scores.device}: put them on one device.")


def keep_mask(scores: torch.Tensor, budgets: int | torch.Tensor) -> torch.Tensor:
    """Torch reference of the selection: ``(batch, kv_heads, seq)`` bool, True for the kept tokens."""
    scores = _check_scores(scores)
    budgets = _check_budgets(scores, budgets)
    # +0.0 turns -0.0 into 0.0 (one score); a stable descending sort puts ties in index order
    order = (scores.float() + 0.0).argsort(dim=-1, descending=True, stable=True)
    seq = scores.shape[-1]
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(seq, device=scores.device).expand_as(order))
    return ranks < budgets.unsqueeze(-1)


def _reference_ragged(scores, keys, values, budgets) -> RaggedKV:
    keep = keep_mask(scores, budgets)
    batch, heads, seq = scores.shape
    rows, positions = keep.reshape(batch * heads, seq).nonzero(as_tuple=True)  # row-major: heads in order
    offsets = torch.zeros(batch * heads + 1, dtype=torch.int64, device=scores.device)
    offsets[1:] = budgets.reshape(-1).cumsum(0)
    flat_k = keys.reshape(batch * heads, seq, keys.shape[-1])
    flat_v = values.reshape(batch * heads, seq, values.shape[-1])
    return RaggedKV(flat_k[rows, positions], flat_v[rows, positions], positions, offsets)


def select_and_compact_ragged(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              budgets: int | torch.Tensor, backend: str | None = None) -> RaggedKV:
    """Keep ``budgets[b, h]`` tokens of every head and gather their keys and values (see the module docstring).

    Args:
        scores: ``(batch, kv_heads, seq)`` float32/float16/bfloat16, higher = keep.
        keys: ``(batch, kv_heads, seq, head_dim)``; values: ``(batch, kv_heads, seq, value_dim)``; any dtype.
        budgets: an int (every head) or an integer tensor ``(batch, kv_heads)`` or ``(kv_heads,)``, in ``[0, seq]``.
        backend: ``None`` (``$PIKV_KERNELS``), ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    scores = _check_scores(scores)
    budgets = _check_budgets(scores, budgets)
    _check_kv(scores, keys, values)
    if use_triton(scores, keys, values, backend=backend, faster_on_gpu=False):  # x1.4-x9 slower on an H200
        return triton_module("select_triton").select_and_compact_ragged(scores, keys, values, budgets)
    return _reference_ragged(scores, keys, values, budgets)


def select_and_compact(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_kept: int,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``n_kept`` best tokens of every head: ``(indices, keys, values)`` shaped ``(batch, kv_heads,
    n_kept[, dim])``, tokens in position order (see the module docstring)."""
    if isinstance(n_kept, bool) or not isinstance(n_kept, int):
        raise TypeError(f"n_kept must be an int (use select_and_compact_ragged for per-head budgets), got "
                        f"{type(n_kept).__name__}.")
    ragged = select_and_compact_ragged(scores, keys, values, n_kept, backend=backend)
    batch, heads = scores.shape[:2]
    return (ragged.indices.view(batch, heads, n_kept), ragged.keys.view(batch, heads, n_kept, keys.shape[-1]),
            ragged.values.view(batch, heads, n_kept, values.shape[-1]))


def select_indices(scores: torch.Tensor, n_kept: int, backend: str | None = None) -> torch.Tensor:
    """The kept positions ``(batch, kv_heads, n_kept)`` int64 of every head, in ascending order (no gather)."""
    if isinstance(n_kept, bool) or not isinstance(n_kept, int):
        raise TypeError(f"n_kept must be an int, got {type(n_kept).__name__}.")
    scores = _check_scores(scores)
    budgets = _check_budgets(scores, n_kept)
    batch, heads, seq = scores.shape
    if use_triton(scores, backend=backend, faster_on_gpu=False):
        return triton_module("select_triton").select_ragged(scores, budgets, None, None).indices.view(
            batch, heads, n_kept)
    keep = keep_mask(scores, budgets)
    return keep.reshape(batch * heads, seq).nonzero(as_tuple=True)[1].view(batch, heads, n_kept)
