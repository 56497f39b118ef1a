"""Expert shards over 2 gloo ranks (torch.multiprocessing, fork or spawn): equal to single-process attention, 1e-5."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PREFILL, DECODE = 18, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import pikv_press.attention.sharded  # noqa: F401
        from pikv_press.attention.distributed import distributed_merge, expert_rank
        from pikv_press.cache.sharded import LOCAL, ExpertShardedCache
        from pikv_press.kernels.sharded_attention import merge_partials, partial_attention
        from pikv_press.testing import build_model

        result: dict = {}
        # kernel level: keys routed to 5 experts; this rank attends over the experts it owns
        g = torch.Generator().manual_seed(0)
        query, keys, values = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), \
            torch.randn(1, 2, 40, 8, generator=g)
        experts = torch.randint(0, 5, (40,), generator=g)
        outs, lses = [], []
        for expert in range(5):
            if expert_rank(expert, world) == rank:
                idx = torch.nonzero(experts == expert).flatten()
                out, lse = partial_attention(query, keys[:, :, idx], values[:, :, idx], 0.25)
                outs.append(out)
                lses.append(lse)
        out, lse = distributed_merge(*merge_partials(outs, lses))
        result["kernel"] = (out, partial_attention(query, keys, values, 0.25)[0])

        # model level: the same tokens on every rank, shards of expert e on rank e % world
        model = build_model("qwen2_moe", attn_implementation="pikv_sharded")
        ids = torch.randint(3, 300, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(1))
        logits = {}
        with torch.no_grad():
            for name, kwargs in (("single", {}), ("distributed", {"distributed": True}),
                                 ("restricted", {"distributed": True, "read_top_k": 2}),
                                 ("restricted_single", {"read_top_k": 2})):
                with ExpertShardedCache(model, sink_tokens=2, recent_tokens=2, **kwargs) as cache:
                    steps = [model(ids[:, :PREFILL], past_key_values=cache).logits]
                    steps += [model(ids[:, i:i + 1], past_key_values=cache).logits
                              for i in range(PREFILL, ids.shape[1])]
                    logits[name] = torch.cat(steps, dim=1)
                    if name == "distributed":
                        held = {e for layer in cache.layers for e, _ in layer.all_shards() if e != LOCAL}
                        result["held_experts"] = sorted(held)
        result["logits"] = logits
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    # fork (where available) starts the ranks with this process's imports (kvpress takes seconds to import)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=method)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        merged, full = result["kernel"]
        torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
        logits = result["logits"]
        torch.testing.assert_close(logits["distributed"], logits["single"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits["restricted"], logits["restricted_single"], atol=1e-5, rtol=1e-5)
        assert result["held_experts"] and all(e % WORLD == rank for e in result["held_experts"])


def test_distributed_needs_initialised_process_group():
    import pikv_press.attention.sharded  # noqa: F401
    from pikv_press.attention.distributed import distributed_merge, expert_rank
    from pikv_press.cache.sharded import ExpertShardedCache
    from pikv_press.testing import build_model

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertShardedCache(build_model("qwen2_moe", attn_implementation="pikv_sharded"), distributed=True)
    with pytest.raises(ValueError, match="init_process_group"):
        distributed_merge(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1))
    assert [expert_rank(e, 3) for e in range(5)] == [0, 1, 2, 0, 1]
