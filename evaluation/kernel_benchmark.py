"""Time per call and achieved memory bandwidth of pikv-press's kernels at decode-sized workloads, 8k to 128k tokens.

    python -m evaluation.kernel_benchmark [--kernels select,partial_attention,quantize,quantized_attention,
        latent_attention,routing_features] [--lengths 8192,16384,32768,65536,131072] [--device auto|cpu|cuda]
        [--backends triton,torch] [--dtype bfloat16] [--repeats 5] [--threads 1] [--peak_gbps X]
        [--output measurements/kernel_benchmark/kernel_benchmark.jsonl]

Workloads (one decode step, batch 1; ``length`` = cached tokens):

* ``select``: scores ``(1, 4, length)``, keys and values ``(1, 4, length, 128)``, keep half of each head
  (:func:`pikv_press.kernels.select.select_and_compact`);
* ``partial_attention``: one query token, 32 query heads over 4 KV heads of width 128 (Qwen3-MoE's GQA ratio)
  (:func:`pikv_press.kernels.sharded_attention.partial_attention`);
* ``quantize``: keys ``(1, 4, length, 128)`` to int4 per channel in groups of 32 tokens (:func:`~pikv_press.kernels.
  lowbit.quantize`);
* ``quantized_attention``: the ``partial_attention`` workload over int4 keys (groups of 32 tokens) and int4 values
  (groups of 32 channels) (:func:`pikv_press.kernels.lowbit_attention.quantized_attention`);
* ``latent_attention``: DeepSeek-V2-Lite's MLA decode, 16 heads over a latent of 512 plus a rotary key of 64
  (:func:`pikv_press.kernels.latent_attention.latent_attention`);
* ``routing_features``: 48 layers x ``length`` tokens x top-8 of 128 experts (:func:`pikv_press.kernels.
  routing_features.routing_features`).

``bytes`` is the least memory traffic of a call (every input read once, every output written once; for ``select``, the
scores plus the kept rows read and written); ``GB/s = bytes / time``. On a CUDA device the peak bandwidth is the
device's (``--peak_gbps``, else its memory clock and bus width when torch reports them, else a table of known GPUs),
and ``fraction_of_peak`` = achieved / peak; times are the median of ``triton.testing.do_bench``. On the CPU only the
torch reference runs (the Triton kernels need a GPU; the interpreter is a test tool), timed with
``time.perf_counter`` (median of ``--repeats`` after one warm-up), and the command says that GPU figures are
unmeasured. Rows are appended to ``--output`` as JSON lines; a (device, kernel, backend, dtype, length) already there
is skipped, so an interrupted run resumes. Each row records the 1-minute load average: on a shared machine the times
include waiting for other processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from evaluation.cli import comma_list, setup

logger = logging.getLogger(__name__)

KERNELS = ("select", "partial_attention", "quantize", "quantized_attention", "latent_attention", "routing_features")
DEFAULT_LENGTHS = "8192,16384,32768,65536,131072"
DEFAULT_OUTPUT = Path("measurements/kernel_benchmark/kernel_benchmark.jsonl")
# Peak HBM/GDDR bandwidth (GB/s) of common data-centre and workstation GPUs, by a substring of the device name
# (vendors' data sheets); used when torch does not report the memory clock and bus width.
KNOWN_PEAK_GBPS = {
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L40": 864.0, "L4": 300.0,
    "A10G": 600.0, "A10": 600.0, "T4": 320.0, "V100": 900.0, "RTX 4090": 1008.0, "RTX 3090": 936.0,
}

KV_HEADS, Q_HEADS, HEAD_DIM = 4, 32, 128
MLA_HEADS, MLA_RANK, MLA_ROPE = 16, 512, 64
ROUTING_LAYERS, ROUTING_EXPERTS, ROUTING_TOP_K = 48, 128, 8
BITS, GROUP = 4, 32


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def workload(kernel: str, length: int, device: torch.device, dtype: torch.dtype,
             backend: str) -> tuple[Callable[[], object], int]:
    """``(call, bytes)``: a closure running one call of ``kernel`` with ``backend``, and its least memory traffic."""
    from pikv_press.kernels import (
        latent_attention,
        lowbit,
        lowbit_attention,
        routing_features,
        select,
        sharded_attention,
    )

    gen = torch.Generator().manual_seed(length)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if kernel == "select":
        scores = torch.rand(1, KV_HEADS, length, generator=gen).to(device)
        keys, values = randn(1, KV_HEADS, length, HEAD_DIM), randn(1, KV_HEADS, length, HEAD_DIM)
        kept = length // 2
        moved = nbytes(scores) + 2 * 2 * kept * KV_HEADS * HEAD_DIM * keys.element_size()
        return (lambda: select.select_and_compact(scores, keys, values, kept, backend=backend)), moved
    if kernel in ("partial_attention", "quantized_attention"):
        query = randn(1, Q_HEADS, 1, HEAD_DIM)
        keys, values = randn(1, KV_HEADS, length, HEAD_DIM), randn(1, KV_HEADS, length, HEAD_DIM)
        out_bytes = nbytes(query) + Q_HEADS * 4
        if kernel == "partial_attention":
            moved = nbytes(query, keys, values) + out_bytes
            return (lambda: sharded_attention.partial_attention(query, keys, values, HEAD_DIM ** -0.5,
                                                                backend=backend)), moved
        kq = lowbit.quantize(keys, BITS, GROUP, -2, backend="torch")
        vq = lowbit.quantize(values, BITS, GROUP, -1, backend="torch")
        return (lambda: lowbit_attention.quantized_attention(
            query, *kq, *vq, bits=BITS, key_group_size=GROUP, value_group_size=GROUP, scaling=HEAD_DIM ** -0.5,
            backend=backend)), nbytes(query, *kq, *vq) + out_bytes
    if kernel == "quantize":
        keys = randn(1, KV_HEADS, length, HEAD_DIM)
        packed = length * KV_HEADS * HEAD_DIM * BITS // 8
        stats = 2 * KV_HEADS * (length // GROUP) * HEAD_DIM * keys.element_size()
        return (lambda: lowbit.quantize(keys, BITS, GROUP, -2, backend=backend)), nbytes(keys) + packed + stats
    if kernel == "latent_attention":
        q_latent, q_rope = randn(1, MLA_HEADS, 1, MLA_RANK), randn(1, MLA_HEADS, 1, MLA_ROPE)
        latent, rope_key = randn(1, length, MLA_RANK), randn(1, length, MLA_ROPE)
        moved = nbytes(q_latent, q_rope, latent, rope_key) + nbytes(q_latent) + MLA_HEADS * 4
        return (lambda: latent_attention.latent_attention(q_latent, q_rope, latent, rope_key,
                                                          (MLA_RANK + MLA_ROPE) ** -0.5, backend=backend)), moved
    if kernel == "routing_features":
        ids = torch.rand(ROUTING_LAYERS, length, ROUTING_EXPERTS, generator=gen).topk(ROUTING_TOP_K, -1).indices
        ids = ids.to(device)
        moved = nbytes(ids) + 2 * ROUTING_LAYERS * length * 4 + 2 * ROUTING_LAYERS * ROUTING_EXPERTS * 8
        return (lambda: routing_features.routing_features(ids, ROUTING_EXPERTS, None, 64, backend=backend)), moved
    raise ValueError(f"unknown kernel {kernel!r}: choose from {KERNELS}.")


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> float | None:
    """The device's peak memory bandwidth in GB/s, or None when unknown (always None on the CPU)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbps in KNOWN_PEAK_GBPS.items():
        if name in props.name:
            return gbps
    return None


def time_call(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") / 1e3
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _key(row: dict) -> tuple:
    return row["device_name"], row["kernel"], row["backend"], row["dtype"], row["length"]


def measured_rows(path: Path) -> dict[tuple, dict]:
    """Rows already in ``path``, by (device, kernel, backend, dtype, length)."""
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {_key(row): row for row in rows}


def report(rows: Sequence[dict]) -> str:
    """A markdown table of benchmark rows, one line per (device, kernel, dtype, length), the Triton kernel and the
    torch reference side by side, with ``torch ms / triton ms`` (> 1: the kernel is faster)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["device_name"], row["kernel"], row["dtype"], row["length"]), {})[row["backend"]] = row
    lines = ["| device | kernel | dtype | tokens | Triton ms | torch ms | Triton speed-up | Triton GB/s | "
             "Triton fraction of peak |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(row, field, fmt):
        return "-" if row is None or row.get(field) is None else format(row[field], fmt)

    for (device, kernel, dtype, length), backends in sorted(
            by_key.items(), key=lambda item: (item[0][0], KERNELS.index(item[0][1]) if item[0][1] in KERNELS
                                              else len(KERNELS), item[0][2], item[0][3])):
        tri, ref = backends.get("triton"), backends.get("torch")
        speedup = f"{ref['ms_per_call'] / tri['ms_per_call']:.2f}" if tri and ref else "-"
        lines.append(f"| {device} | {kernel} | {dtype} | {length} | {cell(tri, 'ms_per_call', '.3f')} | "
                     f"{cell(ref, 'ms_per_call', '.3f')} | {speedup} | {cell(tri, 'achieved_gbps', '.1f')} | "
                     f"{cell(tri, 'fraction_of_peak', '.3f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backends", default=None, help="default: triton,torch on CUDA, torch on the CPU")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak_gbps", type=float, default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--report_only", action="store_true",
                        help="print the rows already in --output (any device; no measurement), with the Triton "
                             "kernel's speed-up over the torch reference where both were timed")
    args = parser.parse_args(argv)
    if args.report_only:
        if not args.output.exists():
            raise SystemExit(f"--report_only: {args.output} does not exist; run the benchmark first.")
        print(report(list(measured_rows(args.output).values())))
        return 0
    setup(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    backends = comma_list(args.backends) if args.backends else (["triton", "torch"] if device.type == "cuda"
                                                                else ["torch"])
    if device.type == "cpu" and "triton" in backends:
        raise SystemExit("--backends triton needs --device cuda: on the CPU only the torch reference is timed (the "
                         "Triton interpreter is a test tool, not a benchmark).")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    kernels, lengths = comma_list(args.kernels), comma_list(args.lengths, int)
    for kernel in kernels:
        if kernel not in KERNELS:
            raise SystemExit(f"unknown kernel {kernel!r}: choose from {','.join(KERNELS)}.")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bandwidth_gbps(device, args.peak_gbps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    done = measured_rows(args.output)
    rows = []
    for kernel in kernels:
        for backend in backends:
            for length in lengths:
                key = (device_name, kernel, backend, str(dtype).removeprefix("torch."), length)
                if key in done:
                    logger.info("%s %s %s tokens: already in %s", kernel, backend, length, args.output)
                    rows.append(done[key])
                    continue
                call, moved = workload(kernel, length, device, dtype, backend)
                seconds = time_call(call, device, args.repeats)
                gbps = moved / seconds / 1e9
                row = {"device_name": device_name, "kernel": kernel, "backend": backend, "dtype": key[3],
                       "length": length, "ms_per_call": seconds * 1e3, "bytes": moved, "achieved_gbps": gbps,
                       "peak_gbps": peak, "fraction_of_peak": gbps / peak if peak else None,
                       "threads": torch.get_num_threads() if device.type == "cpu" else None,
                       "load_avg_1min": os.getloadavg()[0],  # other processes compete on a shared machine
                       "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                rows.append(row)
                with args.output.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                del call
    print(f"device: {device_name}; dtype {str(dtype).removeprefix('torch.')}; peak bandwidth: "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown'}")
    print("| kernel | backend | tokens | ms / call | GB/s | fraction of peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        fraction = f"{row['fraction_of_peak']:.2f}" if row["fraction_of_peak"] else "n/a"
        print(f"| {row['kernel']} | {row['backend']} | {row['length']} | {row['ms_per_call']:.3f} | "
              f"{row['achieved_gbps']:.2f} | {fraction} |")
    if device.type != "cuda":
        print("GPU figures are unmeasured: no CUDA device here. These are the torch reference's times on the CPU "
              f"({torch.get_num_threads()} thread(s)); the Triton kernels have run only through the Triton "
              "interpreter, in the tests. Run this command on a CUDA machine for the kernels' time and bandwidth.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
