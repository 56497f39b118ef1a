"""A plumbing check: every kvpress press on a tiny random model of every MoE family, with and without pikv-press.

    python -m evaluation.compat_matrix [--ratio 0.5] [--out results/compat_matrix.md]

Each cell compresses a 64-token prefill under ``with press(model)``, then answers a question through
``pipeline("kv-press-text-generation")`` from the compressed cache. It shows ``ok`` with the cache length of the last
compressed layer (``kept/64``), or the error. The first table runs every press as ``pikv_press.MoEAware(press)``; its
last column is the largest difference between the attention weights kvpress's scorers compute through pikv-press's
attention view and the model's own eager attention weights. The second table runs the same presses with kvpress alone
(``ok`` there may still score with the wrong queries: see the README). A third table gives the router tap's agreement
between predicted routing (each layer's router applied to the attention input) and actual routing on the same 64
random tokens. Random weights: these tables show the plumbing at work, not what trained models do.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVzipPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import DynamicCache, pipeline

from pikv_press import MoEAware, RouterTap, get_anatomy
from pikv_press.compat import view_attention_errors
from pikv_press.testing import MOE_FAMILY_NAMES, TRAINING_TEXT, VOCAB, build_model, build_tokenizer

PRESSES = {
    "Knorm": lambda r: KnormPress(r),
    "SnapKV": lambda r: SnapKVPress(r, window_size=8),
    "StreamingLLM": lambda r: StreamingLLMPress(r, n_sink=4),
    "ExpectedAttention": lambda r: ExpectedAttentionPress(r),
    "TOVA": lambda r: TOVAPress(r),
    "KeyDiff": lambda r: KeyDiffPress(r),
    "PyramidKV": lambda r: PyramidKVPress(r, window_size=8),
    "AdaKV(ExpectedAttention)": lambda r: AdaKVPress(ExpectedAttentionPress(r)),
    "KVzip": lambda r: _with_tokenizer(KVzipPress(r)),
}
SEQ = 64
_TOKENIZER: list = []


def _with_tokenizer(press: KVzipPress) -> KVzipPress:
    """KVzip reads its chat-template prefix from the model's tokenizer; the tiny models' config names none, so the
    MoE-correct KVzip gets the tiny tokenizer (kvpress's own KVzip ignores the attribute and fails loading one)."""
    if not _TOKENIZER:
        _TOKENIZER.append(build_tokenizer())
    press.tokenizer = _TOKENIZER[0]
    return press


def attention_error(family: str) -> float:
    """Max |window attention through the view - eager attention weights| over compressible layers."""
    model = build_model(family, attn_implementation="eager")
    return max(view_attention_errors(model, torch.randint(5, VOCAB, (1, SEQ))))


def routing_agreement(model) -> tuple[float, float, float]:
    """(top-1 agreement, top-k recall, chance top-1) of predicted vs actual routing on random tokens."""
    anatomy = get_anatomy(model)
    with RouterTap(model) as tap, torch.no_grad():
        model(torch.randint(5, VOCAB, (1, SEQ)))
    return tap.top1_agreement(), tap.topk_recall(), 1.0 / anatomy.num_experts


def run_cell(model, pipe, press_factory, ratio: float) -> str:
    anatomy = get_anatomy(model)
    for idx in anatomy.compressible_layers:
        anatomy.attention(idx).masked_key_indices = None
    try:
        cache = DynamicCache()
        with torch.no_grad(), press_factory(ratio)(model):
            model.model(input_ids=torch.randint(5, VOCAB, (1, SEQ)), past_key_values=cache)
        kept = cache.layers[anatomy.compressible_layers[-1]].keys.shape[2]
        masked = getattr(anatomy.attention(anatomy.compressible_layers[-1]), "masked_key_indices", None)
        pipe(" ".join(TRAINING_TEXT[:3]), question="", press=press_factory(ratio), max_new_tokens=3)
        for idx in anatomy.compressible_layers:
            anatomy.attention(idx).masked_key_indices = None
        if masked is not None:
            return f"ok ({masked[0].numel() // cache.layers[-1].keys.shape[1]} masked/{SEQ})"
        return f"ok ({kept}/{SEQ})"
    except ValueError as err:  # the clear errors of unsupported combinations
        if "eager" in str(err):
            return "ValueError (eager only)"
        if "re-reads the context" in str(err):
            return "ValueError (use a prefill press)"
        if "KVzipPress cannot run" in str(err):
            return "ValueError (attention sinks)"
        return f"ValueError: {str(err)[:60]}"
    except Exception as err:  # reported in the matrix: what breaks
        return f"FAILS: {type(err).__name__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("results/compat_matrix.md"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    header = ["family", *PRESSES, "max attention error"]
    rows, plain_rows, routing_rows = [], [], []
    start = time.time()
    for family in MOE_FAMILY_NAMES:
        model = build_model(family)
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
        cells = [run_cell(model, pipe, lambda r, f=factory: MoEAware(f(r)), args.ratio) for factory in PRESSES.values()]
        rows.append([family, *cells, f"{attention_error(family):.1e}"])
        plain_rows.append([family, *[run_cell(model, pipe, factory, args.ratio) for factory in PRESSES.values()]])
        top1, recall, chance = routing_agreement(model)
        top_k = get_anatomy(model).top_k
        routing_rows.append([family, f"{top1:.2f}", f"{chance:.2f}", f"{recall:.2f} (top-{top_k})"])
    lines = ["With `pikv_press.MoEAware(press)`:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "kvpress alone:", "", "| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in plain_rows]
    lines += ["", "| family | predicted vs actual top-1 agreement | chance | top-k recall |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in routing_rows]
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)
    print(f"\ncompression ratio {args.ratio}, {SEQ}-token prefill; {time.time() - start:.1f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
