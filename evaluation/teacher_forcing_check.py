"""Does teacher-forced scoring agree with generation? Both ways on the same compressed caches, resumable per sample.

    python -m evaluation.teacher_forcing_check                       # RULER-4k, 5 tasks x 20 samples, 3 press settings
    python -m evaluation.teacher_forcing_check --report              # agreement and cost from what is done

Each RULER context is prefilled once (:class:`pikv_press.prefill.PrefillRecorder`); for every press setting the
compressed cache is replayed, then the question is answered both ways from that same cache:

* generation: greedy decoding (:func:`pikv_press.answer.greedy_tokens`, kvpress's loop) of up to ``max_new_tokens``
  tokens, scored by RULER's string match (all values for niah, any for qa);
* teacher forcing: :func:`pikv_press.answer.teacher_forced_score` (a few greedy tokens before each value, one forward
  pass over it).

Each result is appended to ``<out>/<model folder>.jsonl`` as soon as it is produced, with the model folder that gave
it; a restart skips the (sample, press) pairs done. Samples run task by task in rounds (sample 0 of every task, then
sample 1, ...), so a run stopped at any point covers every task about equally. ``--report`` writes
``<out>/report.md`` and ``report.json``: how often the teacher-forced verdict agrees with the generated answer's string
match (per sample: exact vs every value found; and per value share), where they disagree, and the cost of both ways
measured in this run (answer time only, and per press setting including the shared prefill).
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
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from evaluation import cli
from evaluation.benchmarks import ruler
from evaluation.metrics import sample_string_match
from evaluation.models import EMBEDDED, load_model, model_tag
from evaluation.registry import press_for_run
from evaluation.stats import bootstrap_interval
from pikv_press.answer import (
    TEACHER_FORCING_VERSION,
    greedy_reproduces,
    greedy_tokens,
    restore_cache,
    save_cache,
    teacher_forced_score,
    value_tokenizations,
)
from pikv_press.prefill import PrefillRecorder

logger = logging.getLogger(__name__)

DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,qa_1"
DEFAULT_PRESSES = "no_press,snapkv,streaming_llm"
DEFAULT_OUT = Path("measurements/teacher_forcing")


def interleave(frame: pd.DataFrame) -> pd.DataFrame:
    """Samples in rounds: the first sample of every task, then the second, ... (task order kept in a round)."""
    frame = frame.assign(_rank=frame.groupby("task", sort=False).cumcount())
    order = frame.sort_values("_rank", kind="stable").index
    return frame.loc[order].drop(columns="_rank")


def read_results(path: Path) -> pd.DataFrame:
    """Results in ``path``; a line cut by a kill is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return pd.DataFrame(rows)


def run(frame: pd.DataFrame, presses: Sequence[str], ratio: float, out_file: Path, model_folder: str,
        model_name: str, max_new_tokens: int, device: str | None) -> int:
    """Score every (sample, press) of ``frame`` not yet in ``out_file``; returns how many were added."""
    done = read_results(out_file)
    done_keys = set()
    if len(done):
        done = _current(done, model_folder)
        done_keys = set(zip(done["task"], done["index"].astype(int), done["press"], strict=True))
    model, tokenizer, _ = load_model(model_name, device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    stop = {int(e) for e in ([model.generation_config.eos_token_id]
                             if isinstance(model.generation_config.eos_token_id, int)
                             else model.generation_config.eos_token_id)}
    added = 0
    todo = [row for row in frame.itertuples() if any((row.task, int(row.index), p) not in done_keys for p in presses)]
    for row in tqdm(todo, desc=f"{len(presses)} presses x samples"):
        budget = min(int(row.max_new_tokens), max_new_tokens)
        inputs = pipe.preprocess(row.context, [row.question], row.answer_prefix, 10**9)
        context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
        start = time.perf_counter()
        with torch.no_grad(), PrefillRecorder(model) as recorder:
            model.model(input_ids=context_ids, past_key_values=DynamicCache())
        prefill_s = time.perf_counter() - start
        match = ruler.match_mode(row.task)
        references = [str(r) for r in row.answer]
        for name in presses:
            if (row.task, int(row.index), name) in done_keys:
                continue
            start = time.perf_counter()
            cache = recorder.snapshot.replay(press_for_run(name, ratio))
            replay_s = time.perf_counter() - start
            saved = save_cache(cache)
            start = time.perf_counter()
            tokens = greedy_tokens(model, cache, question_ids, context_ids.shape[1], budget)
            generated = str(tokenizer.decode(tokens, skip_special_tokens=True))
            generate_s = time.perf_counter() - start
            restore_cache(cache, saved)
            start = time.perf_counter()
            tf = teacher_forced_score(model, tokenizer, cache, question_ids, context_ids.shape[1], references,
                                      match=match, max_new_tokens=budget)
            tf_s = time.perf_counter() - start
            candidates = [value_tokenizations(tokenizer, v) for v in references]
            if match == "all":
                token_hits = greedy_reproduces(tokens, candidates, stop)
            else:
                token_hits = [greedy_reproduces(tokens, [c], stop)[0] for c in candidates]
            record = {
                "model": model_folder, "rules": TEACHER_FORCING_VERSION, "task": row.task, "index": int(row.index),
                "press": name, "ratio": ratio,
                "match": match, "answer": references, "max_new_tokens": budget, "generated": generated,
                "generated_tokens": len(tokens), "string_match": sample_string_match(generated, references, match),
                "tokens_reproduce": token_hits, "tf_exact": tf.exact, "tf_share": tf.share, "tf_values": tf.values,
                "nll": tf.nll, "lead_in": tf.lead_in, "prefill_s": round(prefill_s, 3), "replay_s": round(replay_s, 3),
                "generate_s": round(generate_s, 3), "tf_s": round(tf_s, 3),
                "context_tokens": int(context_ids.shape[1]), "presses_per_prefill": len(presses),
            }
            with out_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            added += 1
    return added


def _current(df: pd.DataFrame, model_folder: str) -> pd.DataFrame:
    """Results of ``model_folder`` under the current teacher-forcing rules."""
    rules = df["rules"] if "rules" in df else pd.Series(1, index=df.index)
    return df[(df["model"] == model_folder) & (rules == TEACHER_FORCING_VERSION)]


def _share(flags: pd.Series) -> float:
    return round(100 * float(flags.mean()), 1) if len(flags) else float("nan")


def _interval(flags: pd.Series) -> list[float]:
    """95% bootstrap interval of the share of ``flags`` (percent)."""
    low, high = bootstrap_interval(100.0 * flags.to_numpy(float))
    return [round(low, 1), round(high, 1)]


def report(out_file: Path, model_folder: str) -> dict:
    """Agreement and cost of the results of ``model_folder`` in ``out_file``."""
    df = read_results(out_file)
    df = _current(df, model_folder) if len(df) else df
    if not len(df):
        raise SystemExit(f"no results of {model_folder} (rules v{TEACHER_FORCING_VERSION}) in {out_file}: run the "
                         "check first.")
    df = df.drop_duplicates(["task", "index", "press"], keep="last").copy()
    df["generated_right"] = df["string_match"] >= 100.0  # every value found (niah), any found (qa)
    df["agree"] = df["generated_right"] == df["tf_exact"]
    df["share_agree"] = (df["string_match"] - 100 * df["tf_share"]).abs() < 1e-6
    df["token_agree"] = df["tf_exact"] == df["tokens_reproduce"].map(
        lambda hits: all(hits) if isinstance(hits, list) else bool(hits))
    per_sample = df.groupby(["task", "index"]).agg(prefill_s=("prefill_s", "first"), replay_s=("replay_s", "sum"),
                                                   generate_s=("generate_s", "sum"), tf_s=("tf_s", "sum"),
                                                   settings=("press", "count"))
    full_generate = per_sample["prefill_s"].sum() + per_sample["replay_s"].sum() + per_sample["generate_s"].sum()
    full_tf = per_sample["prefill_s"].sum() + per_sample["replay_s"].sum() + per_sample["tf_s"].sum()
    result = {
        "model": model_folder,
        "rules": TEACHER_FORCING_VERSION,
        "samples": int(len(per_sample)),
        "pairs": int(len(df)),
        "presses": sorted(df["press"].unique()),
        "tasks": sorted(df["task"].unique()),
        "agreement_exact_vs_string_match_pct": _share(df["agree"]),
        "agreement_95ci": _interval(df["agree"]),
        "agreement_share_pct": _share(df["share_agree"]),
        "agreement_with_greedy_tokens_pct": _share(df["token_agree"]),
        "generated_right_pct": _share(df["generated_right"]),
        "tf_exact_pct": _share(df["tf_exact"]),
        "disagreements": {
            "string_match_only": int((df["generated_right"] & ~df["tf_exact"]).sum()),
            "teacher_forced_only": int((~df["generated_right"] & df["tf_exact"]).sum()),
        },
        "per_press": {p: {"pairs": int(len(g)), "agree_pct": _share(g["agree"]),
                          "generated_right_pct": _share(g["generated_right"]), "tf_exact_pct": _share(g["tf_exact"])}
                      for p, g in df.groupby("press")},
        "per_task": {t: {"pairs": int(len(g)), "agree_pct": _share(g["agree"])} for t, g in df.groupby("task")},
        "cost": {
            "generate_s_per_answer": round(float(df["generate_s"].mean()), 3),
            "teacher_forced_s_per_answer": round(float(df["tf_s"].mean()), 3),
            "answer_cost_ratio_generate_over_tf": round(float(df["generate_s"].sum() / df["tf_s"].sum()), 2),
            "prefill_s_per_context": round(float(per_sample["prefill_s"].mean()), 2),
            "replay_s_per_press": round(float(df["replay_s"].mean()), 3),
            "sweep_cost_ratio_generate_over_tf": round(float(full_generate / full_tf), 2),
            "mean_generated_tokens": round(float(df["generated_tokens"].mean()), 1),
        },
        "examples_of_disagreement": df[~df["agree"]][["task", "index", "press", "answer", "generated", "lead_in",
                                                      "tf_values"]].head(12).to_dict("records"),
    }
    return result


def markdown(result: dict, command: str) -> str:
    cost = result["cost"]
    lines = [
        f"# Teacher-forced scoring vs generation ({result['model']})",
        "",
        f"`{command}`",
        "",
        f"{result['samples']} RULER samples ({', '.join(result['tasks'])}) x {len(result['presses'])} press settings "
        f"({', '.join(result['presses'])}) = {result['pairs']} answers, each scored both ways from the same cache.",
        "",
        "| measure | value |",
        "|---|---|",
        "| teacher-forced exact == generated answer right (string match) | "
        f"{result['agreement_exact_vs_string_match_pct']}% (95% CI {result['agreement_95ci'][0]}-"
        f"{result['agreement_95ci'][1]}) |",
        f"| teacher-forced share == string-match share | {result['agreement_share_pct']}% |",
        "| teacher-forced exact == greedy tokens write the gold tokens | "
        f"{result['agreement_with_greedy_tokens_pct']}% |",
        f"| generated right / teacher-forced exact | {result['generated_right_pct']}% / {result['tf_exact_pct']}% |",
        f"| disagreements: string match only / teacher forcing only | "
        f"{result['disagreements']['string_match_only']} / {result['disagreements']['teacher_forced_only']} |",
        f"| answer time: generate / teacher-forced (s) | {cost['generate_s_per_answer']} / "
        f"{cost['teacher_forced_s_per_answer']} (x{cost['answer_cost_ratio_generate_over_tf']}) |",
        f"| sweep time incl. the shared prefill ({cost['prefill_s_per_context']} s per context) | "
        f"x{cost['sweep_cost_ratio_generate_over_tf']} |",
        "",
        "| press | answers | agreement | generated right | teacher-forced exact |",
        "|---|---|---|---|---|",
    ]
    for press, r in result["per_press"].items():
        lines.append(f"| {press} | {r['pairs']} | {r['agree_pct']}% | {r['generated_right_pct']}% | "
                     f"{r['tf_exact_pct']}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--samples_per_task", type=int, default=20)
    parser.add_argument("--presses", default=DEFAULT_PRESSES)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="cap on RULER's budget, for both ways")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data_file", type=Path, default=None,
                        help="a local .jsonl of RULER records instead of the generator (tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report", action="store_true", help="agreement and cost from what is done")
    args = parser.parse_args(argv)
    cli.setup(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = model_tag(args.model)
    out_file = args.out / f"{folder}.jsonl"
    if args.report:
        result = report(out_file, folder)
        command = "python -m evaluation.teacher_forcing_check " + " ".join(argv or [])
        (args.out / "report.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / "report.md").write_text(markdown(result, command.strip()))
        print((args.out / "report.md").read_text())
        return 0
    presses = cli.comma_list(args.presses)
    for name in presses:
        press_for_run(name, args.ratio)  # unknown names fail before any work
    if args.data_file is not None:
        frame = pd.read_json(args.data_file, lines=True)
    else:
        frame = ruler.load_samples(str(args.length), tasks=cli.comma_list(args.tasks),
                                   samples_per_task=args.samples_per_task)
    if "index" not in frame:
        frame = frame.assign(index=frame.groupby("task", sort=False).cumcount())
    added = run(interleave(frame), presses, args.ratio, out_file, folder, args.model, args.max_new_tokens,
                args.device)
    logger.info("%d results added to %s", added, out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
