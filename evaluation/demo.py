"""The main job of ``make demo``: the embedded MoE on a RULER-4k subset, full cache vs every baseline press.

    python -m evaluation.demo [--length 4096] [--tasks niah_single_1,...] [--samples_per_task 2] [--ratio 0.5]

On first run it builds the embedded model (``evaluation.embedded_model``) and the RULER data
(``evaluation.data.ruler``) into ``.cache/``; later runs reuse both, and finished evaluation runs in
``results/demo/`` are skipped. It then runs :mod:`evaluation.evaluate` with one prefill per context: the full cache
(``no_press``), kvpress's baselines (Knorm, SnapKV, StreamingLLM, ExpectedAttention with AdaKV, TOVA, KeyDiff,
PyramidKV) and every pikv-press press of the registry, and prints the results table, where the plot is, and the
answers to the first samples with and without each press.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from evaluation import evaluate
from evaluation.models import EMBEDDED, model_tag
from evaluation.registry import DEMO_PRESSES, PIKV_REGISTRY

DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--samples_per_task", type=int, default=2)
    parser.add_argument("--ratio", default="0.5", help="compression ratio(s), comma-separated")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="answers are short: cap the RULER budget")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_dir", default="results/demo")
    args = parser.parse_args(argv)
    presses = ",".join(("no_press", *DEMO_PRESSES, *PIKV_REGISTRY))
    forwarded = [
        "--dataset", "ruler", "--data_dir", str(args.length), "--tasks", args.tasks,
        "--samples_per_task", str(args.samples_per_task), "--press_name", presses,
        "--compression_ratio", args.ratio, "--max_new_tokens", str(args.max_new_tokens),
        "--output_dir", args.output_dir,
    ]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    status = evaluate.main(forwarded)
    if status == 0:
        print_answers(Path(args.output_dir), samples=2, model=model_tag(EMBEDDED))
    return status


def _predictions(path: Path) -> pd.DataFrame:
    """A run's predictions, answers as text (``"7481."`` must not become a float)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"predicted_answer": str})


def print_answers(output_dir: Path, samples: int, model: str | None = None) -> None:
    """The first ``samples`` answers of every run in ``output_dir`` (of ``model``'s runs only, given its run-folder
    tag, see :func:`evaluation.models.model_tag`), full cache first."""
    runs = sorted(output_dir.glob("*/predictions.csv"), key=lambda p: ("__no_press__" not in str(p), str(p)))
    runs = [p for p in runs if model is None or p.parent.name.split("__")[2] == model]
    if not runs:
        return
    first = _predictions(runs[0]).head(samples)
    for i, row in first.iterrows():
        print(f"\nsample {i} ({row['task']}), expected {row['answer']}:")
        for path in runs:
            parts = path.parent.name.split("__")
            label = parts[3] if parts[3] == "no_press" else f"{parts[3]}@{parts[4]}"
            answer = _predictions(path).loc[i, "predicted_answer"]
            print(f"  {label:>25}: {' '.join(str(answer).split())[:70]}")


if __name__ == "__main__":
    raise SystemExit(main())
