"""Cache bytes and peak memory of a run: a DynamicCache vs the ExpertShardedCache, under non-uniform budgets.

    python -m evaluation.sharded_memory --model embedded --context 1024 --decode 4
    python -m evaluation.sharded_memory --model tiny:qwen2_moe --context 2048

For every (cache, press) pair: prefill ``--context`` random tokens inside the press, then decode ``--decode`` tokens.
Printed and appended to ``measurements/sharded_memory/<model>.jsonl`` (one line per pair, resumable):

* ``cache_bytes``: storage bytes the cache holds after prefill (:func:`pikv_press.cache.cache_nbytes`);
* ``freed_share``: ``(bytes without press - bytes with press) / (ratio * bytes without press)``, the share of the
  nominal evicted bytes that is really freed (1.0 = all), against the same cache without a press;
* ``peak_prefill_bytes`` / ``peak_decode_bytes``: peak of torch's CPU allocations during prefill and during decoding,
  from ``torch.profiler`` with ``profile_memory=True`` (allocations and frees summed in time order at operator
  granularity, so transients freed inside one operator are not seen). The decode peak counts the live cache at the
  start of decoding plus the largest rise above it; the prefill peak is the largest rise above the start of prefill.
  Model weights are not included. Not RSS, not tracemalloc (tracemalloc does not see torch's allocator).

Presses: ``none``, ``adakv`` (``AdaKVPress(KnormPress)``: head-wise budgets, masked by kvpress in a DynamicCache),
``expert_balanced`` (``ExpertBalancedPress`` with Knorm scores: expert-wise budgets), ``kvzip_surrogate``
(``KVzipSurrogatePress``: KVzip's allocation across layers and heads; a DynamicCache is cut to each layer's widest
head and masks the other heads' surplus; it needs the surrogate shipped for the model, so the embedded model only).
The DynamicCache runs on SDPA (AdaKV and the surrogate's masks need it); the sharded cache on ``pikv_sharded``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

MEASUREMENTS = Path(__file__).resolve().parent.parent / "measurements" / "sharded_memory"
PRESSES = ("none", "adakv", "expert_balanced", "kvzip_surrogate")
CACHES = ("dynamic", "sharded")


def make_press(name: str, ratio: float):
    from kvpress import AdaKVPress, KnormPress

    from pikv_press.compat import MoEAware
    from pikv_press.presses import ExpertBalancedPress, KVzipSurrogatePress

    if name == "none":
        return None
    if name == "adakv":
        return MoEAware(AdaKVPress(KnormPress(ratio)))
    if name == "expert_balanced":
        return ExpertBalancedPress(ratio, press=KnormPress())
    if name == "kvzip_surrogate":
        return KVzipSurrogatePress(ratio)
    raise ValueError(f"Unknown press {name!r}; choose from {PRESSES}.")


def load(name: str):
    """``(model, label)``: ``embedded`` or ``tiny:<family>`` (pikv_press.testing)."""
    if name.startswith("tiny:"):
        from pikv_press.testing import build_model

        return build_model(name.split(":", 1)[1], attn_implementation="sdpa"), name
    from evaluation.models import load_model

    model, _, label = load_model(name)
    return model, label


def torch_peak(prof) -> int:
    """Largest running sum of the allocations and frees the profiler saw, in time order."""
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@torch.no_grad()
def measure(model, cache_name: str, press_name: str, ratio: float, ids: torch.Tensor, context: int) -> dict:
    from transformers import DynamicCache

    import pikv_press.attention.sharded  # noqa: F401  (registers pikv_sharded)
    from pikv_press.cache import cache_nbytes
    from pikv_press.cache.sharded import ExpertShardedCache

    model.set_attn_implementation("pikv_sharded" if cache_name == "sharded" else "sdpa")
    cache = ExpertShardedCache(model) if cache_name == "sharded" else DynamicCache(config=model.config)
    press = make_press(press_name, ratio)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if press is None:
            model(ids[:, :context], past_key_values=cache)
        else:
            with press(model):
                model(ids[:, :context], past_key_values=cache)
    prefill_peak = torch_peak(prof)
    cache_bytes = cache_nbytes(cache)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(context, ids.shape[1]):
            model(ids[:, i:i + 1], past_key_values=cache)
    decode_peak = cache_bytes + torch_peak(prof)
    if cache_name == "sharded":
        cache.close()
    return {"cache": cache_name, "press": press_name, "ratio": ratio if press else 0.0, "context": context,
            "decode_steps": ids.shape[1] - context, "cache_bytes": cache_bytes,
            "peak_prefill_bytes": prefill_peak, "peak_decode_bytes": decode_peak,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded or tiny:<family>")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="jsonl (default measurements/sharded_memory/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, label = load(args.model)
    output = args.output or MEASUREMENTS / f"{args.model.replace(':', '-')}.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    rows = []
    if output.exists():
        for line in output.read_text().splitlines():
            row = json.loads(line)
            rows.append(row)
            done.add((row["cache"], row["press"], row["ratio"], row["context"], row["decode_steps"]))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.context + args.decode), generator=torch.Generator().manual_seed(0))
    for press_name in args.presses.split(","):
        for cache_name in CACHES:
            key = (cache_name, press_name, args.ratio if press_name != "none" else 0.0, args.context, args.decode)
            if key in done:
                continue
            row = {"model": label, **measure(model, cache_name, press_name, args.ratio, ids, args.context)}
            rows.append(row)
            with output.open("a") as f:
                f.write(json.dumps(row) + "\n")
    base = {r["cache"]: r["cache_bytes"] for r in rows if r["press"] == "none" and r["context"] == args.context}
    print(f"{'cache':8} {'press':16} {'cache MiB':>10} {'freed share':>12} {'peak prefill MiB':>17} "
          f"{'peak decode MiB':>16}")
    for r in rows:
        if r["context"] != args.context or r["decode_steps"] != args.decode:
            continue
        freed = ""
        if r["press"] != "none" and r["cache"] in base:
            freed = f"{(base[r['cache']] - r['cache_bytes']) / (r['ratio'] * base[r['cache']]):.3f}"
        print(f"{r['cache']:8} {r['press']:16} {r['cache_bytes'] / 2**20:10.2f} {freed:>12} "
              f"{r['peak_prefill_bytes'] / 2**20:17.2f} {r['peak_decode_bytes'] / 2**20:16.2f}")


if __name__ == "__main__":
    main()
