"""Needle-in-a-haystack heatmaps (depth x length) of `PiKVPress` (the registry's ``tova``) against baselines,
teacher-forced, resumable.

    python -m evaluation.needle_heatmap [--lengths 1024,2048,4096] [--depths 0,25,50,75,100]
                                        [--presses no_press,expected_attention,tova,streaming_llm,kvzip,kvzip_surrogate]
                                        [--ratios 0.5,0.75] [--threads 1] [--report]

One needle context per (length, depth) cell (:mod:`evaluation.data.niah`: Paul Graham essays, Kamradt's needle),
prefilled once and every press replayed on it (:mod:`evaluation.evaluate`, ``--scoring teacher_forced``); finished
runs in ``--output_dir`` (default ``measurements/needle_heatmap``, tracked so that a later session resumes) are
skipped. The report draws, per press and ratio, the grid of the gold answer's mean negative log-likelihood (colour)
with whether greedy decoding writes the answer exactly (a mark), and writes ``heatmap.png`` and ``heatmap.md``.
A cell is one sample: the grid shows where in the context a press loses the needle, not a score with an interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import cli, evaluate
from evaluation.models import EMBEDDED, model_tag

DEFAULT_PRESSES = "no_press,expected_attention,tova,streaming_llm,kvzip,kvzip_surrogate"
# PiKVPress keeps exactly what the registry's tova (MoE-correct TOVA) keeps: its runs are those
LABELS = {"tova": "PiKVPress = tova", "pikv": "PiKVPress", "expected_attention": "AdaKV + ExpectedAttention",
          "kvzip": "KVzip (MoE-correct)", "kvzip_surrogate": "KVzip surrogate"}


def collect(output_dir: Path, model: str) -> pd.DataFrame:
    """Every teacher-forced needle prediction of ``model`` in ``output_dir``, one row per (press, ratio, cell)."""
    frames = []
    for path in sorted(output_dir.glob("needle_in_haystack__*__teacher_forced/predictions.csv")):
        parts = path.parent.name.split("__")
        if parts[2] != model_tag(model):
            continue
        frame = evaluate.read_predictions(path)
        frames.append(frame.assign(press=parts[3], ratio=0.0 if parts[3] == "no_press" else float(parts[4])))
    if not frames:
        raise SystemExit(f"no needle runs of {model_tag(model)} in {output_dir}: run without --report first.")
    return pd.concat(frames, ignore_index=True)


def report(frame: pd.DataFrame, output_dir: Path, command: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = frame.assign(exact=frame["tf_exact"].astype(str) == "True", nll=frame["nll"].astype(float))
    lengths = sorted(frame["context_length"].astype(int).unique())
    depths = sorted(frame["depth"].astype(float).unique())
    settings = sorted({(p, r) for p, r in zip(frame["press"], frame["ratio"], strict=True)},
                      key=lambda pr: (pr[0] != "no_press", pr[1], pr[0]))
    vmax = float(np.nanpercentile(frame["nll"], 95)) if len(frame) else 1.0
    # one row of panels per ratio, one column per press; the full cache heads the first row
    ratios = sorted({r for p, r in settings if p != "no_press"}) or [0.0]
    presses = sorted({p for p, _ in settings if p != "no_press"})
    offset = int(any(p == "no_press" for p, _ in settings))
    fig, axes = plt.subplots(len(ratios), offset + len(presses), squeeze=False,
                             figsize=(3.2 * (offset + len(presses)), 3.4 * len(ratios)),
                             gridspec_kw={"hspace": 0.5, "wspace": 0.3})
    panel = {(p, r): axes[ratios.index(r), offset + presses.index(p)] for p, r in settings if p != "no_press"}
    if offset:
        panel.update({(p, r): axes[0, 0] for p, r in settings if p == "no_press"})
    lines = [f"# Needle in a haystack, teacher-forced ({model_tag(EMBEDDED)})", "", f"`{command}`", "",
             "Cells: exact (greedy writes the needle's answer) / gold mean NLL; rows depth %, columns length.", ""]
    for press, ratio in settings:
        ax = panel[(press, ratio)]
        sub = frame[(frame["press"] == press) & (frame["ratio"] == ratio)]
        grid = np.full((len(depths), len(lengths)), np.nan)
        marks = np.zeros_like(grid, dtype=bool)
        for row in sub.itertuples():
            i, j = depths.index(float(row.depth)), lengths.index(int(row.context_length))
            grid[i, j], marks[i, j] = row.nll, row.exact
        image = ax.imshow(grid, cmap="magma_r", vmin=0, vmax=vmax, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, "✓" if marks[i, j] else "✗", ha="center", va="center",
                            color="white" if grid[i, j] > vmax / 2 else "black", fontsize=10)
        name = LABELS.get(press, press)
        label = name if press == "no_press" else f"{name} @ {ratio:g}"
        ax.set_title(f"{label}\n{int(marks.sum())}/{int((~np.isnan(grid)).sum())} exact", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        lines.append(f"| {label} | " + " | ".join(
            "; ".join(f"{'✓' if marks[i, j] else '✗'} {grid[i, j]:.2f}" for i in range(len(depths)))
            for j in range(len(lengths))) + f" | {int(marks.sum())} |")
    used = {id(ax) for ax in panel.values()}
    for ax in axes.flat:
        if id(ax) not in used:
            ax.axis("off")
    fig.colorbar(image, ax=axes, label="gold answer mean NLL (nats)", shrink=0.8)
    fig.suptitle("Needle in a haystack: rows depth (%), columns context length (tokens); ✓ greedy writes the answer",
                 fontsize=10, y=1.03)
    fig.savefig(output_dir / "heatmap.png", dpi=110, bbox_inches="tight")
    header = ["| press | " + " | ".join(f"length {n} (depths {', '.join(f'{d:g}' for d in depths)})"
                                       for n in lengths) + " | exact |",
              "|---|" + "---|" * len(lengths) + "---|"]
    lines[6:6] = header
    text = "\n".join(lines) + "\n"
    (output_dir / "heatmap.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--presses", default=DEFAULT_PRESSES)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_dir", type=Path, default=Path("measurements/needle_heatmap"))
    parser.add_argument("--report", action="store_true", help="only draw the report from finished runs")
    args = parser.parse_args(argv)
    try:  # bad lists fail before any work
        cli.comma_list(args.lengths, int), cli.comma_list(args.depths, float), cli.comma_list(args.ratios, float)
    except ValueError as error:
        parser.error(str(error))
    if not args.report:
        forwarded = ["--dataset", "needle_in_haystack", "--data_dir", args.lengths, "--needle_depth", args.depths,
                     "--press_name", args.presses, "--compression_ratio", args.ratios, "--scoring",
                     "teacher_forced", "--model", args.model, "--output_dir", str(args.output_dir)]
        if args.threads:
            forwarded += ["--threads", str(args.threads)]
        status = evaluate.main(forwarded)
        if status:
            return status
    command = "python -m evaluation.needle_heatmap " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(collect(args.output_dir, args.model), args.output_dir, command.strip()))
    print(f"plot: {args.output_dir / 'heatmap.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
