"""RULER accuracy when the context is read under a fixed KV budget (decode-time compression, issue 15).

    python -m evaluation.streaming_ruler --threads 1 --max_minutes 30     # measure what is missing (resumable)
    python -m evaluation.streaming_ruler --report                         # the table with its command

Every RULER context (``--length``, the embedded MoE's tokenizer, kvpress's chat template and question layout through
``pipe.preprocess``) is read in chunks of ``--chunk`` tokens through :func:`pikv_press.scheduling.chunked_prefill`,
each layer compressed to ``--budget`` tokens after every chunk: the compression is a decoding press's
(``compression_interval=1``, ``target_size=budget``), run while the context streams in, so the cache never holds more
than budget + one chunk per layer, and the question is not known when tokens are evicted. Then the question is read
and the gold answer scored from that cache by teacher forcing (:func:`pikv_press.answer.teacher_forced_score`: exact,
the verdict greedy decoding would reach; validated against generation in ``measurements/teacher_forcing``).

Policies (the names of :mod:`evaluation.streaming`): ``full`` (the same chunks, nothing evicted: the reference),
pikv-press's policies (``streaming_llm``, ``h2o``, ``lru``, ``lfu``, ``expert_aware`` through
:class:`~pikv_press.scheduling.DecodingPolicyPress`; ``quest`` keeps every page and reads ``budget`` tokens per query,
during the context and the answer), and kvpress's own ``DecodingPress`` with ``KnormPress`` (``kvpress_knorm``) and
with ``StreamingLLMPress`` (``kvpress_streaming_llm``), made MoE-aware. Accuracy is the task mean of the exact
verdicts with a 95% bootstrap interval, and each policy's paired difference to ``full`` on the same samples (interval
stratified by task, :mod:`evaluation.stats`).

One jsonl line per (sample, policy) is appended to ``measurements/streaming_ruler/<model tag>__ruler<length>.jsonl``
as it is produced; a restart skips what is there. Samples go in rounds (sample i of every task, then i + 1), so a
run stopped by ``--max_minutes`` covers every task.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation import cli

OUT = Path("measurements/streaming_ruler")
# single-value needle tasks: one teacher-forced pass scores each (as evaluation.demo)
DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1"
DEFAULT_POLICIES = "full,streaming_llm,h2o,kvpress_knorm,kvpress_streaming_llm"


def results_path(args) -> Path:
    from evaluation.models import model_tag

    return args.out / f"{model_tag(args.model)}__ruler{args.length}.jsonl"


def row_key(row: dict) -> tuple:
    return row["task"], row["index"], row["policy"], row["budget"], row["chunk"]


@torch.no_grad()
def score_sample(model, tokenizer, context_ids: torch.Tensor, question_ids: torch.Tensor, references: list[str],
                 match: str, max_new_tokens: int, policy_name: str, budget: int, chunk: int) -> dict:
    """Read ``context_ids`` in chunks under ``policy_name`` at ``budget``, then score the references by teacher
    forcing; the verdict, the peak KV bytes of the reading and the tokens each layer kept."""
    from evaluation.streaming import policy_setting
    from pikv_press.answer import layer_lengths, teacher_forced_score
    from pikv_press.scheduling import chunked_prefill

    scope, compress_budget, policy = policy_setting(model, policy_name, budget)
    start = time.perf_counter()
    with scope:
        read = chunked_prefill(model, context_ids, compress_budget, chunk, policy)
        kept = sorted(set(layer_lengths(read.cache)))
        result = teacher_forced_score(model, tokenizer, read.cache, question_ids, context_ids.shape[1], references,
                                      match=match, max_new_tokens=max_new_tokens)
    return {"tf_exact": result.exact, "tf_share": result.share, "nll": result.nll,
            "lead_in": json.dumps(result.lead_in), "peak_kv_bytes": read.peak_kv_bytes, "kept_tokens": kept,
            "seconds": round(time.perf_counter() - start, 2)}


def measure(args, argv: Sequence[str] | None) -> Path:
    from transformers import pipeline

    from evaluation.benchmarks import ruler
    from evaluation.data.ruler import load_ruler
    from evaluation.embedded_model.build import command_line
    from evaluation.models import load_model
    from evaluation.streaming import read_records
    from pikv_press import use_dense_masked_experts

    out = results_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in read_records(out)}
    model, tokenizer, label = load_model(args.model)
    if args.experts == "dense_masked":
        use_dense_masked_experts(model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    frame = load_ruler(args.length, tasks=cli.comma_list(args.tasks), n_per_task=args.samples, tokenizer=tokenizer)
    frame = frame.assign(index=frame.groupby("task", sort=False).cumcount())
    frame = frame.sort_values("index", kind="stable")  # rounds: sample i of every task
    command = command_line("evaluation.streaming_ruler", argv)
    started = time.perf_counter()
    for row in frame.itertuples():
        todo = [p for p in args.policies
                if (row.task, int(row.index), p, None if p == "full" else args.budget, args.chunk) not in done]
        if not todo:
            continue
        if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
            print(f"stopped after {args.max_minutes} minutes; run the same command again to resume")
            break
        inputs = pipe.preprocess(row.context, [row.question], row.answer_prefix, 10**9)
        context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
        references = [str(r) for r in row.answer]
        max_new = min(int(row.max_new_tokens), args.max_new_tokens)
        for policy in todo:
            figures = score_sample(model, tokenizer, context_ids, question_ids, references,
                                   ruler.match_mode(row.task), max_new, policy, args.budget, args.chunk)
            record = {"task": row.task, "index": int(row.index), "policy": policy,
                      "budget": None if policy == "full" else args.budget, "chunk": args.chunk,
                      "length": args.length, "context_tokens": int(context_ids.shape[1]), **figures,
                      "model": label, "experts": args.experts, "threads": torch.get_num_threads(),
                      "command": command}
            print(f"{row.task} #{int(row.index)} {policy}: exact={figures['tf_exact']} nll={figures['nll']:.3f} "
                  f"({figures['seconds']} s)", flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Per policy (full first): samples, accuracy (task mean) and 95% interval, paired difference to ``full`` with its
    interval (stratified by task) over the samples both have, mean nll and peak KV bytes."""
    import numpy as np

    from evaluation.stats import bootstrap_interval, paired_difference, task_mean

    full = {(r["task"], r["index"]): r for r in rows if r["policy"] == "full"}
    settings = sorted({(r["policy"], r["budget"]) for r in rows}, key=lambda s: (s[0] != "full", s[1] or 0, s[0]))
    out = []
    for policy, budget in settings:
        part = sorted((r for r in rows if (r["policy"], r["budget"]) == (policy, budget)),
                      key=lambda r: (r["task"], r["index"]))
        exact = [float(r["tf_exact"]) for r in part]
        groups = [r["task"] for r in part]
        low, high = bootstrap_interval(exact, groups)
        paired = [r for r in part if (r["task"], r["index"]) in full]
        diff = (float("nan"),) * 3
        if paired and policy != "full":
            diff = paired_difference([float(r["tf_exact"]) for r in paired],
                                     [float(full[(r["task"], r["index"])]["tf_exact"]) for r in paired],
                                     [r["task"] for r in paired])
        out.append({"policy": policy, "budget": budget, "samples": len(part), "paired": len(paired),
                    "accuracy": task_mean(exact, groups), "low": low, "high": high, "diff": diff,
                    "nll": float(np.mean([r["nll"] for r in part])),
                    "peak_kv_mib": float(np.mean([r["peak_kv_bytes"] for r in part])) / 2**20,
                    "context": float(np.mean([r["context_tokens"] for r in part]))})
    return out


def report(path: Path) -> str:
    from evaluation.streaming import LABELS, read_records

    rows = read_records(path)
    if not rows:
        raise SystemExit(f"No results in {path}: run the command without --report first.")
    points = summary(rows)
    tasks = sorted({r["task"] for r in rows})
    chunk = sorted({r["chunk"] for r in rows})
    lines = [f"RULER-{rows[0]['length']} ({', '.join(tasks)}; {rows[0]['model']}), contexts of "
             f"{points[0]['context']:.0f} tokens on average read in chunks of {chunk}, teacher-forced exact match; "
             f"figures from `{path}`.", "",
             "| policy | budget | samples | accuracy [95% CI] | vs full, paired [95% CI] | nll | peak KV MiB (mean) |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for p in points:
        diff, dlow, dhigh = p["diff"]
        versus = "" if p["policy"] == "full" else (
            f"{100 * diff:+.1f} [{100 * dlow:+.1f}, {100 * dhigh:+.1f}] (n={p['paired']})")
        lines.append(f"| {LABELS.get(p['policy'], p['policy'])} | {p['budget'] or '-'} | {p['samples']} | "
                     f"{100 * p['accuracy']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}] | {versus} | "
                     f"{p['nll']:.3f} | {p['peak_kv_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from evaluation.streaming import POLICIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--length", type=int, default=1024, help="RULER length (the data are generated offline)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--samples", type=int, default=8, help="per task")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated, from {POLICIES}")
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per layer while the context is read")
    parser.add_argument("--chunk", type=int, default=128, help="context tokens per forward pass (at most the budget)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="teacher forcing's answer budget")
    parser.add_argument("--experts", default="dense_masked", choices=["dense_masked", "model"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_minutes", type=float, default=0, help="start no new sample after this (0: no limit)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="print the table; measure nothing")
    args = parser.parse_args(argv)
    args.policies = cli.comma_list(args.policies)
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {POLICIES}")
    if not 1 <= args.chunk <= args.budget:
        parser.error("--chunk must lie in [1, --budget] (a chunk is read before the cache is compressed)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli.setup(args.threads)
    if args.report:
        print(report(results_path(args)))
        return 0
    print(report(measure(args, argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
