"""Decode step time and KV bytes read per step: expert-sharded cache vs SDPA over a DynamicCache, by context length.

    python -m evaluation.sharded_benchmark --contexts 2048,8192,32768 --ks all,32,16,8,4 --repeats 7 --threads 1
    python -m evaluation.sharded_benchmark --report        # the table of what is in the results file
    python -m evaluation.sharded_benchmark --report --plot docs/sharded_benchmark.png

For each context length ``L``, the first ``L`` tokens of RULER's Paul Graham essays are prefilled once, in chunks of
``--chunk`` tokens, into an :class:`~pikv_press.cache.ExpertShardedCache` (``attn_implementation="pikv_sharded"``,
every shard read: exact attention; a chunk's logits are at most (3, 256, rows of one kv head in one shard), so no
``L x L`` score matrix exists). The DynamicCache of the dense reference is built from the same keys and values
(``layer.keys`` / ``layer.values`` of the sharded layers, in insertion order), so both caches hold the same context.

Then, after one untimed warm-up step of every setting, ``--repeats`` rounds, interleaved: in each round every
setting (``dense``: SDPA over the DynamicCache; ``all``: the sharded attention reading every shard; ``k``:
routing-restricted reading, ``cache.read_top_k = k``) decodes the same next token of the text from the same restored
cache state, in an order rotated from round to round. A row per setting and round is appended to
``measurements/sharded_benchmark/<model tag>.jsonl`` as it is produced: wall and CPU (this thread) milliseconds of
the step, KV bytes read (sharded: what the sharded attention read, from :attr:`ExpertShardedCache.bytes_read`;
dense: every key and value of the DynamicCache, which SDPA reads whole) and the KL of the step's next-token
distribution against the dense one. The report gives, per setting, the median over rounds of the step time divided
by the dense step time *of the same round* (ratios measured side by side in one process; absolute times depend on
this shared CPU machine and are not claims about any accelerator).

The embedded model was trained to ``max_position_embeddings`` (8,192) positions: a context longer than that is run
with linear RoPE scaling (position interpolation, factor ``ceil(L / max_position_embeddings)``: 4 at 32,768),
written in every row as ``rope``; its text is then out of the model's trained range (the speed and the bytes do not
depend on it; the KL and routing do, somewhat). A restart skips finished rounds; ``--prefill_dir`` keeps each
prefilled cache on disk so that a restart does not prefill again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch

from evaluation import cli

OUT = Path(__file__).resolve().parent.parent / "measurements" / "sharded_benchmark"
DENSE = "dense"
ALL = "all"
log = logging.getLogger(__name__)


def settings(ks: str) -> list[str]:
    """``"all,32,8"`` -> ``["dense", "all", "32", "8"]``: the dense reference, exact sharded reading, then each k."""
    names = [DENSE, ALL]
    for item in cli.comma_list(ks):
        if item in names:
            continue
        if not item.isdigit():
            raise ValueError(f"--ks takes 'all' and positive integers; got {item!r} in {ks!r}.")
        names.append(item)
    return names


def dense_kv_bytes(cache) -> int:
    """Bytes of every key and value a DynamicCache holds: what SDPA reads in one decoding step (all layers)."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def rope_factor(context: int, max_positions: int) -> int:
    """Linear RoPE scaling factor for a context of ``context`` tokens: 1 up to the trained ``max_positions``, else the
    smallest integer factor that fits it (the decoded token's one position more is left unscaled)."""
    return max(1, math.ceil(context / max_positions))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (context, setting): median KV bytes read per step, bytes ratio dense / setting, and the median over
    rounds of (setting's step time / dense step time of the same round), wall and CPU; KL median. Rounds without a
    dense row are skipped."""
    steps = [r for r in rows if r.get("kind") == "step"]
    dense = {(r["context_tokens"], r["round"]): r for r in steps if r["setting"] == DENSE}
    out = []
    keys = sorted({(r["context_tokens"], r["setting"]) for r in steps},
                  key=lambda key: (key[0], _setting_order(key[1])))
    for context, setting in keys:
        mine = [r for r in steps if r["context_tokens"] == context and r["setting"] == setting
                and (context, r["round"]) in dense]
        if not mine:
            continue
        refs = [dense[(context, r["round"])] for r in mine]
        pairs = list(zip(mine, refs, strict=True))
        nbytes = statistics.median(r["kv_bytes"] for r in mine)
        dense_bytes = statistics.median(r["kv_bytes"] for r in refs)
        out.append({"context_tokens": context, "setting": setting, "rounds": len(mine), "rope": mine[0].get("rope"),
                    "kv_bytes": nbytes, "fewer_bytes": dense_bytes / nbytes if nbytes else math.inf,
                    "wall_ratio": statistics.median(r["wall_ms"] / d["wall_ms"] for r, d in pairs),
                    "cpu_ratio": statistics.median(r["cpu_ms"] / d["cpu_ms"] for r, d in pairs),
                    "dense_wall_ms": statistics.median(d["wall_ms"] for d in refs),
                    "dense_cpu_ms": statistics.median(d["cpu_ms"] for d in refs),
                    "kl": statistics.median(r["kl"] for r in mine if r.get("kl") is not None)
                    if any(r.get("kl") is not None for r in mine) else None})
    return out


def _setting_order(setting: str) -> float:
    return {DENSE: -2.0, ALL: -1.0}.get(setting, 1.0 / int(setting) if setting.isdigit() else 2.0)


def report(path: Path) -> str:
    """Markdown table of :func:`summarize`, one block of rows per context length."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    table = summarize(rows)
    prefills = {r["context_tokens"]: r for r in rows if r.get("kind") == "prefill"}
    lines = ["| context | setting | KV bytes read / step | fewer bytes than dense | step time / dense (wall) | "
             "step time / dense (CPU) | KL vs dense (nats) | rounds |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table:
        setting = {DENSE: "dense (SDPA, DynamicCache)", ALL: "sharded, all shards"}.get(r["setting"],
                                                                                      f"sharded, k={r['setting']}")
        kl = "" if r["kl"] is None else f"{r['kl']:.3g}"
        lines.append(f"| {r['context_tokens']:,} | {setting} | {r['kv_bytes'] / 2**20:.1f} MiB | "
                     f"{r['fewer_bytes']:.2f}x | {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} | {kl} | "
                     f"{r['rounds']} |")
    notes, nan = [], float("nan")
    for context in sorted({r["context_tokens"] for r in table}):
        dense = next(r for r in table if r["context_tokens"] == context and r["setting"] == DENSE)
        prefill = prefills.get(context, {})
        notes.append(f"{context:,} tokens: RoPE {dense['rope']}; dense step {dense['dense_wall_ms']:.0f} ms wall "
                     f"({dense['dense_cpu_ms']:.0f} ms CPU) on this shared CPU, one thread; sharded prefill "
                     f"{prefill.get('prefill_s', nan):.0f} s wall ({prefill.get('prefill_cpu_s', nan):.0f} s CPU) "
                     f"in chunks of {prefill.get('chunk', '?')}")
    return "\n".join(lines + [""] + notes)


def plot(path: Path, png: Path) -> Path:
    """Two panels from :func:`summarize`: KV bytes read per decoding step and step time / dense (CPU, median of the
    paired rounds) against the context length, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setting in sorted({r["setting"] for r in table}, key=_setting_order):
        mine = [r for r in table if r["setting"] == setting]
        label = {DENSE: "dense (SDPA)", ALL: "sharded, all"}.get(setting, f"sharded, k={setting}")
        style = "k--" if setting == DENSE else "o-"
        contexts = [r["context_tokens"] for r in mine]
        left.plot(contexts, [r["kv_bytes"] / 2**20 for r in mine], style, label=label)
        right.plot(contexts, [r["cpu_ratio"] for r in mine], style, label=label)
    left.set_ylabel("KV bytes read per step (MiB, all layers)")
    left.set_yscale("log")
    right.set_ylabel("decode step time / dense (CPU, paired median)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    ropes = ", ".join(f"{r['context_tokens']:,}: RoPE {r['rope']}" for r in table if r["setting"] == DENSE)
    fig.suptitle(f"Expert-sharded cache vs SDPA over a DynamicCache, one CPU thread\n({ropes})", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _set_rope(model, factor: int, base: dict) -> str:
    """Linear RoPE scaling by ``factor`` (1: the model's own ``base`` parameters); rebuilds the rotary embedding."""
    config = model.config
    params = dict(base)
    if factor > 1:
        params.update(rope_type="linear", factor=float(factor))
    config.rope_parameters = params
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config, device=rotary.inv_freq.device)
    return "default" if factor == 1 else f"linear x{factor}"


def _text_ids(tokenizer, n: int) -> torch.Tensor:
    from evaluation.data.sources import paul_graham_text

    text = paul_graham_text()
    ids = tokenizer(text[: 8 * n], return_tensors="pt").input_ids[0]  # ~4 characters a token: 8 is ample
    if ids.numel() < n:
        raise ValueError(f"the essays give {ids.numel()} tokens, fewer than the {n} asked for")
    return ids[:n]


@torch.no_grad()
def _step(model, cache, token: int, position: int) -> tuple[torch.Tensor, float, float]:
    w0, c0 = time.perf_counter(), time.thread_time()
    out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[position]]),
                logits_to_keep=1)
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    return out.logits[0, -1].float(), 1000 * wall, 1000 * cpu


def run_context(model, tokenizer, label: str, context: int, names: list[str], rounds: list[int], args,
                out: Path, base_rope: dict) -> None:
    from transformers import DynamicCache

    from evaluation.sharded_decoding import kl
    from pikv_press.answer import restore_cache, save_cache
    from pikv_press.cache.sharded import ExpertShardedCache
    from pikv_press.scheduling import chunked_prefill

    rope = _set_rope(model, rope_factor(context, model.config.max_position_embeddings), base_rope)
    ids = _text_ids(tokenizer, context + 1)
    token = int(ids[context])
    common = {"model": label, "context_tokens": context, "rope": rope, "sink_tokens": args.sink,
              "recent_tokens": args.recent, "threads": torch.get_num_threads()}
    model.set_attn_implementation("pikv_sharded")
    with ExpertShardedCache(model, sink_tokens=args.sink, recent_tokens=args.recent) as cache:
        stored = args.prefill_dir / f"{label.split('(')[-1].rstrip(')')}_{context}_{rope.replace(' ', '')}.pt" \
            if args.prefill_dir else None
        if stored is not None and stored.exists():
            restore_cache(cache, torch.load(stored, weights_only=False))
            log.info("context %d: prefilled cache loaded from %s", context, stored)
        else:
            log.info("context %d: prefill in chunks of %d (RoPE %s)", context, args.chunk, rope)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                chunked_prefill(model, ids[None, :context], None, args.chunk, cache=cache)  # no budget: every token
            record = {**common, "kind": "prefill", "chunk": args.chunk, "prefill_s": round(time.perf_counter() - t0, 1),
                      "prefill_cpu_s": round(time.process_time() - c0, 1), "loadavg": os.getloadavg()[0]}
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if stored is not None:
                stored.parent.mkdir(parents=True, exist_ok=True)
                torch.save(save_cache(cache), stored)
        saved = save_cache(cache)
        dense = DynamicCache(config=model.config)
        for idx, layer in enumerate(cache.layers):  # the same keys and values, in insertion order
            dense.update(layer.keys.clone(), layer.values.clone(), idx)
        dense_saved = save_cache(dense)
        reference = None
        for r in [None, *rounds]:  # None: one untimed warm-up step of every setting
            order = names[(r or 0) % len(names):] + names[:(r or 0) % len(names)]  # rotated: no setting always first
            results = {}
            for setting in order:
                if setting == DENSE:
                    model.set_attn_implementation("sdpa")
                    restore_cache(dense, dense_saved)
                    logits, wall, cpu = _step(model, dense, token, context)
                    nbytes = dense_kv_bytes(dense)
                    model.set_attn_implementation("pikv_sharded")
                else:
                    restore_cache(cache, saved)
                    cache.read_top_k = None if setting == ALL else int(setting)
                    cache.reset_bytes_read()
                    logits, wall, cpu = _step(model, cache, token, context)
                    nbytes = cache.bytes_read
                    cache.read_top_k = None
                results[setting] = {**common, "kind": "step", "round": r, "setting": setting, "position": order.index(
                    setting), "wall_ms": round(wall, 2), "cpu_ms": round(cpu, 2), "kv_bytes": nbytes,
                    "loadavg": os.getloadavg()[0], "_logits": logits}
            if r is None:
                continue
            reference = results[DENSE]["_logits"] if reference is None else reference
            with out.open("a") as handle:
                for setting in names:
                    row = results[setting]
                    row["kl"] = kl(reference, row.pop("_logits"))
                    handle.write(json.dumps(row) + "\n")
            log.info("context %d round %d: %s", context, r, ", ".join(
                f"{s} {results[s]['wall_ms']:.0f} ms" for s in names))
        restore_cache(cache, saved)


def run(args) -> Path:
    from evaluation.models import load_model, model_tag
    from pikv_press.attention import register_sharded_attention

    register_sharded_attention()
    out = args.output or OUT / f"{model_tag(args.model)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = settings(args.ks)
    done: dict[tuple[int, int], set[str]] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("kind") == "step":
                done.setdefault((row["context_tokens"], row["round"]), set()).add(row["setting"])
    model, tokenizer, label = load_model(args.model)
    base_rope = dict(model.config.rope_parameters)
    for context in cli.comma_list(args.contexts, int):
        rounds = [r for r in range(args.repeats) if not set(names) <= done.get((context, r), set())]
        if rounds:
            run_context(model, tokenizer, label, context, names, rounds, args, out, base_rope)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--ks", default="all,32,16,8,4", help="sharded settings besides the dense reference")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per context")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--prefill_dir", type=Path, default=None, help="keep prefilled caches here (resume)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--plot", type=Path, default=None, help="with --report: also write the plot to this PNG")
    args = parser.parse_args(argv)
    cli.setup(args.threads)
    if args.report:
        from evaluation.models import model_tag

        cli.print_report(args.output or OUT / f"{model_tag(args.model)}.jsonl", report, plot, args.plot)
        return 0
    print(report(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
