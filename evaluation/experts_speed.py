"""Prefill and decode time of the embedded MoE under each experts implementation (eager, grouped_mm, dense-masked).

    python -m evaluation.experts_speed --length 2048 --decode_tokens 16 --threads 2

transformers runs a MoE's routed experts expert by expert (``eager``) or through ``grouped_mm`` (its default where
torch has it) or ``batched_mm``; :mod:`pikv_press.moe.experts` adds ``pikv_dense_masked`` (every expert on every
token, unselected ones weighted 0). Each implementation runs the same random prompt: one prefill, then greedy decoding
from its cache; the table reports the seconds and the largest logit difference from eager on the prefill (non-zero:
the additions run in another order, and routing near-ties may then flip). Prints a markdown table and writes it,
with the figures as JSON, to ``--out`` (``experts_speed.md`` / ``experts_speed.json``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "pikv_dense_masked")


@torch.no_grad()
def time_implementation(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, torch.Tensor]:
    """``(prefill seconds, decode ms per token, prefill logits of the last position)``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    decode = (time.perf_counter() - start) / max(decode_tokens, 1) * 1000
    return prefill, decode, out.logits[0, -1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument(
        "--implementations",
        default="eager,grouped_mm,pikv_dense_masked",
        help=f"comma-separated, from {IMPLEMENTATIONS} (batched_mm gathers one weight matrix per token and expert)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/experts_speed"))
    args = parser.parse_args(argv)
    from evaluation.embedded_model.build import (
        command_line,
        default_model_dir,
        load_embedded_model,
        start_command,
        write_report,
    )
    from pikv_press.moe.experts import DENSE_MASKED, use_dense_masked_experts

    start_command(args.threads)
    from evaluation.cli import comma_list

    names = comma_list(args.implementations)
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {IMPLEMENTATIONS}")
    model, tokenizer = load_embedded_model(dense_masked=False)
    ids = torch.randint(tokenizer.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    rows, reference = [], None
    for name in names:
        if name == DENSE_MASKED:
            use_dense_masked_experts(model)
        else:
            model.set_experts_implementation(name)
        prefill, decode, logits = time_implementation(model, ids, args.decode_tokens)
        reference = logits if reference is None else reference
        rows.append((name, prefill, decode, float((logits - reference).abs().max())))
    command = command_line("evaluation.experts_speed", argv)
    lines = [
        f"Embedded model `{default_model_dir().name}`, {args.length}-token prefill, {args.decode_tokens} decoded "
        f"tokens, {args.threads} threads; logit difference from `{names[0]}` at the last prompt position.",
        "",
        "| experts implementation | prefill s | decode ms/token | max logit difference |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {prefill:.1f} | {decode:.0f} | {diff:.2e} |" for name, prefill, decode, diff in rows),
        "",
        f"`{command}`",
        "",
    ]
    report = {
        "command": command,
        "rows": [dict(zip(("implementation", "prefill_s", "decode_ms_per_token", "max_logit_diff"), r, strict=True))
                 for r in rows],
    }
    write_report(args.out, "experts_speed", report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
