"""The main job of ``make demo``: the embedded MoE on RULER, full cache vs every baseline press, with intervals.

    python -m evaluation.demo [--length 1024] [--tasks niah_single_1,...] [--samples_per_task 8] [--ratio 0.5]
                              [--scoring teacher_forced|generate]

On first run it builds the embedded model (``evaluation.embedded_model``) and the RULER data
(``evaluation.data.ruler``) into ``.cache/``; later runs reuse both, and finished evaluation runs in
``results/demo/`` are skipped. It then runs :mod:`evaluation.evaluate` with one prefill per context: the full cache
(``no_press``), kvpress's baselines (:data:`evaluation.registry.BASELINE_PRESSES`: Knorm, SnapKV, StreamingLLM,
ExpectedAttention with AdaKV, TOVA, KeyDiff, PyramidKV) and every pikv-press press of the registry, scored by teacher
forcing (does greedy decoding write the gold answer, exactly; one forward pass over it instead of decoding), and
prints the results table (samples, 95% intervals, paired differences to the full cache), where the plot is, and what
each press makes of the first samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation import evaluate
from evaluation.models import EMBEDDED, model_tag
from evaluation.registry import BASELINE_PRESSES, PIKV_REGISTRY

# Single-value needle tasks: teacher forcing scores each in one forward pass (a list of values needs greedy steps
# between the values, which costs about as much as generating them).
DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024, help="RULER context length in tokens")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--samples_per_task", type=int, default=8, help="each sample is its own context")
    parser.add_argument("--ratio", default="0.5", help="compression ratio(s), comma-separated")
    parser.add_argument("--scoring", default="teacher_forced", choices=tuple(evaluate.SCORINGS))
    parser.add_argument("--max_new_tokens", type=int, default=32, help="answers are short: cap the RULER budget")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_dir", default="results/demo")
    args = parser.parse_args(argv)
    presses = ",".join(("no_press", *BASELINE_PRESSES, *PIKV_REGISTRY))
    forwarded = [
        "--dataset", "ruler", "--data_dir", str(args.length), "--tasks", args.tasks,
        "--samples_per_task", str(args.samples_per_task), "--press_name", presses,
        "--compression_ratio", args.ratio, "--max_new_tokens", str(args.max_new_tokens),
        "--scoring", args.scoring, "--output_dir", args.output_dir,
    ]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    status = evaluate.main(forwarded)
    if status == 0:
        print_answers(Path(args.output_dir), samples=2, model=model_tag(EMBEDDED), scoring=args.scoring)
    return status


def _answer_line(row) -> str:
    """A generated answer, or a teacher-forced verdict with the greedy text before each value."""
    if "tf_exact" not in row or str(row.get("tf_exact", "")) == "":
        return " ".join(str(row["predicted_answer"]).split())[:70]
    lead_in = " | ".join(" ".join(text.split()) for text in json.loads(row["lead_in"]))
    if str(row["tf_exact"]) == "True":
        return f"writes it (after {lead_in!r}), gold NLL {float(row['nll']):.2f}"
    return f"misses it (greedy writes {lead_in!r} instead), gold NLL {float(row['nll']):.2f}"


def print_answers(output_dir: Path, samples: int, model: str | None = None, scoring: str = "generate") -> None:
    """The first ``samples`` answers of every run in ``output_dir`` (of ``model``'s runs only, given its run-folder
    tag, see :func:`evaluation.models.model_tag`; of ``scoring``'s runs only), full cache first."""
    runs = sorted(output_dir.glob("*/predictions.csv"), key=lambda p: ("__no_press__" not in str(p), str(p)))
    runs = [p for p in runs if model is None or p.parent.name.split("__")[2] == model]
    runs = [p for p in runs if p.parent.name.endswith("__teacher_forced") == (scoring == "teacher_forced")]
    if not runs:
        return
    first = evaluate.read_predictions(runs[0]).head(samples)
    for i, row in first.iterrows():
        print(f"\nsample {i} ({row['task']}), expected {row['answer']}:")
        for path in runs:
            parts = path.parent.name.split("__")
            label = parts[3] if parts[3] == "no_press" else f"{parts[3]}@{parts[4]}"
            print(f"  {label:>25}: {_answer_line(evaluate.read_predictions(path).loc[i])}")


if __name__ == "__main__":
    raise SystemExit(main())
