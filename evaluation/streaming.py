"""Streaming perplexity and peak KV memory under a fixed cache budget (decode-time scheduling, issue 15).

    python -m evaluation.streaming --threads 1                 # measure what is missing, append to the jsonl
    python -m evaluation.streaming --report                    # table with its command, plot to docs/streaming.png

**Perplexity.** The embedded MoE (``evaluation.models.EMBEDDED``) reads ``--tokens`` tokens of Paul Graham essay
text (the held-out middle of the corpus, as :mod:`evaluation.embedded_model.quality` uses) in chunks of ``--chunk``
tokens through :func:`pikv_press.scheduling.chunked_prefill`: every chunk is scored (the next-token loss of each of its
tokens, from the cache as it stands plus the chunk itself), then every layer is compressed to the budget. So each
token is predicted from at most ``budget + chunk`` cached tokens. Policies: pikv-press's H2O, StreamingLLM, LRU, LFU
and expert-aware policies (through :class:`~pikv_press.scheduling.DecodingPolicyPress`), Quest page selection
(:func:`~pikv_press.scheduling.quest_attention`: every page kept, each query reads ``budget`` cached tokens plus its
chunk), kvpress's own ``DecodingPress`` with ``KnormPress`` and with ``StreamingLLMPress`` (made MoE-aware), and the
full cache. Perplexity is ``exp(mean loss)`` over the ``tokens - 1`` predicted tokens.

**Memory against context length.** Reading ``--memory_lengths`` tokens (2k to 32k) for a fixed budget
(``--memory_budget``) along two paths, each run in a fresh process: the bounded prefill (``--memory_policy``, chunks
of ``--chunk``) and kvpress's path (``kvpress_prefill``: the whole context in one forward pass of the language model,
as kvpress's pipeline prefills a context, under kvpress's ``KnormPress`` made MoE-aware with
``compression_ratio = 1 - budget / tokens``, so each layer is compressed to the budget right after its attention has
read the whole context). Two peaks per run: the KV storage (:func:`pikv_press.cache.cache_nbytes` after each layer's
update, before its compression: real tensor storage) and the process's resident memory increase over the loaded
model (``evaluation.benchmark.PeakMemory``: VmHWM reset before the run, plus sampling), which also counts the
activations that kvpress's one-pass prefill holds for the whole context. The full cache's KV peaks come from the
perplexity runs' checkpoints (2k, 4k, 8k, 16k, 32k); a perplexity run at ``--tokens 32768`` also gives the accuracy
against context length (perplexity of each stretch of the stream). The model has 8192 trained positions: perplexity
beyond them is out of distribution (memory is not).

One jsonl line per run is appended to ``--out/streaming.jsonl`` (``measurements/streaming``); runs already there are
skipped, so the command resumes. ``--max_minutes`` stops starting new runs after that much wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.cli import comma_list, setup

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("measurements/streaming")
PLOT = Path("docs/streaming.png")
OWN_POLICIES = ("h2o", "streaming_llm", "lru", "lfu", "expert_aware")
POLICIES = ("full", *OWN_POLICIES, "quest", "kvpress_knorm", "kvpress_streaming_llm")
LABELS = {
    "full": "full cache",
    "h2o": "H2OPolicy",
    "streaming_llm": "StreamingLLMPolicy",
    "lru": "LRUPolicy",
    "lfu": "LFUPolicy",
    "expert_aware": "ExpertAwarePolicy",
    "quest": "Quest page selection (reads budget, keeps all)",
    "kvpress_knorm": "kvpress DecodingPress(KnormPress)",
    "kvpress_streaming_llm": "kvpress DecodingPress(StreamingLLMPress)",
    "kvpress_prefill": "kvpress path: one-pass prefill, then KnormPress",
}
KVPRESS_PREFILL = "kvpress_prefill"
MEMORY_PATHS = ("bounded", KVPRESS_PREFILL, "full")
CHECKPOINTS = (2048, 4096, 8192, 16384, 32768)
WARMUP_TOKENS = 16
QUEST_PAGE = 16  # tokens per page of Quest's page selection


def make_policy(name: str, budget: int):
    """The ``policy`` argument of :func:`chunked_prefill` for ``name`` (``None`` for full and Quest)."""
    from kvpress import DecodingPress, KnormPress, StreamingLLMPress

    from pikv_press.scheduling import ExpertAwarePolicy, H2OPolicy, LFUPolicy, LRUPolicy, StreamingLLMPolicy

    own = {"h2o": H2OPolicy, "streaming_llm": StreamingLLMPolicy, "lru": LRUPolicy, "lfu": LFUPolicy,
           "expert_aware": ExpertAwarePolicy}
    if name in own:
        return own[name]()
    if name == "kvpress_knorm":
        return DecodingPress(KnormPress(), compression_interval=1, target_size=budget)
    if name == "kvpress_streaming_llm":
        return DecodingPress(StreamingLLMPress(), compression_interval=1, target_size=budget)
    return None


def policy_setting(model, name: str, budget: int | None):
    """``(scope, budget, policy)`` for :func:`chunked_prefill` under the policy ``name``: Quest's attention scope
    (every page kept, ``budget`` tokens read per query; a null context otherwise), the budget to compress to
    (``None`` for the full cache and Quest) and the policy (:func:`make_policy`)."""
    from contextlib import nullcontext

    from pikv_press.scheduling import quest_attention

    quest = name == "quest"
    scope = quest_attention(model, token_budget=budget, page_size=QUEST_PAGE) if quest else nullcontext()
    compress_budget = None if quest or name == "full" else budget
    return scope, compress_budget, None if compress_budget is None else make_policy(name, budget)


def essay_tokens(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) of held-out essay text (the middle of the corpus, as the embedded model's quality report)."""
    from evaluation.embedded_model.quality import essay_windows

    return essay_windows(tokenizer, tokens, tokens)


def run_key(record: dict) -> tuple:
    return (record["study"], record["model"], record["policy"], record.get("budget"), record["chunk"],
            record["tokens"])


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def streaming_run(model, ids: torch.Tensor, policy_name: str, budget: int | None, chunk: int,
                  with_logits: bool) -> dict:
    """One pass over ``ids``: summed next-token loss (when ``with_logits``), peak KV bytes, peaks at checkpoints."""
    from pikv_press.scheduling import chunked_prefill

    total = {"nll": 0.0, "count": 0}
    targets = ids[0]
    token_nll = torch.zeros(targets.numel())  # loss of predicting token i + 1 from the tokens up to i

    def score(start: int, logits: torch.Tensor) -> None:
        stop = min(start + logits.shape[1], targets.numel() - 1)
        if stop <= start:
            return
        log_probs = torch.log_softmax(logits[0, : stop - start].float(), dim=-1)
        losses = -log_probs.gather(1, targets[start + 1 : stop + 1, None])[:, 0]
        token_nll[start:stop] = losses
        total["nll"] += float(losses.sum())
        total["count"] += stop - start

    scope, compress_budget, policy = policy_setting(model, policy_name, budget)
    start = time.perf_counter()
    with scope:
        result = chunked_prefill(model, ids, compress_budget, chunk, policy,
                                 on_logits=score if with_logits else None)
    seconds = time.perf_counter() - start
    peaks = {str(tokens): peak for tokens, _, peak in result.kv_bytes if tokens in CHECKPOINTS}
    record = {"peak_kv_bytes": result.peak_kv_bytes, "final_kv_bytes": result.kv_bytes[-1][1],
              "peak_kv_bytes_at": peaks, "seconds": round(seconds, 1)}
    if with_logits:
        record.update(nll=total["nll"], predicted=total["count"], ppl=math.exp(total["nll"] / total["count"]))
        edges = [0, *[c for c in CHECKPOINTS if c < total["count"]], total["count"]]
        record["ppl_by_segment"] = {f"{a}-{b}": math.exp(float(token_nll[a:b].mean())) for a, b in
                                    zip(edges[:-1], edges[1:], strict=True)}
    return record


@torch.no_grad()
def kvpress_prefill(model, ids: torch.Tensor, budget: int) -> dict:
    """kvpress's path: the whole context in one forward pass of the language model (as kvpress's pipeline prefills a
    context) under ``MoEAware(KnormPress(1 - budget / tokens))``; peak and final KV bytes, final tokens per layer."""
    from kvpress import KnormPress

    from pikv_press.cache import cache_lengths, cache_nbytes, make_cache
    from pikv_press.compat import MoEAware
    from pikv_press.moe import language_model_of

    language_model = language_model_of(model)
    cache = make_cache("dynamic")
    press = MoEAware(KnormPress(compression_ratio=max(0.0, 1 - budget / ids.shape[1])))
    peak = {"bytes": 0}

    def note_peak(module, args, kwargs, output):  # registered before the press's hook: the layer is not compressed yet
        if kwargs.get("past_key_values") is cache:
            peak["bytes"] = max(peak["bytes"], cache_nbytes(cache))

    handles = [layer.self_attn.register_forward_hook(note_peak, with_kwargs=True) for layer in language_model.layers]
    try:
        with press(model):
            language_model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return {"peak_kv_bytes": peak["bytes"], "final_kv_bytes": cache_nbytes(cache),
            "final_tokens_per_layer": sorted(set(cache_lengths(cache)))}


@torch.no_grad()
def memory_run(model, ids: torch.Tensor, run: dict) -> dict:
    """One memory-study run (see the module docstring): its KV peak and the process's peak memory increase."""
    from evaluation.benchmark import PeakMemory
    from pikv_press.moe import language_model_of

    # warm-up: the first forward pass pages the weights in and sets up the kernels; that is not this run's memory
    language_model_of(model)(input_ids=ids[:, :WARMUP_TOKENS], use_cache=False)
    start = time.perf_counter()
    with PeakMemory("cpu", interval_s=0.01) as memory:
        if run["policy"] == KVPRESS_PREFILL:
            figures = kvpress_prefill(model, ids, run["budget"])
        else:
            figures = streaming_run(model, ids, run["policy"], run["budget"], run["chunk"], with_logits=False)
    figures.update(seconds=round(time.perf_counter() - start, 1), peak_rss_increase_bytes=memory.peak_increase,
                   peak_rss_bytes=memory.peak_total, rss_method=memory.method)
    return figures


def planned_runs(args) -> list[dict]:
    runs = []
    if args.tokens:
        for budget in args.budgets:
            for policy in args.policies:
                if policy == "full":
                    continue
                runs.append({"study": "ppl", "policy": policy, "budget": budget, "chunk": args.chunk,
                             "tokens": args.tokens})
        if "full" in args.policies:
            runs.insert(0, {"study": "ppl", "policy": "full", "budget": None, "chunk": args.chunk,
                            "tokens": args.tokens})
    for length in args.memory_lengths:
        for path in args.memory_paths:
            policy, budget = {"bounded": (args.memory_policy, args.memory_budget),
                              KVPRESS_PREFILL: (KVPRESS_PREFILL, args.memory_budget), "full": ("full", None)}[path]
            runs.append({"study": "memory", "policy": policy, "budget": budget,
                         "chunk": None if path == KVPRESS_PREFILL else args.chunk, "tokens": length})
    return runs


def measure(args, argv: Sequence[str] | None) -> None:
    from evaluation.embedded_model.build import command_line
    from evaluation.models import EMBEDDED, model_tag

    out = args.out / "streaming.jsonl"
    tag = model_tag(EMBEDDED)
    done = {run_key(r) for r in read_records(out)}
    todo = [dict(run, model=tag) for run in planned_runs(args)]
    todo = [run for run in todo if run_key(run) not in done]
    if not todo:
        logger.info("Every planned run is in %s; nothing to do.", out)
        return
    command = command_line("evaluation.streaming", argv)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = None
    for run in todo:
        if args.max_minutes and time.perf_counter() - started > args.max_minutes * 60:
            logger.info("--max_minutes reached; %d runs left for the next call.", len(todo) - todo.index(run))
            break
        logger.info("%s %s budget=%s chunk=%s tokens=%d", run["study"], run["policy"], run["budget"], run["chunk"],
                    run["tokens"])
        if run["study"] == "memory":  # a fresh process: its peak memory is this run's alone
            subprocess.run([sys.executable, "-m", "evaluation.streaming", "--one_run", json.dumps(run),
                            "--command", command, "--threads", str(args.threads), "--experts", args.experts,
                            "--out", str(args.out)], check=True)
            continue
        if loaded is None:
            loaded = load(args, max(run["tokens"] for run in todo))
        model, ids, label = loaded
        figures = streaming_run(model, ids[:, : run["tokens"]], run["policy"], run["budget"], run["chunk"],
                                with_logits=True)
        append(out, run, figures, label, args, command)


def load(args, tokens: int):
    """The embedded model (dense-masked experts unless ``--experts model``), ``tokens`` essay tokens, its label."""
    from evaluation.models import EMBEDDED, load_model
    from pikv_press import use_dense_masked_experts

    model, tokenizer, label = load_model(EMBEDDED)
    if args.experts == "dense_masked":
        use_dense_masked_experts(model)
    return model, essay_tokens(tokenizer, tokens), label


def append(out: Path, run: dict, figures: dict, label: str, args, command: str) -> None:
    record = {**run, **figures, "label": label, "threads": torch.get_num_threads(), "experts": args.experts,
              "command": command}
    logger.info("  -> %s", {k: figures[k] for k in ("ppl", "peak_kv_bytes", "peak_rss_increase_bytes", "seconds")
                            if k in figures})
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def measure_one(args) -> None:
    """``--one_run``: one memory run in this (fresh) process, appended to the jsonl."""
    run = json.loads(args.one_run)
    model, ids, label = load(args, max(run["tokens"], max(CHECKPOINTS)))  # the same prefix at every length
    figures = memory_run(model, ids[:, : run["tokens"]], run)
    append(args.out / "streaming.jsonl", run, figures, label, args, args.command)


# -- report ----------------------------------------------------------------------------------------------------------
def report(args) -> str:
    records = read_records(args.out / "streaming.jsonl")
    if not records:
        raise SystemExit(f"No measurements in {args.out / 'streaming.jsonl'}: run the command without --report first.")
    ppl = [r for r in records if r["study"] == "ppl"]
    lines = ["Command: `python -m evaluation.streaming --threads 1` (then `--report`); figures from "
             f"`{args.out / 'streaming.jsonl'}`.", ""]
    if ppl:
        full = {(r["tokens"], r["chunk"]): r for r in ppl if r["policy"] == "full"}
        settings = sorted({(r["tokens"], r["chunk"]) for r in ppl})
        for tokens, chunk in settings:
            rows = [r for r in ppl if (r["tokens"], r["chunk"]) == (tokens, chunk)]
            budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
            reference = full.get((tokens, chunk))
            lines.append(f"Streaming perplexity, {tokens} essay tokens in chunks of {chunk} "
                         f"({rows[0]['label']}); each cell: perplexity (change vs full cache), peak KV MiB.")
            lines.append("")
            lines.append("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
            lines.append("| --- | " + " | ".join("---" for _ in budgets) + " |")
            if reference is not None:
                cell = f"{reference['ppl']:.3f}, {reference['peak_kv_bytes'] / 2**20:.1f} MiB"
                lines.append(f"| {LABELS['full']} | " + " | ".join(cell for _ in budgets) + " |")
            for policy in POLICIES[1:]:
                cells = []
                for budget in budgets:
                    match = [r for r in rows if r["policy"] == policy and r["budget"] == budget]
                    if not match:
                        cells.append("not run")
                        continue
                    r = match[-1]
                    change = "" if reference is None else f" ({100 * (r['ppl'] / reference['ppl'] - 1):+.1f}%)"
                    cells.append(f"{r['ppl']:.3f}{change}, {r['peak_kv_bytes'] / 2**20:.1f} MiB")
                if any(c != "not run" for c in cells):
                    lines.append(f"| {LABELS[policy]} | " + " | ".join(cells) + " |")
            lines.append("")
            segment_table(lines, rows, reference)
    memory = memory_points(records, args.memory_policy)
    if memory:
        lines.append("Peak KV storage (MiB) against context length (tensor bytes after each layer's update, before "
                     "its compression; full cache: checkpoints of the perplexity runs):")
        lines.append("")
        series_table(lines, memory, "cache")
    rss = rss_points(records)
    if rss:
        lines.append("Peak process memory increase (MiB) over the loaded, warmed-up model (resident set, one fresh "
                     "process per run; KV, activations and workspace):")
        lines.append("")
        series_table(lines, rss, "path")
    text = "\n".join(lines)
    plot(records, memory, rss, args.plot)
    return text


def segment_table(lines: list[str], rows: list[dict], reference: dict | None) -> None:
    """Perplexity of the tokens in each stretch of the stream (accuracy against context length), per run."""
    runs = ([reference] if reference else []) + [r for r in rows if r["policy"] != "full"]
    runs = [r for r in runs if r.get("ppl_by_segment")]
    if not runs:
        return
    segments = list(runs[0]["ppl_by_segment"])
    lines.append("Perplexity of the tokens predicted in each stretch of the stream (by position):")
    lines.append("")
    lines.append("| policy | budget | " + " | ".join(segments) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in segments) + " |")
    for r in runs:
        values = " | ".join(f"{r['ppl_by_segment'].get(s, float('nan')):.3f}" for s in segments)
        lines.append(f"| {LABELS[r['policy']]} | {r['budget'] if r['budget'] else '-'} | {values} |")
    lines.append("")


def series_table(lines: list[str], series: dict[str, dict[int, int]], what: str) -> None:
    contexts = sorted({c for points in series.values() for c in points})
    lines.append(f"| {what} | " + " | ".join(f"{c}" for c in contexts) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in contexts) + " |")
    for name, points in series.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{points[c] / 2**20:.1f}" if c in points else "-" for c in contexts) + " |")
    lines.append("")


def series_name(record: dict) -> str:
    if record["policy"] == "full":
        return "full cache (chunked prefill)"
    if record["policy"] == KVPRESS_PREFILL:
        return f"kvpress path (one-pass prefill, KnormPress to {record['budget']})"
    return f"bounded prefill, budget {record['budget']}"


def memory_points(records: list[dict], policy: str) -> dict[str, dict[int, int]]:
    """``{series: {context: peak KV bytes}}`` of the full cache, of bounded prefill with ``policy`` (every bounded
    policy stores the same number of tokens) and of kvpress's path: the memory runs, and the checkpoints of the
    perplexity runs."""
    series: dict[str, dict[int, int]] = {}
    for r in sorted(records, key=lambda r: r["study"] != "memory"):  # a memory run's own figure first
        if r["policy"] not in ("full", policy, KVPRESS_PREFILL):
            continue  # Quest keeps every page (the full cache's storage); other policies store what `policy` does
        points = series.setdefault(series_name(r), {})
        points.setdefault(r["tokens"], r["peak_kv_bytes"])
        for tokens, peak in r.get("peak_kv_bytes_at", {}).items():
            points.setdefault(int(tokens), peak)
    return series


def rss_points(records: list[dict]) -> dict[str, dict[int, int]]:
    """``{series: {context: peak process memory increase}}`` of the memory runs."""
    series: dict[str, dict[int, int]] = {}
    for r in records:
        if r["study"] == "memory" and "peak_rss_increase_bytes" in r:
            name = series_name(r) + ("" if r["policy"] in ("full", KVPRESS_PREFILL) else f" ({LABELS[r['policy']]})")
            series.setdefault(name, {})[r["tokens"]] = r["peak_rss_increase_bytes"]
    return series


def plot(records: list[dict], memory: dict[str, dict[int, int]], rss: dict[str, dict[int, int]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = [r for r in records if r["study"] == "ppl"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (left, right), (bottom_left, bottom_right) = axes
    base = min((r["tokens"] for r in ppl), default=0)  # the budget sweep: the shortest stream
    full = [r for r in ppl if r["policy"] == "full" and r["tokens"] == base]
    for policy in POLICIES[1:]:
        rows = sorted((r for r in ppl if r["policy"] == policy and r["tokens"] == base), key=lambda r: r["budget"])
        if rows:
            left.plot([r["budget"] for r in rows], [r["ppl"] for r in rows], marker="o", label=LABELS[policy])
    if full:
        left.axhline(full[-1]["ppl"], color="black", linestyle="--", label="full cache")
        left.axhline(full[-1]["ppl"] * 1.05, color="grey", linestyle=":", label="full cache + 5%")
    left.set_xscale("log", base=2)
    left.set_xlabel("cache budget (tokens per layer)")
    left.set_ylabel("perplexity")
    left.set_title(f"Streaming perplexity, embedded MoE, {base} essay tokens", fontsize=10)
    left.legend(fontsize=7)
    for axis, series, label, title in (
            (right, memory, "peak KV storage (MiB)", "Peak KV storage against context length"),
            (bottom_right, rss, "peak memory increase (MiB)", "Peak process memory increase (resident set)")):
        for name, points in series.items():
            contexts = sorted(points)
            axis.plot(contexts, [points[c] / 2**20 for c in contexts], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
        axis.set_title(title, fontsize=10)
        if series:
            axis.legend(fontsize=7)
    longest = max((r["tokens"] for r in ppl), default=0)
    for r in (r for r in ppl if r["tokens"] == longest and longest > base and r.get("ppl_by_segment")):
        stops = [int(s.split("-")[1]) for s in r["ppl_by_segment"]]
        name = LABELS[r["policy"]] + (f", budget {r['budget']}" if r["budget"] else "")
        bottom_left.plot(stops, list(r["ppl_by_segment"].values()), marker="o", label=name)
    bottom_left.axvline(8192, color="grey", linestyle=":", label="8192 trained positions")
    bottom_left.set_xscale("log", base=2)
    bottom_left.set_xlabel("end of the stretch of the stream (tokens)")
    bottom_left.set_ylabel("perplexity of the stretch")
    bottom_left.set_title(f"Accuracy against context length ({longest} essay tokens, one stream)", fontsize=10)
    bottom_left.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="essay tokens for perplexity (0: none)")
    parser.add_argument("--budgets", default="1024,512", help="comma-separated cache budgets (tokens per layer), in "
                        "the order they are run")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per forward pass")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {POLICIES}")
    parser.add_argument("--memory_lengths", default="2048,4096,8192,16384,32768",
                        help="comma-separated contexts of the memory runs ('': none)")
    parser.add_argument("--memory_paths", default=f"bounded,{KVPRESS_PREFILL}",
                        help=f"comma-separated, from {MEMORY_PATHS}: bounded prefill with --memory_policy, kvpress's "
                        "one-pass prefill then KnormPress, the full cache in chunks")
    parser.add_argument("--memory_policy", default="streaming_llm",
                        choices=[p for p in POLICIES if p not in ("full", "quest")])
    parser.add_argument("--memory_budget", type=int, default=1024)
    parser.add_argument("--experts", default="dense_masked", choices=["dense_masked", "model"],
                        help="dense-masked experts (faster on CPUs) or the model's own implementation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_minutes", type=float, default=0, help="start no new run after this (0: no limit)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--report", action="store_true", help="print the table and write the plot; measure nothing")
    parser.add_argument("--one_run", help=argparse.SUPPRESS)  # internal: one memory run, in a fresh process
    parser.add_argument("--command", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budgets = comma_list(args.budgets, int)
    args.memory_lengths = comma_list(args.memory_lengths, int)
    args.policies = comma_list(args.policies)
    args.memory_paths = comma_list(args.memory_paths)
    if any(p not in MEMORY_PATHS for p in args.memory_paths):
        parser.error(f"--memory_paths: choose from {MEMORY_PATHS}")
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {POLICIES}")
    if any(b < args.chunk for b in args.budgets) or args.chunk < 1:
        parser.error("every budget must be at least --chunk (a chunk is read before the cache is compressed)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup(args.threads)
    if args.report:
        print(report(args))
        return 0
    if args.one_run:
        measure_one(args)
        return 0
    measure(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
