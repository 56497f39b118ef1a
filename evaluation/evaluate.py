"""Evaluate presses on long-context benchmarks, kvpress-style, with one prefill per context.

    python -m evaluation.evaluate --dataset ruler --data_dir 4096 --press_name knorm,snapkv \\
        --compression_ratio 0.25,0.5,0.75 --fraction 0.1

Flags follow kvpress's ``evaluation/evaluate.py`` (``--dataset --data_dir --model --press_name --compression_ratio
--fraction --max_new_tokens --max_context_length --query_aware --needle_depth --device --output_dir``, and for ThinK
and decoding presses ``--key_channel_compression_ratio --target_size --compression_interval
--hidden_states_buffer_size``); press names and compression ratios take comma-separated lists and the harness runs
every combination (presses that take no ratio run once, under ratio 0). Defaults: the embedded MoE
(built offline on first use) and offline RULER (``--data_source hub`` reads kvpress's ``simonjegou/ruler``).

Every run writes kvpress's leaderboard layout, ``<output_dir>/<dataset>__<data_dir>__<model>__<press>__<ratio>/``
with ``predictions.csv``, ``metrics.json`` and ``config.yaml``; finished runs are skipped, so an interrupted sweep
resumes. At the end a markdown table (``results.md``) and a plot of score vs compression ratio (``results.png``) are
written to ``output_dir``.

Prefill once: prefill presses compress each layer after its attention without changing what flows on, so each
context is prefilled once with :class:`pikv_press.prefill.PrefillRecorder` and every run's press is replayed on the
record (tests show identical caches and answers). Presses that run their own forward passes (KVzip, Finch,
DecodingPress, ...) fall back to the plain ``with press(model)`` prefill. ``--naive`` runs kvpress's loop instead:
one full pipeline call per run and context (for comparison; it gives the same predictions).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from evaluation.metrics import average_score, needle_scores, ruler_scores
from evaluation.models import EMBEDDED, load_model, model_tag
from evaluation.registry import DECODING_OPTIONS, is_decoding_press, press_for_run, takes_compression_ratio
from pikv_press import cache_lengths
from pikv_press.prefill import PrefillRecorder, can_replay

logger = logging.getLogger("evaluation.evaluate")

DATASETS = ("ruler", "needle_in_haystack", "longbench")


@dataclass(frozen=True)
class RunConfig:
    """One (dataset, model, press, ratio) evaluation, as kvpress's EvaluationConfig names it."""

    dataset: str = "ruler"
    data_dir: str | None = "4096"
    model: str = EMBEDDED
    press_name: str = "no_press"
    compression_ratio: float = 0.0
    fraction: float = 1.0
    max_new_tokens: int | None = None
    max_context_length: int | None = None
    query_aware: bool = False
    needle_depth: str | None = None
    data_source: str = "offline"
    seed: int = 42
    tasks: str | None = None
    samples_per_task: int | None = None
    key_channel_compression_ratio: float | None = None
    target_size: int | None = None
    compression_interval: int | None = None
    hidden_states_buffer_size: int | None = None

    def make_press(self):
        """A fresh press for this run (see :func:`evaluation.registry.make_press`)."""
        return press_for_run(self.press_name, self.compression_ratio,
                             key_channel_compression_ratio=self.key_channel_compression_ratio,
                             **{k: getattr(self, k) for k in DECODING_OPTIONS})

    def results_dir(self, output_dir: Path) -> Path:
        model = model_tag(self.model)
        ratio = self.compression_ratio if takes_compression_ratio(self.press_name) else 0.0
        data = str(self.data_dir).split(":")[0]  # longbench "subset:local file" -> subset
        data = Path(data).stem if "/" in data else data
        parts = [self.dataset, data, model, self.press_name, f"{ratio:.2f}"]
        if self.fraction < 1.0:
            parts.append(f"fraction{self.fraction:.3f}")
        if self.max_context_length is not None:
            parts.append(f"max_context{self.max_context_length}")
        if self.query_aware:
            parts.append("query_aware")
        if self.tasks is not None:
            parts.append(f"tasks{self.tasks.replace(',', '-')}")
        if self.samples_per_task is not None:
            parts.append(f"n{self.samples_per_task}")
        if self.needle_depth is not None and self.dataset == "needle_in_haystack":
            parts.append(f"needle_depth{self.needle_depth.replace(',', '-')}")
        if self.key_channel_compression_ratio is not None and "think" in self.press_name:
            parts.append(f"key_channel{self.key_channel_compression_ratio:.2f}")
        for option in DECODING_OPTIONS:
            value = getattr(self, option)
            if value is not None and is_decoding_press(self.press_name):
                parts.append(f"{option}{value}")
        return output_dir / "__".join(parts)


# -- data ----------------------------------------------------------------------------------------------------------
def load_samples(config: RunConfig, tokenizer) -> pd.DataFrame:
    """The dataset in kvpress's record layout (context, question, answer_prefix, answer, task, max_new_tokens).

    ``data_dir`` may also be a local ``.jsonl``/``.parquet`` file in that layout (any dataset).
    """
    local = Path(str(config.data_dir))
    if local.suffix in (".jsonl", ".parquet") and local.exists():
        df = pd.read_parquet(local) if local.suffix == ".parquet" else pd.read_json(local, lines=True)
    elif config.dataset == "ruler":
        length = int(config.data_dir or 4096)
        if config.data_source == "hub":
            import datasets

            df = datasets.load_dataset("simonjegou/ruler", data_dir=str(length), split="test").to_pandas()
        else:
            from evaluation.data import load_ruler

            # the embedded model's tokenizer is SmolLM2's, the data module's default (its cache is shared)
            data_tokenizer = None if config.model == EMBEDDED else tokenizer
            tasks = config.tasks.split(",") if config.tasks else None
            df = load_ruler(length, tasks=tasks, n_per_task=config.samples_per_task, tokenizer=data_tokenizer)
    elif config.dataset == "needle_in_haystack":
        from evaluation.data import build_niah

        lengths = [int(x) for x in str(config.data_dir or config.max_context_length or 4096).split(",")]
        depths = [float(d) for d in config.needle_depth.split(",")] if config.needle_depth else None
        df = build_niah(lengths, depths, tokenizer) if depths else build_niah(lengths, tokenizer=tokenizer)
    elif config.dataset == "longbench":
        from evaluation.benchmarks.longbench import load_longbench

        subset, _, local = str(config.data_dir).partition(":")
        df = load_longbench(subset, data_dir=local or None)
    else:
        raise ValueError(f"Unknown dataset {config.dataset!r}; choose from {DATASETS}.")
    if config.fraction < 1.0:
        df = df.sample(frac=config.fraction, random_state=config.seed)
    if config.max_new_tokens is not None:
        df = df.assign(max_new_tokens=config.max_new_tokens)
    if config.query_aware:  # the question is part of the compressed context, as in kvpress
        df = df.assign(context=df["context"] + df["question"], question="")
    return df.reset_index(drop=True)


def score(dataset: str, df: pd.DataFrame) -> dict:
    if dataset == "ruler":
        return ruler_scores(df)
    if dataset == "needle_in_haystack":
        return needle_scores(df)
    from evaluation.benchmarks.longbench import longbench_scores

    return longbench_scores(df)


# -- running -------------------------------------------------------------------------------------------------------
def _answer(pipe, cache, questions_ids, context_length: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to each question from ``cache``, trimming each answer off the cache (kvpress's pipeline)."""
    answers = []
    for question_ids in questions_ids:
        lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
        answers.append(pipe.generate_answer(question_ids.to(pipe.model.device), cache, context_length, max_new_tokens))
        pipe._remove_answer_from_cache(cache, lengths)
    return answers


def _plain_cache(pipe, press, context_ids):
    cache = DynamicCache()
    with torch.no_grad(), press(pipe.model):
        pipe.model.model(input_ids=context_ids, past_key_values=cache)
    return cache


def run_sweep(configs: list[RunConfig], pipe, output_dir: Path, naive: bool = False) -> dict[RunConfig, dict]:
    """Run every config not already on disk; return ``{config: metrics}`` for all of them."""
    todo = [c for c in configs if not (c.results_dir(output_dir) / "metrics.json").exists()]
    for config in configs:
        if config not in todo:
            logger.info("skipping finished run %s", config.results_dir(output_dir).name)
    if todo:
        df = load_samples(todo[0], pipe.tokenizer)
        predictions: dict[RunConfig, list] = {c: [None] * len(df) for c in todo}
        kv_tokens: dict[RunConfig, list] = {c: [None] * len(df) for c in todo}
        groups = list(df.groupby("context", sort=False))
        for context, group in tqdm(groups, desc=f"{len(todo)} runs x {len(groups)} contexts"):
            first = group.iloc[0]
            max_context = todo[0].max_context_length or 10**9
            inputs = pipe.preprocess(context, group["question"].tolist(), first["answer_prefix"], max_context)
            context_ids = inputs["context_ids"].to(pipe.model.device)
            recorder = None
            for config in todo:
                press = config.make_press()
                max_new = int(first["max_new_tokens"])
                with torch.no_grad():
                    if naive or (press is not None and not can_replay(press)):
                        answers = [
                            pipe(context, question=q, answer_prefix=first["answer_prefix"], press=press,
                                 max_new_tokens=max_new, max_context_length=max_context)["answer"]
                            for q in group["question"]
                        ]
                        tokens = None
                    else:
                        if recorder is None:
                            with PrefillRecorder(pipe.model) as recorder:
                                pipe.model.model(input_ids=context_ids, past_key_values=DynamicCache())
                        cache = recorder.snapshot.replay(press)
                        tokens = sum(cache_lengths(cache)) / len(cache.layers)
                        answers = _answer(pipe, cache, inputs["questions_ids"], context_ids.shape[1], max_new)
                for row, answer in zip(group.index, answers, strict=True):
                    predictions[config][row] = answer
                    kv_tokens[config][row] = tokens
            del recorder
        for config in todo:
            _save_run(config, df, predictions[config], kv_tokens[config], output_dir)
    return {c: json.loads((c.results_dir(output_dir) / "metrics.json").read_text()) for c in configs}


def _save_run(config: RunConfig, df: pd.DataFrame, answers: list, kv_tokens: list, output_dir: Path) -> None:
    run_dir = config.results_dir(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=["context"]).assign(predicted_answer=answers, kv_tokens_per_layer=kv_tokens)
    metrics = score(config.dataset, out.copy())
    out.to_csv(run_dir / "predictions.csv", index=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))  # written last: marks the run finished


# -- reporting -----------------------------------------------------------------------------------------------------
def results_table(results: dict[RunConfig, dict]) -> pd.DataFrame:
    """Average score per press (rows) and compression ratio (columns)."""
    rows = [
        {"press": c.press_name,
         "compression_ratio": c.compression_ratio if takes_compression_ratio(c.press_name) else 0.0,
         "score": average_score(m)}
        for c, m in results.items()
    ]
    table = pd.DataFrame(rows).pivot_table(index="press", columns="compression_ratio", values="score", aggfunc="mean")
    return table.sort_index()


def markdown_table(table: pd.DataFrame) -> str:
    header = ["press \\ compression ratio", *[f"{c:g}" for c in table.columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for press, row in table.iterrows():
        lines.append("| " + " | ".join([str(press), *["" if pd.isna(v) else f"{v:.1f}" for v in row]]) + " |")
    return "\n".join(lines)


def write_report(results: dict[RunConfig, dict], output_dir: Path, title: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results_table(results)
    md_path, png_path = output_dir / "results.md", output_dir / "results.png"
    md_path.write_text(f"{title}\n\n" + markdown_table(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = table.loc["no_press"].dropna() if "no_press" in table.index else None
    presses = table.drop(index="no_press", errors="ignore")
    ratios = [r for r in table.columns if presses[r].notna().any()]
    if len(ratios) == 1:  # one ratio: bars read better than single points
        values = presses[ratios[0]].sort_values()
        ax.barh(values.index, values.values, color="tab:blue")
        ax.set_xlabel(f"score (mean over tasks) at compression ratio {ratios[0]:g}")
        if full is not None:
            ax.axvline(float(full.iloc[0]), color="black", linestyle="--", label="no_press (full cache)")
    else:
        for press, row in presses.iterrows():
            row = row.dropna()
            ax.plot(row.index, row.values, marker="o", label=press)
        if full is not None:
            ax.axhline(float(full.iloc[0]), color="black", linestyle="--", label="no_press (full cache)")
        ax.set_xlabel("compression ratio (fraction of the KV cache removed)")
        ax.set_ylabel("score (mean over tasks)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return md_path, png_path


def compare_naive(configs: list[RunConfig], pipe, output_dir: Path) -> int:
    """Time the same sweep with one prefill per context and with kvpress's loop; predictions must be identical."""
    timings = {}
    for mode in ("prefill_once", "naive"):
        start = time.perf_counter()
        run_sweep(configs, pipe, output_dir / mode, naive=mode == "naive")
        timings[mode] = time.perf_counter() - start
    mismatches = []
    for config in configs:
        once = pd.read_csv(config.results_dir(output_dir / "prefill_once") / "predictions.csv", keep_default_na=False)
        naive = pd.read_csv(config.results_dir(output_dir / "naive") / "predictions.csv", keep_default_na=False)
        if once["predicted_answer"].tolist() != naive["predicted_answer"].tolist():
            mismatches.append(config.results_dir(output_dir).name)
    report = {**{f"{k}_s": round(v, 1) for k, v in timings.items()}, "runs": len(configs),
              "naive_over_prefill_once": round(timings["naive"] / timings["prefill_once"], 2),
              "identical_predictions": not mismatches, "mismatched_runs": mismatches}
    (output_dir / "sweep_cost.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if not mismatches else 1


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",") if x != ""]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ruler", choices=DATASETS)
    parser.add_argument("--data_dir", default="4096",
                        help="ruler: context length; needle_in_haystack: lengths; longbench: subset[:local path]")
    parser.add_argument("--data_source", default="offline", choices=("offline", "hub"), help="ruler only")
    parser.add_argument("--tasks", default=None, help="ruler (offline): comma-separated task subset")
    parser.add_argument("--samples_per_task", type=int, default=None, help="ruler (offline): samples per task")
    parser.add_argument("--model", default=EMBEDDED, help="'embedded' (default) or a hub id / local path")
    parser.add_argument("--press_name", default="no_press", help="comma-separated names from evaluation.registry")
    parser.add_argument("--compression_ratio", default="0.5", help="comma-separated ratios in [0, 1)")
    parser.add_argument("--key_channel_compression_ratio", type=float, default=None,
                        help="ThinK (think, snap_think): share of key channels pruned")
    parser.add_argument("--target_size", type=int, default=None, help="decoding presses: tokens kept")
    parser.add_argument("--compression_interval", type=int, default=None,
                        help="decoding presses: decoding steps between compressions")
    parser.add_argument("--hidden_states_buffer_size", type=int, default=None,
                        help="decoding presses: hidden states kept for scoring")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--max_context_length", type=int, default=None)
    parser.add_argument("--query_aware", action="store_true")
    parser.add_argument("--needle_depth", default=None, help="comma-separated depths in percent")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output_dir", default="results/evaluation")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--naive", action="store_true", help="one pipeline call per run and context (kvpress's loop)")
    parser.add_argument("--compare_naive", action="store_true",
                        help="run the sweep both ways (into prefill_once/ and naive/), print the wall-time ratio and "
                             "check that predictions are identical")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    if not 0.0 < args.fraction <= 1.0:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = _floats(args.compression_ratio)
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            raise SystemExit(f"--compression_ratio values must be in [0, 1), got {ratio}")
    presses = [p for p in args.press_name.split(",") if p]
    options = {"key_channel_compression_ratio": args.key_channel_compression_ratio,
               **{k: getattr(args, k) for k in DECODING_OPTIONS}}
    for name in presses:  # unknown names and missing options fail before any work
        try:
            RunConfig(press_name=name, compression_ratio=ratios[0] if ratios else 0.0, **options).make_press()
        except ValueError as error:
            raise SystemExit(str(error)) from error
    torch.manual_seed(args.seed)
    start = time.time()
    model, tokenizer, _ = load_model(args.model, args.device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    common = dict(dataset=args.dataset, data_dir=args.data_dir, model=args.model, fraction=args.fraction,
                  max_new_tokens=args.max_new_tokens, max_context_length=args.max_context_length,
                  query_aware=args.query_aware, needle_depth=args.needle_depth, data_source=args.data_source,
                  seed=args.seed, tasks=args.tasks, samples_per_task=args.samples_per_task, **options)
    configs = []
    for name in presses:
        for ratio in ratios if takes_compression_ratio(name) else [0.0]:
            config = RunConfig(press_name=name, compression_ratio=ratio, **common)
            if config not in configs:
                configs.append(config)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.compare_naive:
        return compare_naive(configs, pipe, output_dir)
    results = run_sweep(configs, pipe, output_dir, naive=args.naive)
    title = f"{args.dataset} {Path(str(args.data_dir)).name}, {Path(args.model).name}, fraction {args.fraction}"
    if args.samples_per_task:
        title += f", {args.samples_per_task} per task"
    md_path, png_path = write_report(results, output_dir, title)
    print(md_path.read_text())
    print(f"plot: {png_path}\nruns: {output_dir}\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
