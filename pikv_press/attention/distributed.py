"""Expert shards spread over ``torch.distributed`` ranks: each rank attends over its own shards, one collective merges.

Placement follows expert parallelism: expert ``e``'s shards live on rank ``e % world_size``
(:func:`expert_rank`). Each rank computes the partial attention ``(out, lse)`` of its shards
(:func:`pikv_press.kernels.sharded_attention.partial_attention`, merged locally), then :func:`distributed_merge` runs
**one collective**, an ``all_gather`` of ``(out, lse)`` packed into one float32 tensor ``(batch, q_heads, q_len,
value_dim + 1)``, and every rank merges the gathered partials with the exact log-sum-exp merge. (A log-sum-exp merge
is not a sum, so a single ``all_reduce`` cannot do it without a first ``all_reduce(MAX)`` of the lse; the gather
sends ``world_size`` times the bytes of one partial and needs one round trip.)

Bytes sent per layer and decoding step, per rank: ``4 * batch * q_heads * q_len * (value_dim + 1)`` (received:
``world_size`` times that) — e.g. 4 * 1 * 9 * 1 * 65 = 2,340 bytes for one SmolLM2-sized layer.

With :class:`~pikv_press.cache.ExpertShardedCache` (``distributed=True``) every rank runs the same model forward on
the same tokens (replicated weights), keeps only the expert shards it owns (the local sink/recent shard is read by
rank 0 only), and the ``pikv_sharded`` attention calls :func:`distributed_merge`. Launch with ``torchrun``::

    torchrun --nproc_per_node 2 my_script.py      # my_script: dist.init_process_group("nccl"), then as usual

Tested here with 2 gloo processes on the CPU; NCCL and multi-node runs were not exercised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pikv_press.kernels.sharded_attention import merge_partials

__all__ = ["distributed_merge", "expert_rank", "merge_bytes_per_rank"]


def expert_rank(expert: int, world_size: int) -> int:
    """The rank that holds expert ``expert``'s shards (expert-parallel placement)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    return expert % world_size


def merge_bytes_per_rank(out: torch.Tensor) -> int:
    """Bytes one rank sends in :func:`distributed_merge` for a partial shaped like ``out``."""
    batch, heads, q_len, value_dim = out.shape
    return 4 * batch * heads * q_len * (value_dim + 1)


def distributed_merge(out: torch.Tensor, lse: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge this rank's partial ``(out, lse)`` with every other rank's, exactly; all ranks get the result.

    ``out`` (batch, q_heads, q_len, value_dim) and ``lse`` (batch, q_heads, q_len) float32 (``-inf`` for a rank with
    no keys). Returns ``(out, lse)`` over the union of all ranks' keys, ``out`` in the dtype of the input.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("distributed_merge needs torch.distributed initialised (dist.init_process_group).")
    world = dist.get_world_size(group)
    packed = torch.cat([out.to(torch.float32), lse.to(torch.float32).unsqueeze(-1)], dim=-1).contiguous()
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    merged, merged_lse = merge_partials([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
    return merged.to(out.dtype), merged_lse
