"""Speed and memory benchmark of presses: prefill, time to first token, decoding, peak memory and KV cache size.

    python -m evaluation.benchmark [--model embedded|<path or hub id>] [--press_name no_press,knorm,snapkv]
        [--compression_ratio 0.5] [--lengths 1024,2048,4096,8192] [--decode_tokens 32] [--repeats 1]
        [--threads N] [--device cpu|cuda] [--context essay|random] [--cache dynamic|quantized-int4|...]
        [--output_dir results/benchmark] [--report_only]

For every (press, compression ratio, context length) and every repeat, :func:`measure` runs one batch-1 request the
way kvpress's ``kv-press-text-generation`` pipeline does and returns one row:

- ``prefill_s``: wall time of ``model.model(input_ids=context, past_key_values=cache)`` (a new cache of
  ``--cache``, default ``dynamic``: :func:`pikv_press.make_cache`) inside
  ``with press(model):`` (so it includes the press's scoring and the pruning of the cache); no lm_head.
- ``first_token_s``: the lm_head on the last position of the prefill's hidden states and its argmax (the first
  generated token); ``ttft_s = prefill_s + first_token_s``.
- ``decode_ms_per_token``: greedy decoding of ``decode_tokens`` further tokens from the compressed cache, one
  ``model(...)`` call per token with position ids continuing after the *uncompressed* context length (as kvpress's
  ``generate_answer``), divided by ``decode_tokens``. Unlike ``generate_answer`` it never stops at an end-of-sequence
  token, so every row decodes the same number of steps. Decoding-time presses (``DecodingPress``,
  ``PrefillDecodingPress``) stay active while decoding, as in the pipeline; prefill-only presses do not.
- ``kv_cache_mib`` / ``kv_cache_bytes``: :func:`pikv_press.cache_nbytes` of the cache right after prefill (bytes of
  tensor storage the cache keeps alive); ``kv_tokens_per_layer``: the mean of :func:`pikv_press.cache_lengths`
  over layers, with its minimum, maximum and the full list (``kv_layer_tokens``).
- ``peak_mem_mib``: peak memory increase during prefill + first token + decoding, over the memory in use just before.
  CPU: resident set size (RSS) of the whole process; the peak is the larger of (a) the kernel's high-water mark
  ``VmHWM`` from ``/proc/self/status``, reset before the section by writing ``5`` to ``/proc/self/clear_refs``
  (skipped where the kernel refuses), and (b) ``/proc/self/statm`` sampled every millisecond by a background thread
  (psutil is not used). Before the baseline is read, ``gc.collect()`` and glibc's ``malloc_trim(0)`` return freed
  memory to the system. CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()`` (tensors only, not the caching allocator's reserve). ``peak_total_mib`` is
  the absolute peak (whole-process RSS, or all allocated CUDA memory including the weights).
- Times use ``time.perf_counter``, with ``torch.cuda.synchronize()`` before each reading on CUDA.

Contexts (``--context``): ``essay`` (default) is Paul Graham essay text from :func:`evaluation.data.build_niah`
(the needle-in-a-haystack haystack with its needle at 50 % depth), tokenized without special tokens and cut to
exactly ``context_length`` tokens; ``random`` is uniformly random ids of the tokenizer's regular (non-special)
vocabulary, seeded. Before timing, every press runs once untimed on a short context (warm-up). Outputs, in
``--output_dir``: ``benchmark.csv`` (one row per measurement), ``benchmark.png`` (prefill, decoding, KV cache and peak
memory against context length, one line per press@ratio, medians over repeats); a markdown table of the medians is
printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from kvpress import BasePress, DecodingPress, PrefillDecodingPress

from evaluation.cli import comma_list
from evaluation.models import load_model
from pikv_press import cache_lengths, cache_nbytes, make_cache
from pikv_press.cache import CACHES

logger = logging.getLogger(__name__)

MIB = 2**20
CSV_NAME = "benchmark.csv"
PNG_NAME = "benchmark.png"
COLUMNS: tuple[str, ...] = (
    "model",
    "device",
    "dtype",
    "threads",
    "press",
    "compression_ratio",
    "context",
    "cache",
    "context_length",
    "repeat",
    "prefill_s",
    "first_token_s",
    "ttft_s",
    "decode_tokens",
    "decode_s",
    "decode_ms_per_token",
    "peak_mem_mib",
    "peak_total_mib",
    "mem_method",
    "kv_cache_mib",
    "kv_cache_bytes",
    "kv_tokens_per_layer",
    "kv_tokens_min",
    "kv_tokens_max",
    "kv_layer_tokens",
)


# --------------------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """Current resident set size of this process, from ``/proc/self/statm`` (second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark ``VmHWM`` (``None`` where ``/proc/self/status`` lacks it)."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Return freed heap memory to the system (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager measuring the peak memory increase of the code it wraps (see the module docstring).

    After the ``with`` block, :attr:`peak_increase` and :attr:`peak_total` hold bytes and :attr:`method` says how
    they were measured.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.baseline = 0
        self.peak_total = 0
        self.peak_increase = 0
        self.method = ""
        self._sampled = 0
        self._hwm_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _malloc_trim()
        self._hwm_ok = _reset_hwm()
        self.baseline = _rss_bytes()
        self._sampled = self.baseline
        self.method = ("rss max(VmHWM, statm sampled)" if self._hwm_ok else "rss statm sampled") + (
            f" every {self.interval_s * 1000:g} ms"
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._sampled, _rss_bytes())
            hwm = _hwm_bytes() if self._hwm_ok else None
            self.peak_total = max(peak, hwm or 0)
        self.peak_increase = max(0, self.peak_total - self.baseline)


# -------------------------------------------------------------------------------------------------------- contexts


def essay_context_ids(tokenizer: Any, length: int, seed: int = 42) -> torch.Tensor:
    """``(1, length)`` ids of essay text: :func:`evaluation.data.build_niah`'s context (needle at 50 % depth), cut."""
    from evaluation.data import build_niah

    extra = 256
    while True:
        samples = build_niah([length + extra], [50], tokenizer, seed=seed, max_new_tokens=0)
        ids = tokenizer(samples.iloc[0]["context"], add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] >= length:
            return ids[:, :length]
        if extra > 64 * length:
            raise ValueError(f"could not build an essay context of {length} tokens (got {ids.shape[1]})")
        extra = 2 * extra + (length - ids.shape[1])


def random_context_ids(tokenizer: Any, length: int, seed: int = 0) -> torch.Tensor:
    """``(1, length)`` uniformly random ids of the tokenizer's vocabulary, special tokens excluded."""
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor(sorted(i for i in tokenizer.get_vocab().values() if i not in special))
    gen = torch.Generator().manual_seed(seed)
    return vocab[torch.randint(len(vocab), (1, length), generator=gen)]


def context_ids(tokenizer: Any, length: int, kind: str = "essay") -> torch.Tensor:
    """A context of exactly ``length`` tokens, ``kind`` ``essay`` or ``random`` (see the module docstring)."""
    if kind == "essay":
        return essay_context_ids(tokenizer, length)
    if kind == "random":
        return random_context_ids(tokenizer, length)
    raise ValueError(f"unknown context kind {kind!r}: use 'essay' or 'random'")


# ------------------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: torch.nn.Module,
    press: BasePress | None,
    context_ids: torch.Tensor,
    decode_tokens: int,
    cache: str = "dynamic",
) -> dict[str, Any]:
    """One batch-1 request: prefill under ``press``, first token, ``decode_tokens`` greedy steps; timings and memory.

    Returns a dict with ``prefill_s``, ``first_token_s``, ``ttft_s``, ``decode_tokens``, ``decode_s``,
    ``decode_ms_per_token``, ``peak_mem_mib``, ``peak_total_mib``, ``mem_method``, ``kv_cache_bytes``,
    ``kv_cache_mib``, ``kv_tokens_per_layer`` (mean), ``kv_tokens_min``, ``kv_tokens_max``, ``kv_layer_tokens``
    (the per-layer list), ``context_length`` and ``generated_ids`` (the first token followed by the decoded ones).
    ``cache`` names the cache the request fills (:func:`pikv_press.make_cache`: ``dynamic``, ``quantized-int4``, ...).
    """
    if decode_tokens < 0:
        raise ValueError(f"decode_tokens must be >= 0, got {decode_tokens}")
    device = next(model.parameters()).device
    context_ids = context_ids.to(device)
    context_length = int(context_ids.shape[1])
    prefill_press = press is not None and not isinstance(press, DecodingPress)
    decoding_press = press is not None and isinstance(press, (DecodingPress, PrefillDecodingPress))
    lm_head = model.get_output_embeddings()
    cache = make_cache(cache, model.config)

    with torch.no_grad(), PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        with press(model) if prefill_press else contextlib.nullcontext():
            hidden = model.model(input_ids=context_ids, past_key_values=cache).last_hidden_state
        _sync(device)
        prefill_s = time.perf_counter() - start
        # the cache right after prefill (decoding appends to it)
        kv_bytes, lengths = cache_nbytes(cache), cache_lengths(cache)

        start = time.perf_counter()
        next_id = lm_head(hidden[:, -1:]).argmax(dim=-1)  # (1, 1)
        _sync(device)
        first_token_s = time.perf_counter() - start
        generated = [int(next_id.item())]
        del hidden

        position_ids = torch.tensor([[context_length]], device=device)
        start = time.perf_counter()
        with press(model) if decoding_press else contextlib.nullcontext():
            for step in range(decode_tokens):
                logits = model(input_ids=next_id, past_key_values=cache, position_ids=position_ids + step).logits
                next_id = logits[:, -1:].argmax(dim=-1)
                generated.append(int(next_id.item()))  # .item() synchronizes, as a real decoder must
        _sync(device)
        decode_s = time.perf_counter() - start

    return {
        "context_length": context_length,
        "prefill_s": prefill_s,
        "first_token_s": first_token_s,
        "ttft_s": prefill_s + first_token_s,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_ms_per_token": 1000 * decode_s / decode_tokens if decode_tokens else float("nan"),
        "peak_mem_mib": memory.peak_increase / MIB,
        "peak_total_mib": memory.peak_total / MIB,
        "mem_method": memory.method,
        "kv_cache_bytes": kv_bytes,
        "kv_cache_mib": kv_bytes / MIB,
        "kv_tokens_per_layer": sum(lengths) / len(lengths) if lengths else 0.0,
        "kv_tokens_min": min(lengths, default=0),
        "kv_tokens_max": max(lengths, default=0),
        "kv_layer_tokens": " ".join(map(str, lengths)),
        "generated_ids": generated,
    }


def with_tokenizer(press, tokenizer):
    """``press`` with ``tokenizer`` given to every KVzip inside it (:func:`pikv_press.compat.inner_presses`) that has
    none: KVzip builds its reconstruction prompt with it, and a model built in memory (a ``random-*`` model) has no
    ``name_or_path`` to load one from."""
    from kvpress import KVzipPress

    from pikv_press.compat import inner_presses

    for inner in inner_presses(press):
        if isinstance(inner, KVzipPress) and getattr(inner, "tokenizer", None) is None:
            inner.tokenizer = tokenizer
    return press


def run_benchmark(
    model: torch.nn.Module,
    tokenizer: Any,
    press_names: Sequence[str],
    ratios: Sequence[float],
    lengths: Sequence[int],
    decode_tokens: int,
    repeats: int = 1,
    context: str = "essay",
    model_name: str = "",
    warmup_length: int = 128,
    progress: bool = True,
    press_options: dict[str, Any] | None = None,
    cache: str = "dynamic",
) -> list[dict[str, Any]]:
    """Every (press, ratio, length) x ``repeats``, after one untimed warm-up per (press, ratio); rows in order.

    ``no_press`` and presses that take no compression ratio (decoding presses, ThinK) are measured once per length,
    with ratio 0.0. Presses come from :func:`evaluation.registry.make_press` (a fresh press per measurement), with
    ``press_options`` (``key_channel_compression_ratio``, decoding presses' ``target_size`` ...).
    """
    from tqdm.auto import tqdm

    from evaluation.registry import press_for_run, takes_compression_ratio

    options = press_options or {}

    configs: list[tuple[str, float]] = []
    for name in press_names:
        for ratio in ratios if takes_compression_ratio(name) else [0.0]:
            if (name, ratio) not in configs:
                configs.append((name, ratio))
    device = next(model.parameters()).device
    contexts = {length: context_ids(tokenizer, length, context) for length in lengths}
    warm_ids = context_ids(tokenizer, min(warmup_length, min(lengths)), context)
    for name, ratio in configs:
        logger.info("warm-up: %s@%s on %d tokens", name, ratio, warm_ids.shape[1])
        measure(model, with_tokenizer(press_for_run(name, ratio, **options), tokenizer), warm_ids, 2, cache)

    common = {
        "model": model_name,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "context": context,
        "cache": cache,
    }
    rows: list[dict[str, Any]] = []
    jobs = [(length, name, ratio, r) for length in lengths for name, ratio in configs for r in range(repeats)]
    for length, name, ratio, repeat in tqdm(jobs, desc="benchmark", disable=not progress):
        press = with_tokenizer(press_for_run(name, ratio, **options), tokenizer)
        result = measure(model, press, contexts[length], decode_tokens, cache)
        result.pop("generated_ids")
        row = {**common, "press": name, "compression_ratio": ratio, "repeat": repeat, **result}
        rows.append({column: row.get(column, "") for column in COLUMNS})
        logger.info("%s@%s L=%d: prefill %.3f s, decode %.1f ms/token, KV %.1f MiB", name, ratio, length,
                    row["prefill_s"], row["decode_ms_per_token"], row["kv_cache_mib"])
    return rows


# ------------------------------------------------------------------------------------------------------- reporting


def summarize(rows: Sequence[dict[str, Any]]):
    """Medians over repeats, one row per (press, ratio, context length), as a pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    numeric = ["prefill_s", "ttft_s", "decode_ms_per_token", "peak_mem_mib", "kv_cache_mib", "kv_tokens_per_layer"]
    keys = ["press", "compression_ratio", "context_length"]
    summary = frame.groupby(keys, sort=False)[numeric].median().reset_index()
    summary["repeats"] = frame.groupby(keys, sort=False).size().to_numpy()
    return summary


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The medians of :func:`summarize` as a markdown table."""
    summary = summarize(rows)
    baseline = {r.context_length: r.prefill_s for r in summary.itertuples() if r.press == "no_press"}
    lines = [
        "| press | ratio | context | prefill s | prefill vs no_press | TTFT s | decode ms/token | peak MiB | KV MiB | "
        "KV tokens/layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        base = baseline.get(r.context_length)
        versus = f"{100 * (r.prefill_s / base - 1):+.0f}%" if base and r.press != "no_press" else "-"
        lines.append(
            f"| {r.press} | {r.compression_ratio:g} | {r.context_length} | {r.prefill_s:.3f} | {versus} | "
            f"{r.ttft_s:.3f} | {r.decode_ms_per_token:.1f} | {r.peak_mem_mib:.1f} | {r.kv_cache_mib:.2f} | "
            f"{r.kv_tokens_per_layer:g} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """2x2 panels (prefill s, decode ms/token, KV cache MiB, peak memory MiB vs context length), one line per
    press@ratio (medians over repeats); written to ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    panels = [
        ("prefill_s", "prefill (s)"),
        ("decode_ms_per_token", "decode (ms / token)"),
        ("kv_cache_mib", "KV cache after prefill (MiB)"),
        ("peak_mem_mib", "peak memory increase (MiB)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (column, label) in zip(axes.flat, panels, strict=True):
        for (press, ratio), group in summary.groupby(["press", "compression_ratio"], sort=False):
            group = group.sort_values("context_length")
            name = press if press == "no_press" else f"{press}@{ratio:g}"
            ax.plot(group["context_length"], group[column], marker="o", label=name)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from evaluation.registry import PRESS_REGISTRY, press_for_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' (the embedded MoE), or a path or hub id")
    parser.add_argument("--press_name", default="no_press,knorm,snapkv", help="comma-separated registry names")
    parser.add_argument("--compression_ratio", default="0.5", help="comma-separated ratios (no_press ignores them)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated context lengths in tokens")
    parser.add_argument("--decode_tokens", type=int, default=32, help="greedy decoding steps after the first token")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per (press, ratio, length)")
    parser.add_argument("--key_channel_compression_ratio", type=float, default=None, help="ThinK: key channels pruned")
    parser.add_argument("--target_size", type=int, default=None, help="decoding presses: tokens kept")
    parser.add_argument("--compression_interval", type=int, default=None, help="decoding presses: steps between")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--context", default="essay", choices=["essay", "random"], help="essay text or random ids")
    parser.add_argument("--cache", default="dynamic", choices=sorted(CACHES), help="the KV cache each request fills")
    parser.add_argument("--output_dir", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--report_only", action="store_true",
                        help=f"print the table of <output_dir>/{CSV_NAME} (written by an earlier run, on any device) "
                             "and measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        import pandas as pd

        csv_path = args.output_dir / CSV_NAME
        if not csv_path.exists():
            parser.error(f"--report_only: {csv_path} does not exist; run the benchmark with this --output_dir first.")
        rows = pd.read_csv(csv_path).to_dict("records")
        first = rows[0]
        print(f"{first['model']} on {first['device']} ({first['dtype']}), {first['context']} context, "
              f"{first['decode_tokens']} decode tokens; peak memory: {first['mem_method']}\n")
        print(markdown_table(rows))
        return 0

    press_names = comma_list(args.press_name, str)
    unknown = [p for p in press_names if p not in PRESS_REGISTRY]
    if unknown:
        parser.error(f"unknown presses {unknown}; known: {', '.join(sorted(PRESS_REGISTRY))}")
    ratios, lengths = comma_list(args.compression_ratio, float), comma_list(args.lengths, int)
    if not press_names or not lengths or not ratios:
        parser.error("--press_name, --compression_ratio and --lengths must not be empty")
    if any(not 0 <= r < 1 for r in ratios):
        parser.error(f"compression ratios must be in [0, 1), got {ratios}")
    if any(length < 1 for length in lengths) or args.decode_tokens < 1 or args.repeats < 1:
        parser.error("--lengths, --decode_tokens and --repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    options = {"key_channel_compression_ratio": args.key_channel_compression_ratio, "target_size": args.target_size,
               "compression_interval": args.compression_interval}
    for name in press_names:  # missing or invalid press options fail before the model loads
        try:
            press_for_run(name, ratios[0], **options)
        except ValueError as error:
            parser.error(str(error))

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*not tested.*")
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, tokenizer, label = load_model(args.model, args.device, getattr(torch, args.dtype))
    print(f"model {label} on {args.device} ({args.dtype}, threads={torch.get_num_threads()}) "
          f"loaded in {time.perf_counter() - start:.0f} s")
    rows = run_benchmark(model, tokenizer, press_names, ratios, lengths, args.decode_tokens, args.repeats,
                         args.context, label, progress=not args.no_progress, press_options=options, cache=args.cache)

    import pandas as pd

    args.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.output_dir / CSV_NAME
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(csv_path, index=False)
    png_path = plot(rows, args.output_dir / PNG_NAME,
                    f"{label}, {args.device}, threads={torch.get_num_threads()}, {args.context} context, "
                    f"{args.decode_tokens} decode tokens")
    threads = f", threads={torch.get_num_threads()}" if args.device == "cpu" else ""
    print(f"\n{label} on {args.device}{threads}, {args.context} context, {args.decode_tokens} decode tokens "
          f"(medians over {args.repeats} repeat(s)); peak memory: {rows[0]['mem_method']}\n")
    print(markdown_table(rows))
    print(f"\nwrote {csv_path} and {png_path} (total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
