"""Ablation of the routing presses on the embedded MoE: RULER, teacher-forced, paired intervals, resumable by chunk.

    python -m evaluation.routing_ablation [--length 1024] [--chunks 10] [--chunk_size 1] [--ratios 0.5,0.75]
                                          [--presses no_press,tova,...] [--tasks niah_single_1,...] [--threads 1]
                                          [--model embedded|embedded-sparse8]

The samples of every RULER task at ``--length`` are cut into chunks (chunk ``k`` holds samples ``k * chunk_size`` to
``(k + 1) * chunk_size - 1`` of each task, written as a local dataset file), and each chunk is one
:mod:`evaluation.evaluate` sweep (teacher-forced scoring, one prefill per context, every press replayed on it).
Finished chunks are skipped, so an interrupted ablation resumes where it stopped and a later call with more chunks
adds samples. The report (``ablation.md`` in ``--output_dir``) pools the finished chunks that hold every press and
ratio: per press and ratio the score (mean over tasks, 0-100) with its 95% bootstrap interval, and paired differences
to the full cache and to the base press TOVA at the same ratio. ``--model`` chooses the embedded model's variant
(``embedded-sparse8``: 8 of 64 routed experts per token); run folders are named after its artifact, so the runs of
two variants never mix, though a separate ``--output_dir`` per variant keeps the reports apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import cli, evaluate
from evaluation.benchmarks import ruler
from evaluation.data.ruler import RulerGenerationError
from evaluation.models import EMBEDDED, model_tag
from evaluation.stats import bootstrap_interval, paired_difference, task_mean

BASELINES = ("tova", "streaming_llm", "snapkv", "knorm")
ROUTING = ("expert_balanced_tova", "router_affinity_tova", "routing_novelty_tova")
DEFAULT_PRESSES = ("no_press", *BASELINES, *ROUTING)
REFERENCE = "tova"
FEATURE_PREFIXES = ("expert_balanced_", "router_affinity_", "routing_novelty_", "layer_budget_")
VARIANT_SUFFIXES = ("_predicted", "_top4")
# RULER's retrieval tasks. The aggregation tasks (cwe, fwe) and variable tracking (vt) are left out by default: the
# embedded 135M model scores ~0 on them with the full cache, so they cannot show a press's loss, and scoring their
# many values by teacher forcing costs ~10x a retrieval sample.
DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                 "niah_multikey_3", "niah_multivalue", "niah_multiquery", "qa_1")


def chunk_file(output_dir: Path, length: int, chunk: int, chunk_size: int, tasks: list[str],
               create: bool = True) -> Path | None:
    """The dataset file of one chunk (written once from the offline RULER cache; ``create=False``: ``None`` when it
    was never written). Raises :class:`~evaluation.data.ruler.RulerGenerationError` when RULER cannot make that many
    samples of a task at this length (``qa_2`` at 2k tokens has 6)."""
    # a different task list never reuses a chunk (one task: its name; several: their count and total name length)
    tag = f"task-{tasks[0]}" if len(tasks) == 1 else f"{len(tasks)}tasks{sum(map(len, tasks))}"
    path = output_dir / "data" / f"ruler{length}_{tag}_size{chunk_size}_chunk{chunk:03d}.jsonl"
    if not path.exists():
        if not create:
            return None
        df = ruler.load_samples(str(length), tasks=tasks, samples_per_task=(chunk + 1) * chunk_size)
        part = df.groupby("task", sort=False).nth(list(range(chunk * chunk_size, (chunk + 1) * chunk_size)))
        if part.empty:
            raise SystemExit(f"RULER {length} has no samples for chunk {chunk}: generate more with "
                             f"`python -m evaluation.data.ruler --lengths {length} --samples N`.")
        path.parent.mkdir(parents=True, exist_ok=True)
        part.to_json(path, orient="records", lines=True)
    return path


def run_chunk(path: Path, presses: list[str], ratios: str, runs_dir: Path, threads: int | None,
              model: str = EMBEDDED, scoring: str = "teacher_forced") -> int:
    argv = ["--dataset", "ruler", "--data_dir", str(path), "--model", model, "--press_name", ",".join(presses),
            "--compression_ratio", ratios, "--scoring", scoring, "--max_new_tokens", "32",
            "--output_dir", str(runs_dir), "--no_report"]  # the ablation's report pools every chunk
    if threads:
        argv += ["--threads", str(threads)]
    return evaluate.main(argv)


def reference_press(press: str, presses: list[str]) -> str | None:
    """The press that ``press`` is paired against, the same press with one thing switched off: a variant
    (``expert_balanced_tova_predicted``) against the press it varies (``expert_balanced_tova``: predicted vs actual
    routing), a routing feature (``expert_balanced_streaming_llm``) against its base scorer (``streaming_llm``), a
    base scorer against nothing. Only presses in ``presses`` are references."""
    for suffix in VARIANT_SUFFIXES:
        if press.endswith(suffix) and press.removesuffix(suffix) in presses:
            return press.removesuffix(suffix)
    for prefix in FEATURE_PREFIXES:
        if press.startswith(prefix) and press.removeprefix(prefix) in presses:
            return press.removeprefix(prefix)
    return None


def _run_dir(runs_dir: Path, path: Path, press: str, ratio: float, model: str = EMBEDDED,
             scoring: str = "teacher_forced") -> Path:
    """The folder :mod:`evaluation.evaluate` files the run under (its own naming: a generated run has no scoring
    suffix)."""
    config = evaluate.RunConfig(dataset="ruler", data_dir=str(path), model=model, press_name=press,
                                compression_ratio=0.0 if press == "no_press" else ratio, scoring=scoring)
    return config.results_dir(runs_dir)


def report(output_dir: Path, files: list[Path], presses: list[str], ratios: list[float],
           tasks: list[str] | None = None, model: str = EMBEDDED, base: str = REFERENCE,
           scoring: str = "teacher_forced") -> str:
    """The pooled table of the chunks in ``files`` that hold every run of ``model`` (their samples of ``tasks``
    only, if given); a base scorer is paired against ``base``. ``scoring="generate"``: greedy answers scored by
    RULER's string match (no gold NLL)."""
    runs_dir = output_dir / "runs"
    wanted = [(p, r) for p in presses for r in ([0.0] if p == "no_press" else ratios)]
    complete = [f for f in files
                if all((_run_dir(runs_dir, f, p, r, model, scoring) / "metrics.json").exists() for p, r in wanted)]
    if not complete:
        return "no finished chunk yet"
    scores = {}
    for press, ratio in wanted:
        parts = [evaluate.read_predictions(_run_dir(runs_dir, f, press, ratio, model, scoring) / "predictions.csv")
                 for f in complete]
        pooled = pd.concat(parts, ignore_index=True)
        scores[(press, ratio)] = pooled if tasks is None else pooled[pooled["task"].isin(tasks)].reset_index(drop=True)
    full = scores[("no_press", 0.0)]
    tasks = full["task"].astype(str).to_numpy()
    per_task = pd.Series(tasks).value_counts()
    n_tasks = len(per_task)
    fewest, most = (per_task.min(), per_task.max()) if n_tasks else (0, 0)
    per_task_text = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    how = ("teacher-forced (greedy writes the gold answer exactly)" if scoring == "teacher_forced" else
           "generated (greedy answers, RULER's string match)")
    lines = [f"RULER-{_length(complete[0])}, embedded model `{model_tag(model)}`, {how}, {len(full)} samples "
             f"({n_tasks} tasks, {per_task_text} per task), 95% bootstrap intervals "
             "(paired where a difference is shown).", "",
             "| press | ratio | score [95% CI] | vs full cache [paired] | vs reference, same ratio [paired] | "
             "reference | gold NLL | NLL vs reference [paired] | replay time / prefill time | KV rows held |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for press, ratio in wanted:
        out = scores[(press, ratio)]
        if out["question"].tolist() != full["question"].tolist():
            raise ValueError(f"{press}@{ratio}: samples differ from the full cache's")
        s = out["score"].to_numpy(float)
        low, high = bootstrap_interval(s, tasks)
        cells = [press, f"{ratio:g}", f"{task_mean(s, tasks):.1f} [{low:.1f}, {high:.1f}]"]
        reference = reference_press(press, presses)
        if press != "no_press" and reference is None and press != base:
            reference = base if base in presses else None  # a base scorer against the base press
        for ref in (("no_press", 0.0), (reference, ratio)):
            if press == ref[0] or ref not in scores:
                cells.append("")
                continue
            d, d_low, d_high = paired_difference(s, scores[ref]["score"].to_numpy(float), tasks)
            cells.append(f"{d:+.1f} [{d_low:+.1f}, {d_high:+.1f}]")
        cells.append(reference if (reference, ratio) in scores else "")
        has_nll = "nll" in out and out["nll"].notna().all()
        cells.append(f"{np.mean(out['nll'].astype(float)):.3f}" if has_nll else "")
        if (reference, ratio) not in scores or not has_nll:
            cells.append("")
        else:
            d, d_low, d_high = paired_difference(out["nll"].to_numpy(float),
                                                 scores[(reference, ratio)]["nll"].to_numpy(float), tasks)
            cells.append(f"{d:+.3f} [{d_low:+.3f}, {d_high:+.3f}]")
        share = out["press_seconds"].astype(float).sum() / out["prefill_seconds"].astype(float).sum()
        cells.append(f"{100 * share:.1f}%")
        cells.append(_rows_held(out, full))
        lines.append("| " + " | ".join(cells) + " |")
    per_task = {p: {t: round(float(g['score'].mean()), 1) for t, g in scores[(p, r)].groupby("task")}
                for p, r in wanted if r in (0.0, max(ratios))}
    lines += ["", "Reference: the same press with one thing off (a routing feature against its base scorer, "
              f"predicted routing against the layer's own routing); a base scorer against `{base}`.", "",
              "Gold NLL: mean negative log-likelihood per gold-answer token (lower is better; a paired difference "
              "below 0 means the press keeps what the answer needs better than its reference).", "",
              "Replay time: replaying the press on the recorded prefill (copy of the full cache included), as a "
              "share of the recorded prefill's time, on a shared CPU.", "",
              "KV rows held: the rows the compressed cache keeps in memory (mean over layers, summed over samples) "
              "as a share of the full cache's; a press that masks instead of evicting holds 100%; blank where the "
              "press ran its own passes (no replayed cache to count).", "",
              f"Per task at ratio {max(ratios):g} (and full cache): `{json.dumps(per_task)}`"]
    return "\n".join(lines)


def _rows_held(out: pd.DataFrame, full: pd.DataFrame) -> str:
    """The KV rows the press's cache holds as a share of the full cache's (``kv_tokens_per_layer``), or blank."""
    if "kv_tokens_per_layer" not in out or "kv_tokens_per_layer" not in full:
        return ""
    held, whole = out["kv_tokens_per_layer"].astype(float), full["kv_tokens_per_layer"].astype(float)
    if held.isna().any() or whole.isna().any() or whole.sum() == 0:
        return ""
    return f"{100 * held.sum() / whole.sum():.0f}%"


def _length(path: Path) -> str:
    return path.stem.split("_")[0].removeprefix("ruler")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=10, help="chunks to run (finished ones are skipped)")
    parser.add_argument("--first_chunk", type=int, default=0, help="start at this chunk (earlier ones not pooled)")
    parser.add_argument("--chunk_size", type=int, default=1, help="samples per task in one chunk")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--presses", default=",".join(DEFAULT_PRESSES))
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=EMBEDDED, help="'embedded' (default) or a variant ('embedded-sparse8')")
    parser.add_argument("--output_dir", default="measurements/routing_ablation")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--base", default=REFERENCE, help="the press that base scorers are paired against")
    parser.add_argument("--scoring", default="teacher_forced", choices=("teacher_forced", "generate"),
                        help="generate: greedy answers scored by RULER's string match (report: ablation_generated.md)")
    parser.add_argument("--split_tasks", action="store_true",
                        help="one file (and evaluation sweep) per task in a chunk: resumable per context at long "
                             "lengths, where a chunk of every task takes an hour")
    parser.add_argument("--report_name", default=None,
                        help="file of the report in --output_dir (default: ablation.md, generated: "
                             "ablation_generated.md); another name keeps a sub-study's report beside the main one")
    parser.add_argument("--pool_with", default="",
                        help="chunk files of other runs (another task list) whose samples of --tasks are pooled too")
    args = parser.parse_args(argv)
    cli.setup(args.threads)
    output_dir = Path(args.output_dir)
    presses = cli.comma_list(args.presses)
    ratios = cli.comma_list(args.ratios, float)
    files = []
    tasks = cli.comma_list(args.tasks)
    name = args.report_name or ("ablation.md" if args.scoring == "teacher_forced" else "ablation_generated.md")
    for chunk in range(args.first_chunk, args.chunks):
        parts = [[t] for t in tasks] if args.split_tasks else [tasks]
        for number, part in enumerate(parts, start=1):
            try:  # the report pools the chunk files that exist; it never generates data
                path = chunk_file(output_dir, args.length, chunk, args.chunk_size, part, create=not args.report_only)
            except RulerGenerationError as exc:
                if not args.split_tasks:
                    raise SystemExit(f"{exc}: leave that task out of --tasks, or use --split_tasks to run the "
                                     "samples each task has.") from exc
                print(f"skipped: {exc} (chunk {chunk}; the report has fewer samples of {part[0]})")
                continue
            if path is None:
                continue
            files.append(path)
            if not args.report_only:
                status = run_chunk(path, presses, args.ratios, output_dir / "runs", args.threads, args.model,
                                   args.scoring)
                if status:
                    return status
                if number == len(parts):  # once per chunk: the report reads every finished run
                    text = report(output_dir, files, presses, ratios, tasks, args.model, args.base, args.scoring)
                    (output_dir / name).write_text(text + "\n")
    files += [Path(f) for f in cli.comma_list(args.pool_with)]
    text = report(output_dir, files, presses, ratios, tasks, args.model, args.base, args.scoring)
    (output_dir / name).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
