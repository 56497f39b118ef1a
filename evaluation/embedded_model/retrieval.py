"""Full-cache RULER accuracy of the embedded MoE against the dense SmolLM2-135M-Instruct, resumable per sample.

    python -m evaluation.embedded_model.retrieval --variant dense   # one process per model (they run in parallel)
    python -m evaluation.embedded_model.retrieval --variant moe
    python -m evaluation.embedded_model.retrieval --report          # table, JSON and plot from what is done

Both models answer the same offline RULER samples (:func:`evaluation.data.ruler.load_ruler`, SmolLM2 tokenizer)
through kvpress's ``kv-press-text-generation`` pipeline with no press, i.e. exactly as the evaluation harness's
``no_press`` runs do (chat template around the context, question after it, greedy decoding). Scores are RULER's:
string match, all references for the niah tasks, any reference for qa (:mod:`evaluation.metrics`).

Each answer is appended to ``<out>/<variant>.jsonl`` as soon as it is produced, with the name of the model folder that
gave it, so an interrupted run resumes where it stopped (a long run on this 2-core machine takes hours) and answers of
an earlier build of the embedded model are never mixed with the current one's. Several processes may answer disjoint
``--tasks`` of one variant at once (one line per write, appended). ``--report`` scores the samples that both models
(the dense model and the build named by ``--model``, default the cached default build) have answered and writes
``retrieval.md``, ``retrieval.json`` and ``retrieval.png`` (per-task accuracy, dense vs MoE) into ``--out``, with a
paired comparison: samples only one model gets right, and a 95% bootstrap interval of the difference of the mean niah
scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from evaluation.data.ruler import RULER_TASKS
from evaluation.embedded_model.build import command_line, repo_root, start_command, write_report

logger = logging.getLogger(__name__)

NIAH_TASKS = tuple(t for t in RULER_TASKS if t.startswith("niah"))
QA_TASKS = tuple(t for t in RULER_TASKS if t.startswith("qa"))
VARIANTS = ("dense", "moe")
DEFAULT_OUT = repo_root() / "measurements" / "retrieval"


def model_label(variant: str, model_dir: Path | None = None) -> str:
    """Name recorded with each answer: the dense model's cache folder, or the embedded build's folder name."""
    from evaluation.embedded_model.build import DENSE_DIRNAME, default_model_dir

    if variant == "dense":
        return DENSE_DIRNAME
    if variant == "moe":
        return Path(model_dir or default_model_dir()).name
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def load_variant(variant: str, model_dir: Path | None = None):
    """``(model, tokenizer)``: the dense SmolLM2 or the embedded MoE, both with the embedded model's tokenizer."""
    from evaluation.embedded_model.build import load_dense, load_embedded_model

    moe, tokenizer = load_embedded_model(model_dir)
    if variant == "moe":
        return moe, tokenizer
    if variant == "dense":
        del moe
        return load_dense()[0], tokenizer
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def interleave_tasks(frame: pd.DataFrame) -> pd.DataFrame:
    """Samples in rounds: sample 0 of every task, then sample 1 of every task, ... (task order kept within a round).

    A run stopped at any point has then covered every task about equally, which a task-by-task order would not.
    """
    rank = {task: i for i, task in enumerate(dict.fromkeys(frame["task"]))}
    order = sorted(frame.index, key=lambda i: (int(frame.at[i, "index"]), rank[frame.at[i, "task"]]))
    return frame.loc[order].reset_index(drop=True)


def read_answers(path: Path, model: str | None = None) -> pd.DataFrame:
    """Answers recorded in ``path`` (by ``model`` only, when given); a line cut by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if model is None or row.get("model") == model:
            rows.append(row)
    return pd.DataFrame(rows, columns=["task", "index", "answer", "predicted_answer", "seconds", "model"])


def done_keys(path: Path, model: str | None = None) -> set[tuple[str, int]]:
    """``(task, index)`` of the samples already answered in ``path`` (by ``model``, when given)."""
    answers = read_answers(path, model)
    return set(zip(answers["task"], answers["index"].astype(int), strict=True))


@torch.no_grad()
def answer_samples(
    variant: str,
    frame: pd.DataFrame,
    out: Path,
    max_new_tokens: int,
    model_dir: Path | None = None,
) -> int:
    """Answer every sample of ``frame`` not yet in ``<out>/<variant>.jsonl``; returns how many were answered now."""
    from tqdm.auto import tqdm
    from transformers import pipeline

    import pikv_press  # noqa: F401  (imports kvpress, which registers the kv-press-text-generation pipeline)

    path = out / f"{variant}.jsonl"
    label = model_label(variant, model_dir)
    done = done_keys(path, label)
    todo = frame[[(t, int(i)) not in done for t, i in zip(frame["task"], frame["index"], strict=True)]]
    logger.info("%s (%s): %d samples done, %d to go", variant, label, len(frame) - len(todo), len(todo))
    if todo.empty:
        return 0
    model, tokenizer = load_variant(variant, model_dir)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # close a line cut by a kill, so that the next record starts a line of its own
        for row in tqdm(todo.itertuples(), total=len(todo), desc=f"RULER {variant}"):
            start = time.perf_counter()
            answer = pipe(
                row.context,
                question=row.question,
                answer_prefix=row.answer_prefix,
                max_new_tokens=min(int(row.max_new_tokens), max_new_tokens),
            )["answer"]
            record = {
                "task": row.task,
                "index": int(row.index),
                "answer": list(row.answer),
                "predicted_answer": answer,
                "seconds": round(time.perf_counter() - start, 2),
                "model": label,
            }
            f.write(json.dumps(record) + "\n")
            f.flush()
    return len(todo)


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def sample_scores(frame: pd.DataFrame) -> pd.Series:
    """Per-sample RULER score in [0, 1] (share of references found; qa: any reference)."""
    from evaluation.metrics import string_match_all, string_match_part

    scores = []
    for row in frame.itertuples():
        metric = string_match_part if row.task.startswith("qa") else string_match_all
        scores.append(metric([row.predicted_answer], [row.answer]) / 100)
    return pd.Series(scores, index=frame.index)


def paired_frame(out: Path, model_dir: Path | None = None) -> pd.DataFrame:
    """One row per sample answered by both models: task, index, dense and moe scores."""
    frames = {}
    for variant in VARIANTS:
        answers = read_answers(out / f"{variant}.jsonl", model_label(variant, model_dir))
        answers = answers.drop_duplicates(["task", "index"], keep="last")
        answers[variant] = sample_scores(answers)
        frames[variant] = answers.set_index(["task", "index"])
    both = frames["dense"][["dense"]].join(frames["moe"][["moe"]], how="inner")
    return both.reset_index()


def bootstrap_interval(diff: torch.Tensor, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``diff``."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (draws, len(diff)), generator=generator)
    means = diff[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def report(out: Path, command: str, model_dir: Path | None = None) -> dict:
    both = paired_frame(out, model_dir)
    if both.empty:
        raise SystemExit(
            f"no sample answered by both the dense model and {model_label('moe', model_dir)} in {out}: "
            "run --variant dense and --variant moe first"
        )
    per_task = both.groupby("task")[["dense", "moe"]].agg(["mean", "count"])
    tasks = [t for t in (*NIAH_TASKS, *QA_TASKS) if t in per_task.index]
    niah = both[both["task"].isin(NIAH_TASKS)]
    result: dict = {"command": command, "model": model_label("moe", model_dir), "tasks": {}}
    for task in tasks:
        group = both[both["task"] == task]
        result["tasks"][task] = {
            "samples": len(group),
            "dense": 100 * group["dense"].mean(),
            "moe": 100 * group["moe"].mean(),
        }
    if not niah.empty:
        diff = torch.tensor((niah["moe"] - niah["dense"]).to_numpy(), dtype=torch.float64)
        low, high = bootstrap_interval(diff)
        result["niah"] = {
            "samples": len(niah),
            "dense": 100 * niah["dense"].mean(),
            "moe": 100 * niah["moe"].mean(),
            "moe_minus_dense": 100 * float(diff.mean()),
            "moe_minus_dense_95ci": [100 * low, 100 * high],
            "only_dense_right": int(((niah["dense"] == 1) & (niah["moe"] < 1)).sum()),
            "only_moe_right": int(((niah["moe"] == 1) & (niah["dense"] < 1)).sum()),
            "both_right": int(((niah["moe"] == 1) & (niah["dense"] == 1)).sum()),
        }
    qa = both[both["task"].isin(QA_TASKS)]
    if not qa.empty:
        result["qa"] = {"samples": len(qa), "dense": 100 * qa["dense"].mean(), "moe": 100 * qa["moe"].mean()}
    write_report(out, "retrieval", result, markdown(result))
    plot(result, out / "retrieval.png")
    return result


def markdown(result: dict) -> str:
    lines = [
        "| RULER-4k task | samples | dense | MoE | MoE - dense |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for task, row in result["tasks"].items():
        lines.append(
            f"| {task} | {row['samples']} | {row['dense']:.1f} | {row['moe']:.1f} | {row['moe'] - row['dense']:+.1f} |"
        )
    for name in ("niah", "qa"):
        if name in result:
            row = result[name]
            label = "**niah (all 8 tasks)**" if name == "niah" else "**qa (both tasks)**"
            lines.append(
                f"| {label} | {row['samples']} | {row['dense']:.1f} | {row['moe']:.1f} | "
                f"{row['moe'] - row['dense']:+.1f} |"
            )
    if "niah" in result:
        n = result["niah"]
        low, high = n["moe_minus_dense_95ci"]
        lines += [
            "",
            f"niah, paired: both right {n['both_right']}, only dense right {n['only_dense_right']}, only MoE right "
            f"{n['only_moe_right']}; MoE - dense {n['moe_minus_dense']:+.1f} points (95% bootstrap interval "
            f"{low:+.1f} to {high:+.1f}).",
        ]
    lines += ["", f"MoE: `{result['model']}`. Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    xs = range(len(tasks))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [result["tasks"][t]["dense"] for t in tasks], width, label="dense SmolLM2")
    ax.bar([x + width / 2 for x in xs], [result["tasks"][t]["moe"] for t in tasks], width, label="embedded MoE")
    ax.set_xticks(list(xs), tasks, rotation=35, ha="right")
    ax.set_ylabel("RULER score (full cache)")
    ax.set_ylim(0, 100)
    ax.set_title("RULER-4k, full cache: dense vs MoEfied SmolLM2-135M-Instruct")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="which model answers (one process per model)")
    parser.add_argument("--report", action="store_true", help="score what both models have answered")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", default=",".join((*NIAH_TASKS, *QA_TASKS)))
    parser.add_argument("--samples-per-task", type=int, default=13)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="cap on each task's generation budget")
    parser.add_argument("--model", type=Path, default=None, help="embedded model folder (default: the cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.variant and not args.report:
        parser.error("give --variant dense|moe, --report, or both")
    start_command(args.threads)
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    if args.variant:
        from evaluation.data.ruler import load_ruler

        frame = load_ruler(args.length, tasks=args.tasks.split(","), n_per_task=args.samples_per_task)
        frame = interleave_tasks(frame.assign(index=frame.groupby("task").cumcount()))
        answer_samples(args.variant, frame, args.out, args.max_new_tokens, args.model)
    if args.report:
        command = command_line("evaluation.embedded_model.retrieval", argv)
        print(markdown(report(args.out, command, args.model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
