"""Routing-restricted decoding on the expert-sharded cache: KV bytes read, decode time, logit KL and accuracy vs k.

    python -m evaluation.data.ruler --lengths 1024 --samples 5 --tasks niah_single_1,niah_single_2,niah_multikey_1
    python -m evaluation.sharded_decoding --length 1024 --tasks niah_single_1,niah_single_2,niah_multikey_1 \\
        --samples 5 --ks all,32,16,8,4
    python -m evaluation.sharded_decoding --report          # the summary of what is in the results file
    python -m evaluation.sharded_decoding --report --plot docs/sharded_fidelity.png   # and the fidelity curves

For every RULER sample, the context is prefilled once into an :class:`~pikv_press.cache.ExpertShardedCache`
(``attn_implementation="pikv_sharded"``, every shard read: exact attention). Then, for every ``k`` (``all`` = every
shard), from that same cache (restored between settings):

* **decode**: the question is run, then ``--decode_steps`` single-token steps feed the tokens that greedy decoding
  with full attention writes (the same tokens for every k, so every setting does the same work): ``kv_bytes_per_step``
  (keys and values the sharded attention read, all layers, from :attr:`ExpertShardedCache.bytes_read`),
  ``decode_ms_per_token`` (wall), ``decode_cpu_ms_per_token`` (this thread's CPU time; the machine is shared) and
  ``attention_ms_per_token`` (wall time inside the sharded attention: gathering the shards read and the partials;
  the rest of a step, the MoE layers and the routers predicting each query's experts, does not depend on k);
* **KL**: mean over those steps of KL(full || restricted) of the next-token distributions (nats);
* **teacher-forced accuracy**: :func:`pikv_press.answer.teacher_forced_score` (exact match of every gold value);
* with ``--generate``, also the greedy answer's RULER string match.

Under ``read_top_k = k`` every token after the context (question and answer) reads only the local shard (sinks,
recent tokens and the tokens of its own forward pass) and the shards of the ``k`` experts its layer's router predicts
from the token's attention input; with teacher forcing the forced answer tokens see each other through the local
shard. The first ``--dense_samples`` samples are also decoded with SDPA over a DynamicCache (``cache: dynamic``
rows), the speed reference. Rows are appended to ``measurements/sharded_decoding/<model tag>__ruler<length>.jsonl``
as they are produced; a restart skips what is done.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from evaluation import cli

OUT = Path(__file__).resolve().parent.parent / "measurements" / "sharded_decoding"


def parse_ks(text: str) -> list[int | None]:
    """``"all,32,8"`` -> ``[None, 32, 8]`` (``all`` first: the other settings are compared with it)."""
    ks = [None if k == "all" else int(k) for k in cli.comma_list(text)]
    if None not in ks:
        raise ValueError(f"--ks must include 'all' (the exact reference the others are compared with); got {text!r}.")
    return [None] + [k for k in ks if k is not None]


def _k_name(k: int | None) -> str:
    return "all" if k is None else str(k)


@torch.no_grad()
def decode_run(model, cache, question_ids: torch.Tensor, tokens: list[int], start: int) -> dict:
    """Question, then one step per token of ``tokens`` (teacher-forced); logits of each step, bytes and times."""
    from pikv_press.answer import _forward

    logits = [_forward(model, question_ids.reshape(-1), cache, start, logits_to_keep=1)[-1]]
    position = start + question_ids.numel()
    reads = hasattr(cache, "reset_bytes_read")
    if reads:
        cache.reset_bytes_read()
    wall = cpu = 0.0
    for i, token in enumerate(tokens[:-1]):
        w0, c0 = time.perf_counter(), time.thread_time()
        logits.append(_forward(model, torch.tensor([token]), cache, position + i, logits_to_keep=1)[-1])
        wall += time.perf_counter() - w0
        cpu += time.thread_time() - c0
    steps = max(len(tokens) - 1, 1)
    return {"logits": torch.stack(logits), "kv_bytes_per_step": (cache.bytes_read / steps) if reads else None,
            "attention_ms_per_token": (1000 * cache.attention_seconds / steps) if reads else None,
            "decode_ms_per_token": 1000 * wall / steps, "decode_cpu_ms_per_token": 1000 * cpu / steps}


def kl(full: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(full || other) over rows of next-token logits (nats)."""
    p = torch.log_softmax(full.float(), dim=-1)
    q = torch.log_softmax(other.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def run(args) -> Path:
    from transformers import DynamicCache, pipeline

    import pikv_press.attention.sharded  # noqa: F401  (registers pikv_sharded)
    from evaluation.benchmarks import ruler
    from evaluation.data.ruler import load_ruler
    from evaluation.metrics import sample_string_match
    from evaluation.models import load_model, model_tag
    from pikv_press.answer import greedy_tokens, restore_cache, save_cache, teacher_forced_score
    from pikv_press.cache.sharded import ExpertShardedCache

    out = args.output or OUT / f"{model_tag(args.model)}__ruler{args.length}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add((row["task"], row["index"], row["cache"], row["k"]))
    model, tokenizer, label = load_model(args.model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    frame = load_ruler(args.length, tasks=cli.comma_list(args.tasks), n_per_task=args.samples, tokenizer=tokenizer)
    frame = frame.assign(index=frame.groupby("task", sort=False).cumcount())
    frame = frame.assign(_r=frame["index"]).sort_values("_r", kind="stable")  # rounds: sample i of every task
    ks = parse_ks(args.ks)
    cpu_budget = time.process_time() + 60 * args.max_cpu_minutes
    for row in frame.itertuples():
        keys = [(row.task, int(row.index), "sharded", _k_name(k)) for k in ks]
        dense_wanted = int(row.index) < args.dense_samples
        if all(key in done for key in keys) and (not dense_wanted or (row.task, int(row.index), "dynamic", "all")
                                                 in done):
            continue
        if time.process_time() > cpu_budget:
            print(f"stopped at the budget of {args.max_cpu_minutes} CPU minutes; run again to resume")
            break
        inputs = pipe.preprocess(row.context, [row.question], row.answer_prefix, 10**9)
        context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
        start = context_ids.shape[1]
        references = [str(r) for r in row.answer]
        match = ruler.match_mode(row.task)
        budget = min(int(row.max_new_tokens), args.max_new_tokens)
        base = {"model": label, "task": row.task, "index": int(row.index), "context_tokens": start,
                "length": args.length, "sink_tokens": args.sink, "recent_tokens": args.recent,
                "decode_steps": args.decode_steps}
        model.set_attn_implementation("pikv_sharded")
        with ExpertShardedCache(model, sink_tokens=args.sink, recent_tokens=args.recent) as cache:
            t0 = time.perf_counter()
            with torch.no_grad():
                model.model(input_ids=context_ids, past_key_values=cache)
            prefill_s = time.perf_counter() - t0
            saved = save_cache(cache)
            tokens = greedy_tokens(model, cache, question_ids, start, args.decode_steps)
            restore_cache(cache, saved)
            if len(tokens) < 2:
                tokens = tokens + tokens  # an answer of one token: one step over it
            full_logits = None
            for k in ks:
                restore_cache(cache, saved)
                cache.read_top_k = k
                result = decode_run(model, cache, question_ids, tokens, start)
                if k is None:
                    full_logits = result["logits"]
                restore_cache(cache, saved)
                cache.read_top_k = k
                tf = teacher_forced_score(model, tokenizer, cache, question_ids, start, references, match=match,
                                          max_new_tokens=budget)
                record = {**base, "cache": "sharded", "k": _k_name(k), "prefill_s": round(prefill_s, 2),
                          "kv_bytes_per_step": result["kv_bytes_per_step"],
                          "decode_ms_per_token": round(result["decode_ms_per_token"], 2),
                          "decode_cpu_ms_per_token": round(result["decode_cpu_ms_per_token"], 2),
                          "attention_ms_per_token": round(result["attention_ms_per_token"], 2),
                          "kl": kl(full_logits, result["logits"]), "tf_exact": tf.exact, "tf_share": tf.share,
                          "nll": tf.nll}
                if args.generate:
                    restore_cache(cache, saved)
                    answer = greedy_tokens(model, cache, question_ids, start, budget)
                    record["string_match"] = sample_string_match(
                        str(tokenizer.decode(answer, skip_special_tokens=True)), references, match)
                cache.read_top_k = None
                if (row.task, int(row.index), "sharded", _k_name(k)) not in done:
                    with out.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
        if dense_wanted and (row.task, int(row.index), "dynamic", "all") not in done:
            model.set_attn_implementation("sdpa")
            dense = DynamicCache(config=model.config)
            with torch.no_grad():
                model.model(input_ids=context_ids, past_key_values=dense)
            result = decode_run(model, dense, question_ids, tokens, start)
            record = {**base, "cache": "dynamic", "k": "all",
                      "kv_bytes_per_step": sum(t.nbytes for layer in dense.layers for t in (layer.keys, layer.values))
                      / 1.0, "decode_ms_per_token": round(result["decode_ms_per_token"], 2),
                      "decode_cpu_ms_per_token": round(result["decode_cpu_ms_per_token"], 2),
                      "kl": kl(full_logits, result["logits"])}
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            model.set_attn_implementation("pikv_sharded")
    return out


def _frame(path: Path):
    import pandas as pd

    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def fidelity_by_k(frame) -> list[dict]:
    """Per ``k`` of the sharded rows (``all`` first, then large k): samples, mean KV bytes read per step and the
    ratio of ``all``'s to it, mean decode and attention ms/token, mean KL vs all, teacher-forced accuracy (task mean,
    95% bootstrap interval) and its paired difference to ``all`` (interval stratified by task), over the samples
    that ``all`` also has."""
    from evaluation.stats import bootstrap_interval, paired_difference, task_mean

    sharded = frame[frame["cache"] == "sharded"]
    full = sharded[sharded["k"] == "all"].set_index(["task", "index"])
    order = sorted(sharded["k"].unique(), key=lambda k: -math.inf if k == "all" else -int(k))  # all, then large k
    out = []
    for k in order:
        part = sharded[sharded["k"] == k].set_index(["task", "index"])
        common = part.index.intersection(full.index)
        part, ref = part.loc[common], full.loc[common]
        groups = [t for t, _ in common]
        exact, ref_exact = part["tf_exact"].astype(float), ref["tf_exact"].astype(float)
        low, high = bootstrap_interval(exact, groups)
        diff, dlow, dhigh = paired_difference(exact, ref_exact, groups)
        out.append({"k": k, "samples": len(common), "kv_bytes": part["kv_bytes_per_step"].mean(),
                    "fewer_bytes": ref["kv_bytes_per_step"].mean() / part["kv_bytes_per_step"].mean(),
                    "decode_ms": part["decode_ms_per_token"].mean(), "decode_cpu_ms": part["decode_cpu_ms_per_token"]
                    .mean(), "attention_ms": part["attention_ms_per_token"].mean(), "kl": part["kl"].mean(),
                    "accuracy": task_mean(exact, groups), "low": low, "high": high, "diff": diff, "diff_low": dlow,
                    "diff_high": dhigh})
    return out


def report(path: Path) -> str:
    """Markdown table per k: bytes read per step (and ratio to all), decode ms/token, KL, teacher-forced accuracy
    with its paired difference to ``all`` (95% bootstrap interval, stratified by task)."""
    frame = _frame(path)
    sharded = frame[frame["cache"] == "sharded"]
    full = sharded[sharded["k"] == "all"].set_index(["task", "index"])
    lines = [f"{len(full)} samples ({', '.join(sorted(full.reset_index()['task'].unique()))}), "
             f"context {int(full['context_tokens'].mean())} tokens on average",
             "",
             "| k | KV bytes read / step | fewer bytes than all | decode ms/token (CPU) | sharded attention "
             "ms/token | KL vs all (nats) | teacher-forced accuracy | vs all (95% CI) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    points = fidelity_by_k(frame)
    order = [p["k"] for p in points]
    for p in points:
        lines.append(f"| {p['k']} | {p['kv_bytes'] / 2**20:.2f} MiB | {p['fewer_bytes']:.2f}x | "
                     f"{p['decode_ms']:.0f} ({p['decode_cpu_ms']:.0f}) | {p['attention_ms']:.1f} | "
                     f"{p['kl']:.4f} | {100 * p['accuracy']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}] | "
                     f"{100 * p['diff']:+.1f} [{100 * p['diff_low']:+.1f}, {100 * p['diff_high']:+.1f}] |")
    dense = frame[frame["cache"] == "dynamic"]
    if len(dense):
        common = dense.set_index(["task", "index"]).index.intersection(full.index)
        dense_ms, dense_cpu = dense["decode_ms_per_token"].mean(), dense["decode_cpu_ms_per_token"].mean()
        lines += ["", f"SDPA over a DynamicCache on {len(dense)} of these samples: "
                      f"{dense_ms:.0f} ms/token ({dense_cpu:.0f} CPU), sharded reading all on the same samples: "
                      f"{full.loc[common]['decode_ms_per_token'].mean():.0f} ms/token "
                      f"({full.loc[common]['decode_cpu_ms_per_token'].mean():.0f} CPU); KL of SDPA vs sharded-all "
                      f"{dense['kl'].max():.2e} at most"]
    if "string_match" in sharded:
        lines += ["", "generated string match: " + ", ".join(
            f"k={k}: {np.mean(sharded[sharded['k'] == k]['string_match']):.1f}%" for k in order)]
    return "\n".join(lines)


def plot_fidelity(path: Path, png: Path) -> Path:
    """Fidelity curves of routing-restricted decoding from a results file: KL vs all and teacher-forced accuracy
    (95% interval) against the KV bytes read per decoding step, one point per k (:func:`fidelity_by_k`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _frame(path)
    points = fidelity_by_k(frame)
    mib = [p["kv_bytes"] / 2**20 for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(mib, [p["kl"] for p in points], "o-")
    left.set_ylabel("logit KL vs all shards (nats, mean)")
    acc = [100 * p["accuracy"] for p in points]
    errors = [[100 * (p["accuracy"] - p["low"]) for p in points], [100 * (p["high"] - p["accuracy"]) for p in points]]
    right.errorbar(mib, acc, yerr=errors, fmt="o-", capsize=3)
    right.set_ylabel("teacher-forced accuracy (%, 95% CI)")
    for axis, ys in ((left, [p["kl"] for p in points]), (right, acc)):
        axis.set_xlabel("KV bytes read per decoding step (MiB, all layers)")
        axis.grid(alpha=0.3)
        for x, y, p in zip(mib, ys, points, strict=True):
            axis.annotate(f"k={p['k']}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    sharded = frame[frame["cache"] == "sharded"]
    fig.suptitle(f"Routing-restricted decoding, {sharded['model'].iloc[0]}: {points[0]['samples']} RULER contexts of "
                 f"{int(sharded['context_tokens'].mean())} tokens on average (generated accuracy not measured)",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1")
    parser.add_argument("--samples", type=int, default=5, help="per task")
    parser.add_argument("--ks", default="all,32,16,8,4")
    parser.add_argument("--decode_steps", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32, help="budget of teacher forcing and generation")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--dense_samples", type=int, default=1, help="samples per task also decoded with SDPA")
    parser.add_argument("--generate", action="store_true", help="also score greedy generation (slow)")
    parser.add_argument("--max_cpu_minutes", type=float, default=14.0,
                        help="start no new sample after this much CPU time of this process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the fidelity curves of the results file to this PNG (with --report)")
    args = parser.parse_args(argv)
    cli.setup(args.threads)
    if args.report:
        from evaluation.models import model_tag

        cli.print_report(args.output or OUT / f"{model_tag(args.model)}__ruler{args.length}.jsonl", report,
                         plot_fidelity, args.plot)
        return 0
    path = run(args)
    print(report(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
