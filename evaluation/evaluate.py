"""Evaluate presses on long-context benchmarks, kvpress-style, with one prefill per context.

    python -m evaluation.evaluate --dataset ruler --data_dir 4096 --press_name knorm,snapkv \\
        --compression_ratio 0.25,0.5,0.75 --fraction 0.1 [--scoring teacher_forced]

Flags follow kvpress's ``evaluation/evaluate.py`` (``--dataset --data_dir --model --press_name --compression_ratio
--fraction --max_new_tokens --max_context_length --query_aware --needle_depth --device --output_dir``, and for ThinK
and decoding presses ``--key_channel_compression_ratio --target_size --compression_interval
--hidden_states_buffer_size``); press names and compression ratios take comma-separated lists and the harness runs
every combination (presses that take no ratio run once, under ratio 0). Datasets, scorers and presses come from
:mod:`evaluation.registry`. Defaults: the embedded MoE (built offline on first use) and offline RULER
(``--data_source hub`` reads kvpress's ``simonjegou/ruler``).

Scoring (``--scoring``):

* ``generate`` (default, kvpress's): greedy answers of up to ``max_new_tokens`` tokens, scored by the benchmark's
  metric (RULER: string match).
* ``teacher_forced``: one forward pass over the gold answer after the compressed context and the question
  (:func:`pikv_press.answer.teacher_forced_score`): per sample, whether greedy decoding would write the gold answer
  (exactly; a few greedy tokens before the value are allowed, as a generated answer has them), the share of the gold
  values it writes in order, and the gold answer's mean negative log-likelihood. Costs a few forward tokens instead
  of ``max_new_tokens`` decoding steps; prefill presses only.

Every run writes kvpress's leaderboard layout, ``<output_dir>/<dataset>__<data_dir>__<model>__<press>__<ratio>/``
(plus ``__teacher_forced`` for that scoring) with ``predictions.csv`` (one row per sample, its ``score`` 0-100),
``metrics.json`` and ``config.yaml``; finished runs are skipped, so an interrupted sweep resumes. At the end a
markdown table (``results.md``: samples, score with its 95% bootstrap interval, difference to the full cache with a
paired interval) and a plot (``results.png``) are written to ``output_dir`` (not with ``--no_report``, which
callers that pool many sweeps into one report of their own pass).

Prefill once: prefill presses compress each layer after its attention without changing what flows on, so each
context is prefilled once with :class:`pikv_press.prefill.PrefillRecorder` and every run's press is replayed on the
record (tests show identical caches and answers); answers come from :mod:`pikv_press.answer`. KVzip on an MoE model
replays too (its reconstruction runs once per context on the record; :func:`pikv_press.kvzip.replay`). Other presses
that run their own forward passes (Finch, DecodingPress, ...) fall back to kvpress's pipeline (``generate``) or to a
``with press(model)`` prefill (``teacher_forced``), and their ``press_seconds`` is their time beyond a plain prefill.
``--naive`` runs kvpress's loop instead: one full pipeline call per run and context (for comparison; it gives the
same predictions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from kvpress import DecodingPress, PrefillDecodingPress
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from evaluation import cli
from evaluation.models import EMBEDDED, is_embedded, load_model, model_tag
from evaluation.registry import (
    BENCHMARKS,
    DECODING_OPTIONS,
    benchmark,
    is_decoding_press,
    press_for_run,
    takes_compression_ratio,
)
from evaluation.stats import bootstrap_interval, paired_difference, task_mean
from pikv_press import cache_lengths, make_cache
from pikv_press.answer import answer_questions, teacher_forced_score
from pikv_press.cache import CACHES
from pikv_press.prefill import PrefillRecorder, can_replay

logger = logging.getLogger("evaluation.evaluate")

SCORINGS = {
    "generate": "generated answers, string match",
    "teacher_forced": "teacher-forced: greedy writes the gold answer exactly",
}


@dataclass(frozen=True)
class RunConfig:
    """One (dataset, model, press, ratio, scoring) evaluation, as kvpress's EvaluationConfig names it."""

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
    scoring: str = "generate"
    cache: str = "dynamic"

    def make_press(self):
        """A fresh press for this run (see :func:`evaluation.registry.press_for_run`)."""
        return press_for_run(self.press_name, self.compression_ratio,
                             key_channel_compression_ratio=self.key_channel_compression_ratio,
                             **{k: getattr(self, k) for k in DECODING_OPTIONS})

    @property
    def ratio(self) -> float:
        """The ratio the run is filed under (0 for presses that take none)."""
        return self.compression_ratio if takes_compression_ratio(self.press_name) else 0.0

    def results_dir(self, output_dir: Path) -> Path:
        data = str(self.data_dir).split(":")[0]  # longbench "subset:local file" -> subset
        data = Path(data).stem if "/" in data else data
        parts = [self.dataset, data, model_tag(self.model), self.press_name, f"{self.ratio:.2f}"]
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
        if self.cache != "dynamic":
            parts.append(f"cache-{self.cache}")
        if self.scoring != "generate":
            parts.append(self.scoring)
        return output_dir / "__".join(parts)

    def new_cache(self, model):
        """An empty cache of this run's kind (``--cache``, :func:`pikv_press.make_cache`)."""
        return make_cache(self.cache, model.config)

    def reference(self) -> RunConfig:
        """The full-cache run this run is compared with (same data and scoring, ``no_press``)."""
        plain = {k: None for k in ("key_channel_compression_ratio", *DECODING_OPTIONS)}
        return RunConfig(**{**asdict(self), **plain, "press_name": "no_press", "compression_ratio": 0.0})


# -- data ----------------------------------------------------------------------------------------------------------
def load_samples(config: RunConfig, tokenizer) -> pd.DataFrame:
    """The dataset in kvpress's record layout (context, question, answer_prefix, answer, task, max_new_tokens), from
    :data:`evaluation.registry.DATASET_REGISTRY`.

    ``data_dir`` may also be a local ``.jsonl``/``.parquet`` file in that layout (any dataset).
    """
    local = Path(str(config.data_dir))
    if local.suffix in (".jsonl", ".parquet") and local.exists():
        df = pd.read_parquet(local) if local.suffix == ".parquet" else pd.read_json(local, lines=True)
    else:
        # the embedded model's tokenizer is SmolLM2's, the data modules' default (their caches are shared)
        df = benchmark(config.dataset).load_samples(
            config.data_dir,
            tokenizer=None if is_embedded(config.model) else tokenizer,
            tasks=cli.comma_list(config.tasks) or None,
            samples_per_task=config.samples_per_task,
            data_source=config.data_source,
            needle_depth=config.needle_depth,
        )
    if config.fraction < 1.0:
        df = df.sample(frac=config.fraction, random_state=config.seed)
    if config.max_new_tokens is not None:
        df = df.assign(max_new_tokens=config.max_new_tokens)
    if config.query_aware:  # the question is part of the compressed context, as in kvpress
        df = df.assign(context=df["context"] + df["question"], question="")
    return df.reset_index(drop=True)


# -- running -------------------------------------------------------------------------------------------------------
def _score_questions(config: RunConfig, pipe, cache, questions_ids, group: pd.DataFrame, context_length: int,
                     max_new_tokens: int) -> list[dict]:
    """One row of results per question of ``group`` from the compressed ``cache`` (left as it was)."""
    model, tokenizer = pipe.model, pipe.tokenizer
    if config.scoring == "generate":
        start = time.perf_counter()
        answers = answer_questions(model, tokenizer, cache, questions_ids, context_length, max_new_tokens)
        seconds = (time.perf_counter() - start) / len(answers)
        return [{"predicted_answer": answer, "answer_seconds": seconds} for answer in answers]
    rows = []
    bench = BENCHMARKS[config.dataset] if config.dataset in BENCHMARKS else None
    for question_ids, (_, sample) in zip(questions_ids, group.iterrows(), strict=True):
        start = time.perf_counter()
        match = bench.match_mode(sample["task"]) if bench is not None else "any"
        result = teacher_forced_score(model, tokenizer, cache, question_ids, context_length, list(sample["answer"]),
                                      match=match, max_new_tokens=max_new_tokens)
        rows.append({"predicted_answer": "", "tf_exact": result.exact, "tf_share": result.share,
                     "tf_values": json.dumps(result.values), "nll": result.nll, "lead_in": json.dumps(result.lead_in),
                     "answer_seconds": time.perf_counter() - start})
    return rows


def _pipeline_rows(config: RunConfig, pipe, press, context: str, group: pd.DataFrame, max_context: int,
                   max_new: int) -> list[dict]:
    """kvpress's own loop (``--naive``, and presses that cannot be replayed): prefill with the press, then answer.

    Returns the rows and, when teacher-forced, the seconds of the compressed prefill (the press's own passes
    included; ``None`` when generating, where the prefill is inside the pipeline's call)."""
    first = group.iloc[0]
    if config.scoring == "generate":
        rows = []
        for question in group["question"]:
            start = time.perf_counter()
            answer = pipe(context, question=question, answer_prefix=first["answer_prefix"], press=press,
                          max_new_tokens=max_new, max_context_length=max_context,
                          cache=config.new_cache(pipe.model))["answer"]
            rows.append({"predicted_answer": answer, "answer_seconds": time.perf_counter() - start})
        return rows, None
    inputs = pipe.preprocess(context, group["question"].tolist(), first["answer_prefix"], max_context)
    context_ids = inputs["context_ids"].to(pipe.model.device)
    cache = config.new_cache(pipe.model)
    start = time.perf_counter()
    with torch.no_grad(), press(pipe.model) if press is not None else contextlib.nullcontext():
        pipe.model.model(input_ids=context_ids, past_key_values=cache)
    seconds = time.perf_counter() - start
    rows = _score_questions(config, pipe, cache, inputs["questions_ids"], group, context_ids.shape[1], max_new)
    return rows, seconds


def _record_prefill(pipe, context_ids: torch.Tensor):
    """One full-cache prefill of the context, recorded for replay; returns (recorder, its seconds)."""
    start = time.perf_counter()
    with PrefillRecorder(pipe.model) as recorder:
        pipe.model.model(input_ids=context_ids, past_key_values=DynamicCache())
    return recorder, time.perf_counter() - start


def run_sweep(configs: list[RunConfig], pipe, output_dir: Path, naive: bool = False) -> dict[RunConfig, dict]:
    """Run every config not already on disk; return ``{config: metrics}`` for all of them."""
    todo = [c for c in configs if not (c.results_dir(output_dir) / "metrics.json").exists()]
    for config in configs:
        if config not in todo:
            logger.info("skipping finished run %s", config.results_dir(output_dir).name)
    if todo:
        df = load_samples(todo[0], pipe.tokenizer)
        rows: dict[RunConfig, list] = {c: [None] * len(df) for c in todo}
        groups = list(df.groupby("context", sort=False))
        for context, group in tqdm(groups, desc=f"{len(todo)} runs x {len(groups)} contexts"):
            first = group.iloc[0]
            max_context = todo[0].max_context_length or 10**9
            max_new = int(first["max_new_tokens"])
            inputs = pipe.preprocess(context, group["question"].tolist(), first["answer_prefix"], max_context)
            context_ids = inputs["context_ids"].to(pipe.model.device)
            recorder, prefill_seconds = None, 0.0
            for config in todo:
                press = config.make_press()
                with torch.no_grad():
                    if naive or (press is not None and not can_replay(press, pipe.model)):
                        results, seconds = _pipeline_rows(config, pipe, press, context, group, max_context, max_new)
                        tokens, press_seconds = None, 0.0
                        if seconds is not None and not naive and press is not None:
                            # a press with its own passes (KVzip): its time beyond a plain prefill of the context
                            if recorder is None:
                                recorder, prefill_seconds = _record_prefill(pipe, context_ids)
                            press_seconds = max(0.0, seconds - prefill_seconds)
                    else:
                        if recorder is None:
                            recorder, prefill_seconds = _record_prefill(pipe, context_ids)
                        start = time.perf_counter()
                        cache = recorder.snapshot.replay(press, cache_factory=lambda c=config: c.new_cache(pipe.model))
                        press_seconds = time.perf_counter() - start
                        tokens = sum(cache_lengths(cache)) / len(cache.layers)
                        results = _score_questions(config, pipe, cache, inputs["questions_ids"], group,
                                                   context_ids.shape[1], max_new)
                for row, result in zip(group.index, results, strict=True):
                    rows[config][row] = {**result, "kv_tokens_per_layer": tokens,
                                         "prefill_seconds": prefill_seconds / len(group),
                                         "press_seconds": press_seconds / len(group)}
            del recorder
        for config in todo:
            _save_run(config, df, rows[config], output_dir)
    return {c: json.loads((c.results_dir(output_dir) / "metrics.json").read_text()) for c in configs}


def sample_scores(config: RunConfig, out: pd.DataFrame) -> pd.Series:
    """Each sample's score, 0-100: the benchmark's metric of the answer, or the teacher-forced share."""
    if config.scoring == "teacher_forced":
        return 100.0 * out["tf_share"].astype(float)
    return benchmark(config.dataset).sample_scores(out)


def _metrics(config: RunConfig, out: pd.DataFrame) -> dict:
    if config.scoring == "generate":
        return benchmark(config.dataset).calculate_metrics(out.copy())
    return {str(task): {"teacher_forced": round(float(group["score"].mean()), 2),
                        "nll": round(float(group["nll"].mean()), 4)}
            for task, group in out.groupby("task")}


def _save_run(config: RunConfig, df: pd.DataFrame, rows: list[dict], output_dir: Path) -> None:
    run_dir = config.results_dir(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = pd.concat([df.drop(columns=["context"]), pd.DataFrame(rows, index=df.index)], axis=1)
    out["score"] = sample_scores(config, out)
    metrics = _metrics(config, out)
    out.to_csv(run_dir / "predictions.csv", index=False)
    meta = {**asdict(config), "model_folder": model_tag(config.model)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))  # written last: marks the run finished


def read_predictions(path: Path) -> pd.DataFrame:
    """A run's predictions, answers as text (``"7481."`` must not become a float)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"predicted_answer": str})


# -- reporting -----------------------------------------------------------------------------------------------------
def results_table(configs: list[RunConfig], output_dir: Path) -> pd.DataFrame:
    """One row per run: press, ratio, samples, score (mean over tasks of the mean sample score) with its 95%
    bootstrap interval, and the paired difference to the full cache with its interval (NaN without a full-cache
    run on the same samples)."""
    rows = []
    for config in configs:
        out = read_predictions(config.results_dir(output_dir) / "predictions.csv")
        scores, tasks = out["score"].to_numpy(float), out["task"].astype(str).to_numpy()
        low, high = bootstrap_interval(scores, tasks)
        row = {"press": config.press_name, "compression_ratio": config.ratio, "n": len(out),
               "score": task_mean(scores, tasks), "low": low, "high": high,
               "delta": float("nan"), "delta_low": float("nan"), "delta_high": float("nan")}
        reference = config.reference().results_dir(output_dir) / "predictions.csv"
        if config.press_name != "no_press" and reference.exists():
            full = read_predictions(reference)
            if len(full) == len(out) and (full["question"].tolist() == out["question"].tolist()):
                delta, d_low, d_high = paired_difference(scores, full["score"].to_numpy(float), tasks)
                row.update(delta=delta, delta_low=d_low, delta_high=d_high)
        if config.scoring == "teacher_forced":
            row["nll"] = float(out["nll"].astype(float).mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(["press", "compression_ratio"]).reset_index(drop=True)


def markdown_table(table: pd.DataFrame) -> str:
    """Full cache first, then presses by score."""
    table = table.assign(_full=table["press"] != "no_press").sort_values(["_full", "score"], ascending=[True, False])
    has_nll = "nll" in table
    header = ["press", "ratio", "n", "score [95% CI]", "vs full cache [95% CI, paired]", *(["gold NLL"] * has_nll)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        delta = "" if pd.isna(r["delta"]) else f"{r['delta']:+.1f} [{r['delta_low']:+.1f}, {r['delta_high']:+.1f}]"
        cells = [r["press"], f"{r['compression_ratio']:g}", str(int(r["n"])),
                 f"{r['score']:.1f} [{r['low']:.1f}, {r['high']:.1f}]", delta]
        if has_nll:
            cells.append(f"{r['nll']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: pd.DataFrame, path: Path, title: str, score_label: str) -> Path:
    """Score of each press with its 95% interval; the full cache as a dashed line in its grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table[table["press"] == "no_press"]
    presses = table[table["press"] != "no_press"]
    ratios = sorted(presses["compression_ratio"].unique())
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * max(len(presses), 6) + 1.8 if len(ratios) <= 1 else 4.8))
    if len(ratios) <= 1:  # one ratio: sorted bars with their intervals read best
        bars = presses.sort_values("score")
        err = [(bars["score"] - bars["low"]).to_numpy(), (bars["high"] - bars["score"]).to_numpy()]
        ax.barh(bars["press"].tolist(), bars["score"].to_numpy(), xerr=err, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xlabel(f"{score_label} at compression ratio {ratios[0]:g}" if ratios else score_label)
        if len(full):
            ref = full.iloc[0]
            ax.axvspan(float(ref["low"]), float(ref["high"]), color="grey", alpha=0.2)
            ax.axvline(float(ref["score"]), color="black", linestyle="--", label="full cache (no_press), 95% CI")
        ax.set_xlim(0, 100)
    else:
        for press, group in presses.groupby("press"):
            group = group.sort_values("compression_ratio")
            ax.errorbar(group["compression_ratio"].to_numpy(), group["score"].to_numpy(), capsize=3, marker="o",
                        label=press, yerr=[(group["score"] - group["low"]).to_numpy(),
                                           (group["high"] - group["score"]).to_numpy()])
        if len(full):
            ref = full.iloc[0]
            ax.axhspan(float(ref["low"]), float(ref["high"]), color="grey", alpha=0.2)
            ax.axhline(float(ref["score"]), color="black", linestyle="--", label="full cache (no_press), 95% CI")
        ax.set_xlabel("compression ratio (fraction of the KV cache removed)")
        ax.set_ylabel(score_label)
    ax.set_title("\n".join(textwrap.wrap(title, width=90, break_long_words=False)), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(configs: list[RunConfig], output_dir: Path, title: str) -> tuple[Path, Path]:
    """``results.md`` and ``results.png`` in ``output_dir`` for the runs ``configs`` (all of one scoring)."""
    scorings = {c.scoring for c in configs}
    if len(scorings) != 1:
        raise ValueError(f"one report per scoring, got {sorted(scorings)}")
    scoring = scorings.pop()
    table = results_table(configs, output_dir)
    n = int(table["n"].max()) if len(table) else 0
    title = f"{title}\nscoring: {SCORINGS[scoring]}\n{n} samples; bars: 95% bootstrap intervals"
    md_path, png_path = output_dir / "results.md", output_dir / "results.png"
    note = ("Score: mean over tasks of the per-sample score (0-100). Intervals: 95% bootstrap over samples (within "
            "tasks); the difference to the full cache is paired (same samples).")
    md_path.write_text(f"{title}\n\n{markdown_table(table)}\n\n{note}\n")
    plot_table(table, png_path, title, "score (0-100)" if scoring == "generate" else "teacher-forced exact (0-100)")
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
        once = read_predictions(config.results_dir(output_dir / "prefill_once") / "predictions.csv")
        naive = read_predictions(config.results_dir(output_dir / "naive") / "predictions.csv")
        columns = ["predicted_answer", "score"]
        if once[columns].values.tolist() != naive[columns].values.tolist():
            mismatches.append(config.results_dir(output_dir).name)
    report = {**{f"{k}_s": round(v, 1) for k, v in timings.items()}, "runs": len(configs),
              "naive_over_prefill_once": round(timings["naive"] / timings["prefill_once"], 2),
              "identical_predictions": not mismatches, "mismatched_runs": mismatches}
    (output_dir / "sweep_cost.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if not mismatches else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ruler", choices=tuple(BENCHMARKS))
    parser.add_argument("--data_dir", default="4096",
                        help="ruler: context length; needle_in_haystack: lengths; longbench: subset[:local path]")
    parser.add_argument("--data_source", default="offline", choices=("offline", "hub"), help="ruler only")
    parser.add_argument("--tasks", default=None, help="ruler (offline): comma-separated task subset")
    parser.add_argument("--samples_per_task", type=int, default=None, help="ruler (offline): samples per task")
    parser.add_argument("--model", default=EMBEDDED,
                        help="'embedded' (default), 'embedded-sparse8' (8 of 64 experts) or a hub id / local path")
    parser.add_argument("--press_name", default="no_press", help="comma-separated names from evaluation.registry")
    parser.add_argument("--compression_ratio", default="0.5", help="comma-separated ratios in [0, 1)")
    parser.add_argument("--scoring", default="generate", choices=tuple(SCORINGS),
                        help="generate: greedy answers scored by the benchmark; teacher_forced: one forward pass "
                             "over the gold answer (exact greedy verdict and NLL; prefill presses only)")
    parser.add_argument("--cache", default="dynamic", choices=tuple(CACHES),
                        help="the KV cache the press compresses and answers read (pikv_press.make_cache)")
    parser.add_argument("--key_channel_compression_ratio", type=float, default=None,
                        help="ThinK (think, snap_think): share of key channels pruned")
    parser.add_argument("--target_size", type=int, default=None, help="decoding presses: tokens kept")
    parser.add_argument("--compression_interval", type=int, default=None,
                        help="decoding presses: decoding steps between compressions")
    parser.add_argument("--hidden_states_buffer_size", type=int, default=None,
                        help="decoding presses: hidden states kept for scoring")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--no_report", action="store_true",
                        help="write the runs only, no results.md / results.png (for callers that pool many sweeps "
                             "into their own report, such as evaluation.routing_ablation)")
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


def _check_press(name: str, ratio: float, scoring: str, options: dict) -> None:
    """Unknown names, missing options and presses the scoring cannot run fail before any work."""
    try:
        press = RunConfig(press_name=name, compression_ratio=ratio, **options).make_press()
    except ValueError as error:
        raise SystemExit(str(error)) from error
    if scoring == "teacher_forced" and isinstance(press, DecodingPress | PrefillDecodingPress):
        raise SystemExit(f"{name} compresses while decoding, so teacher-forced scoring (one forward over the gold "
                         "answer) cannot run it: use --scoring generate for decoding presses.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup(args.threads)
    if not 0.0 < args.fraction <= 1.0:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    try:
        ratios = cli.comma_list(args.compression_ratio, float)
    except ValueError as error:
        raise SystemExit(f"--compression_ratio: {error}") from error
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            raise SystemExit(f"--compression_ratio values must be in [0, 1), got {ratio}")
    presses = cli.comma_list(args.press_name)
    options = {"key_channel_compression_ratio": args.key_channel_compression_ratio,
               **{k: getattr(args, k) for k in DECODING_OPTIONS}}
    for name in presses:
        _check_press(name, ratios[0] if ratios else 0.0, args.scoring, options)
    torch.manual_seed(args.seed)
    start = time.time()
    model, tokenizer, label = load_model(args.model, args.device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    common = dict(dataset=args.dataset, data_dir=args.data_dir, model=args.model, fraction=args.fraction,
                  max_new_tokens=args.max_new_tokens, max_context_length=args.max_context_length,
                  query_aware=args.query_aware, needle_depth=args.needle_depth, data_source=args.data_source,
                  seed=args.seed, tasks=args.tasks, samples_per_task=args.samples_per_task, scoring=args.scoring,
                  cache=args.cache, **options)
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
    run_sweep(configs, pipe, output_dir, naive=args.naive)
    if args.no_report:
        print(f"runs: {output_dir}\ntotal {time.time() - start:.0f} s")
        return 0
    title = f"{args.dataset} {Path(str(args.data_dir)).name}, {label}"
    if args.fraction < 1.0:
        title += f", fraction {args.fraction}"
    md_path, png_path = write_report(configs, output_dir, title)
    print(md_path.read_text())
    print(f"plot: {png_path}\nruns: {output_dir}\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
