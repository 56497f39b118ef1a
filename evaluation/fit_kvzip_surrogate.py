"""Fit the linear KVzip surrogate of :class:`pikv_press.presses.KVzipSurrogatePress` for a model (the KVzap recipe).

    python -m evaluation.fit_kvzip_surrogate [--model embedded] [--contexts 16] [--length 4096] [--holdout 4]
                                             [--output_dir measurements/kvzip_surrogate] [--workers 1 --worker 0]

Training text: the Lee background corpus (300 news articles of the Australian Broadcasting Corporation, shipped in
gensim's test data; taken from the gensim 4.4.0 wheel that ``pip download`` fetches from PyPI, never the hub). It
shares no text with RULER (Paul Graham essays, SQuAD, HotpotQA, synthetic lists), so the surrogate's figures on RULER
and on the needle grid are out of its training distribution. The articles are shuffled (seed 0) and packed, whole,
into contexts of at most ``--length`` tokens, formatted as the evaluation pipeline formats a context.

For each context (resumable: one file per context in ``<output_dir>/stats/``, skipped when present; ``--workers N
--worker i`` splits the contexts between processes) the model prefills it, KVzip (MoE-correct, kvpress's default
settings) scores it, and the regression statistics are saved (:func:`pikv_press.surrogate.collect`). Then the ridge
strength is chosen on the last ``--holdout`` contexts (mean squared error of the log-scores), the held-out agreement
with KVzip is reported (R², and the share of KVzip's kept tokens the surrogate also keeps at keep-fractions 0.5 and
0.25, per layer and head, on sampled rows), and the surrogate refitted on every context is written to
``pikv_press/surrogates/<model folder>/`` (kvpress's ``KVzapModel`` format) with a report ``<output_dir>/fit.md``.
"""

from __future__ import annotations

import argparse
import logging
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GENSIM = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SURROGATES = Path(__file__).resolve().parents[1] / "pikv_press" / "surrogates"


def lee_articles() -> list[str]:
    """The 300 articles of the Lee background corpus, one per line of gensim's ``lee_background.cor``."""
    from evaluation.data.cache import cache_root

    target = cache_root() / "corpora" / "lee_background.cor"
    if not target.exists():
        wheels = cache_root() / "corpora" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        if not list(wheels.glob("gensim-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), GENSIM],
                           check=True)
        wheel = next(wheels.glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read(LEE_MEMBER))
    articles = [line.strip() for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(articles) != 300:
        raise RuntimeError(f"{target}: expected the 300 Lee background articles, found {len(articles)}.")
    return articles


def pack_contexts(articles: list[str], tokenizer, length: int, count: int, seed: int = 0) -> list[str]:
    """``count`` contexts of whole articles (shuffled with ``seed``), each at most ``length`` tokens of text."""
    order = list(articles)
    random.Random(seed).shuffle(order)
    contexts, current, tokens = [], [], 0
    for article in order:
        n = len(tokenizer.encode("\n\n" + article, add_special_tokens=False))
        if current and tokens + n > length:
            contexts.append("\n\n".join(current))
            current, tokens = [], 0
            if len(contexts) == count:
                break
        current.append(article)
        tokens += n
    if len(contexts) < count:
        raise ValueError(f"the corpus makes only {len(contexts)} contexts of {length} tokens; ask for fewer.")
    return contexts


def surrogate_folder(model_name: str) -> Path:
    """Where the surrogate of ``model_name`` is shipped: ``pikv_press/surrogates/<the last part of the loaded model's
    name_or_path>``, which :func:`pikv_press.presses.kvzip_surrogate.shipped_surrogate` looks up (the artifact's
    build folder for the embedded model and its variants, the path's or hub id's last part otherwise)."""
    from evaluation.models import embedded_artifact

    artifact = embedded_artifact(model_name)
    return SURROGATES / (artifact if artifact is not None else Path(model_name).name)


def _stats_path(output_dir: Path, index: int) -> Path:
    return output_dir / "stats" / f"context_{index:03d}.pt"


def collect_all(model_name: str, contexts: list[str], output_dir: Path, workers: int, worker: int) -> None:
    from kvpress import pipeline  # noqa: F401  (registers the kv-press-text-generation pipeline)
    from tqdm import tqdm
    from transformers import pipeline as hf_pipeline

    from evaluation.models import load_model
    from pikv_press.surrogate import collect

    todo = [i for i in range(len(contexts)) if i % workers == worker and not _stats_path(output_dir, i).exists()]
    if not todo:
        return
    model, tokenizer, _ = load_model(model_name)
    pipe = hf_pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    for i in tqdm(todo, desc=f"KVzip scores (worker {worker})"):
        ids = pipe.preprocess(contexts[i], ["?"], "", 10**9)["context_ids"]
        stats, rows = collect(model, tokenizer, ids, keep_rows=512, generator=torch.Generator().manual_seed(i))
        path = _stats_path(output_dir, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"stats": stats.__dict__, "rows": rows, "tokens": ids.shape[1]}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)


def _load(output_dir: Path, indices):
    from pikv_press.surrogate import SurrogateStats

    items = [torch.load(_stats_path(output_dir, i)) for i in indices]
    stats = [SurrogateStats(**item["stats"]) for item in items]
    return stats, [item["rows"] for item in items], [item["tokens"] for item in items]


def agreement(weights: torch.Tensor, rows: list[dict], keep: float) -> float:
    """Mean over layers and heads of the share of KVzip's top-``keep`` sampled rows that the surrogate also ranks in
    its top-``keep`` (the rows of every held-out context pooled per layer)."""
    hidden = torch.cat([r["hidden"] for r in rows], dim=1).double()  # (layers, n, d)
    target = torch.cat([r["target"] for r in rows], dim=1).double()  # (layers, n, heads)
    prediction = hidden @ weights[:, :-1] + weights[:, -1:]  # (layers, n, heads)
    k = max(1, int(keep * hidden.shape[1]))
    true = torch.zeros_like(target, dtype=torch.bool).scatter_(1, target.topk(k, dim=1).indices, True)
    pred = torch.zeros_like(target, dtype=torch.bool).scatter_(1, prediction.topk(k, dim=1).indices, True)
    return float((true & pred).sum() / true.sum())


def fit(model_name: str, count: int, holdout: int, output_dir: Path, length: int) -> Path:
    from evaluation.models import model_tag
    from pikv_press.surrogate import solve, to_kvzap_model

    train_stats, _, train_tokens = _load(output_dir, range(count - holdout))
    test_stats, test_rows, test_tokens = _load(output_dir, range(count - holdout, count))
    train, test = sum(train_stats[1:], train_stats[0]), sum(test_stats[1:], test_stats[0])
    variance = test.yty / test.count - (test.xty[:, -1] / test.count) ** 2  # xty's bias row sums the targets
    lines = [f"# Linear KVzip surrogate for `{model_tag(model_name)}`", "",
             f"Training text: Lee background corpus ({GENSIM} test data), {count} contexts of at most {length} "
             f"tokens ({sum(train_tokens) + sum(test_tokens)} tokens); held out: the last {holdout} contexts "
             f"({sum(test_tokens)} tokens). Targets: log of MoE-correct KVzip scores (kvpress defaults), the first 4 "
             "tokens of each context (sinks) left out.", "",
             "| ridge | held-out MSE | held-out R² | top-50% agreement | top-25% agreement |", "|---|---|---|---|---|"]
    best = None
    for ridge in RIDGES:
        weights = solve(train, ridge)
        mse = test.mse(weights)
        r2 = float((1 - mse / variance).mean())
        row = (float(mse.mean()), r2, agreement(weights, test_rows, 0.5), agreement(weights, test_rows, 0.25))
        lines.append(f"| {ridge:g} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} |")
        if best is None or row[0] < best[1][0]:
            best = (ridge, row)
    ridge, row = best
    lines += ["", f"Chosen ridge {ridge:g} (lowest held-out MSE); the shipped surrogate is refitted on all {count} "
              "contexts with it. Agreement: the share of KVzip's top tokens (per layer and kv head, on 512 sampled "
              "tokens per held-out context) that the surrogate also ranks in its top share; 0.5 / 0.25 for a random "
              "ranking."]
    everything = train + test
    surrogate = to_kvzap_model(solve(everything, ridge), fit_corpus="lee_background", fit_contexts=count,
                               fit_context_length=length, fit_ridge=ridge, fit_heldout_r2=round(row[1], 4))
    folder = surrogate_folder(model_name)
    surrogate.save_pretrained(folder)
    lines += ["", f"Written to `{folder.relative_to(SURROGATES.parents[1])}`. Command: `python -m "
              f"evaluation.fit_kvzip_surrogate --model {model_name} --contexts {count} --length {length} "
              f"--holdout {holdout} --output_dir {output_dir}`."]
    (output_dir / "fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--output_dir", default="measurements/kvzip_surrogate")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--collect_only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.holdout < args.contexts:
        parser.error("--holdout must be between 1 and --contexts - 1")
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    from evaluation.data.tokenization import load_default_tokenizer

    output_dir = Path(args.output_dir)
    contexts = pack_contexts(lee_articles(), load_default_tokenizer(), args.length - 64, args.contexts)
    collect_all(args.model, contexts, output_dir, args.workers, args.worker)
    if args.collect_only:
        return 0
    missing = [i for i in range(args.contexts) if not _stats_path(output_dir, i).exists()]
    if missing:
        print(f"contexts {missing} are not scored yet (another worker?); run again to fit.")
        return 1
    fit(args.model, args.contexts, args.holdout, output_dir, args.length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
