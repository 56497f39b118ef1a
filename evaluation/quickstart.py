"""Quickstart (the job ``make demo`` runs until the evaluation harness lands).

    python -m evaluation.quickstart [--length 2048] [--depths 10,50,90] [--ratio 0.5] [--presses knorm,snapkv,...]

Loads the embedded MoE (SmolLM2-135M-Instruct MoEfied into a GLM-4-MoE container; built offline into ``.cache/`` on
first use), hides a needle in Paul Graham essays at a few depths, and answers with the full cache and with kvpress
presses (made MoE-aware by ``import pikv_press``), the way ``pipeline("kv-press-text-generation")`` does. Each context
is prefilled once: :class:`pikv_press.prefill.PrefillRecorder` records it and every press is replayed on the record
(identical caches to ``with press(model)``, see ``tests/test_prefill_replay.py``), so a press costs its scoring and
its answer, not a prefill. Prints, per press, the tokens and bytes the cache really holds after compression, and the
answers.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from evaluation.registry import PRESS_REGISTRY, make_press
from pikv_press import cache_lengths, cache_nbytes, get_anatomy
from pikv_press.prefill import PrefillRecorder

DEFAULT_PRESSES = "knorm,snapkv,streaming_llm,expected_attention_no_adakv,tova"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--depths", default="10,50,90", help="needle depths in percent of the context")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio of every press")
    parser.add_argument("--presses", default=DEFAULT_PRESSES, help="comma-separated names from evaluation.registry")
    parser.add_argument("--model-dir", default=None, help="a saved model (default: the embedded MoE, built once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    unknown = [p for p in args.presses.split(",") if p not in PRESS_REGISTRY]
    if unknown:
        parser.error(f"unknown presses {unknown}; choose from {sorted(PRESS_REGISTRY)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*not tested.*")

    from evaluation.data import build_niah
    from evaluation.embedded_model.build import load_embedded_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load_embedded_model(args.model_dir)
    print(f"model: {get_anatomy(model).describe()} (ready in {time.time() - start:.0f} s)")
    depths = [float(d) for d in args.depths.split(",")]
    samples = build_niah([args.length], depths, tokenizer)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)

    configs = ["no_press"] + args.presses.split(",")
    results = {name: {"correct": 0, "tokens": [], "bytes": [], "answers": []} for name in configs}
    for sample in tqdm(list(samples.itertuples()), desc="samples"):
        inputs = pipe.preprocess(sample.context, [sample.question], sample.answer_prefix, 10**9)
        context_ids = inputs["context_ids"].to(model.device)
        with torch.no_grad(), PrefillRecorder(model) as recorder:  # the one prefill of this context
            model.model(input_ids=context_ids, past_key_values=DynamicCache())
        for name in configs:
            press = make_press(name, args.ratio)
            with torch.no_grad():
                cache = recorder.snapshot.replay(press)
                tokens, nbytes = sum(cache_lengths(cache)) / len(cache.layers), cache_nbytes(cache)
                answer = pipe.generate_answer(inputs["questions_ids"][0].to(model.device), cache,
                                              context_ids.shape[1], sample.max_new_tokens)
            result = results[name]
            result["correct"] += any(a.lower() in answer.lower() for a in sample.answer)
            result["tokens"].append(tokens)
            result["bytes"].append(nbytes)
            result["answers"].append(answer.strip().replace("\n", " ")[:40])
        del recorder
    rows = [
        (name, sum(r["tokens"]) / len(r["tokens"]), sum(r["bytes"]) / len(r["bytes"]) / 2**20, r["correct"],
         r["answers"])
        for name, r in results.items()
    ]

    expected = samples.iloc[0]["answer"][0]
    print(f"\nNeedle at depths {depths} of a {args.length}-token prompt; expected answer: {expected!r}; "
          f"compression ratio {args.ratio}\n")
    print("| press | cache tokens per layer | KV cache MiB | correct | answers |")
    print("|---|---|---|---|---|")
    for name, tokens, mib, correct, answers in rows:
        print(f"| {name} | {tokens:.0f} | {mib:.2f} | {correct}/{len(samples)} | {' / '.join(answers)} |")
    print(f"\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
