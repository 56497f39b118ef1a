"""Compile every Triton kernel of pikv-press for an NVIDIA GPU without one: Triton's own pipeline (front end, MLIR
passes, PTX) and the ``ptxas`` bundled with triton, for the launch sizes the launchers choose. Prints each kernel's
registers and stack (spills) from ``cuobjdump -res-usage``; exits 1 when a kernel fails to compile or spills.

    TRITON_INTERPRET=0 python tests/kernel_compile_check.py [--arch 90]

This checks that the kernels compile and fit in registers; it does not run them (no driver, no GPU): their results
are checked by the interpreter tests, their speed only on a GPU (``python -m evaluation.kernel_benchmark``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

from pikv_press.kernels import (  # noqa: E402
    attention_triton,
    lowbit_triton,
    routing_features_triton,
    select_triton,
)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(fn, types: dict, constants: dict, num_warps: int, arch: int) -> tuple[int, int]:
    """Compile ``fn`` with argument ``types`` and ``constants``; ``(registers, stack bytes)`` of the cubin."""
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    kernel = triton_compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(registers), int(stack)


def integers(names, kind="i32") -> dict:
    return {name: kind for name in names}


def cases():
    """``(label, fn, types, constants, num_warps)`` for the launch sizes in use."""
    sel_types = {"scores_ptr": "*fp32", "budgets_ptr": "*i64", "offsets_ptr": "*i64", "idx_ptr": "*i64",
                 "k_ptr": "*bf16", "v_ptr": "*bf16", "ko_ptr": "*bf16", "vo_ptr": "*bf16",
                 **integers(["s_sb", "s_sh", "s_st", "k_sb", "k_sh", "k_st", "k_sd", "v_sb", "v_sh", "v_st", "v_sd",
                             "H", "S", "D", "DV"])}
    for gather in (True, False):
        yield (f"select gather={gather}", select_triton._select_kernel, sel_types,
               dict(GATHER=gather, BLOCK=select_triton.SEARCH_BLOCK,
                    BLOCK_KEEP=select_triton.GATHER_BLOCK if gather else select_triton.SEARCH_BLOCK,
                    BLOCK_D=128, BLOCK_DV=128), select_triton.NUM_WARPS)

    fn = attention_triton._decode_attention_kernel
    strides = integers([n for n in fn.arg_names if n.endswith(("_sb", "_sh", "_sq", "_sd", "_st", "_sk"))], "i64")
    scalars = integers(["HKV", "GROUP", "Q", "K", "D", "D2", "DV", "SPLIT", "ROWS_TOTAL", "causal_offset"])
    for label, rows, dim, dim2, value_dim, flags in [
        ("attention D128 GQA8", 8, 128, 16, 128, {}),
        ("attention D128 32 rows", 32, 128, 16, 128, {"HAS_MASK": True}),
        ("attention D128 64 rows", 64, 128, 16, 128, {}),
        ("attention D192/Dv128 (D=256 tile)", 8, 256, 16, 128, {"HAS_MASK": True}),
        ("attention D256 64 rows", 64, 256, 16, 256, {}),
        ("latent R512+64 16 heads", 16, 512, 64, 512, {"HAS_Q2": True, "VALUE_IS_KEY": True, "CAUSAL": True}),
        ("latent R512+64 64 rows", 64, 512, 64, 512, {"HAS_Q2": True, "VALUE_IS_KEY": True, "CAUSAL": True}),
        ("int4 KV D128 GQA8", 8, 128, 16, 128, {"QUANT": True, "K_BITS": 4, "V_BITS": 4, "K_GROUP": 32,
                                                "V_GROUP": 32}),
        ("int2 KV D128 64 rows", 64, 128, 16, 128, {"QUANT": True, "K_BITS": 2, "V_BITS": 2, "K_GROUP": 32,
                                                    "V_GROUP": 32}),
        ("int8 KV D128 GQA4", 4, 128, 16, 128, {"QUANT": True, "K_BITS": 8, "V_BITS": 8, "K_GROUP": 32,
                                                "V_GROUP": 32}),
    ]:
        quant = flags.get("QUANT", False)
        types = {**strides, **scalars, "scaling": "fp32", "po_ptr": "*fp32", "pl_ptr": "*fp32", "m_ptr": "*fp32",
                 **{p: "*bf16" for p in ("q_ptr", "q2_ptr", "k2_ptr", "ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")},
                 "k_ptr": "*u8" if quant else "*bf16", "v_ptr": "*u8" if quant else "*bf16"}
        block_r, block_n = attention_triton.launch_config(rows, max(dim, value_dim))
        constants = dict(HAS_Q2=False, QUANT=False, VALUE_IS_KEY=False, HAS_MASK=False, CAUSAL=False, K_BITS=8,
                         K_GROUP=1, V_BITS=8, V_GROUP=1, KV_DTYPE=tl.bfloat16, BLOCK_R=block_r, BLOCK_N=block_n,
                         BLOCK_D=dim, BLOCK_D2=dim2, BLOCK_DV=value_dim)
        constants.update(flags)
        yield label, fn, types, constants, attention_triton.NUM_WARPS
    yield ("merge", attention_triton._merge_kernel,
           {"po_ptr": "*fp32", "pl_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            **integers(["p_sp", "p_sr", "p_sd", "l_sp", "l_sr", "o_sr", "o_sd", "N_PART", "ROWS", "DV"])},
           dict(BLOCK_ROWS=attention_triton.merge_block_rows(512), BLOCK_DV=512), 4)
    yield ("merge Dv128", attention_triton._merge_kernel,
           {"po_ptr": "*fp32", "pl_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            **integers(["p_sp", "p_sr", "p_sd", "l_sp", "l_sr", "o_sr", "o_sd", "N_PART", "ROWS", "DV"])},
           dict(BLOCK_ROWS=attention_triton.merge_block_rows(128), BLOCK_DV=128), 4)

    q_types = {"x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*bf16", "zero_ptr": "*bf16",
               **integers(["T", "D", "PD", "NG_D"])}
    for bits in (2, 4, 8):
        for along_last in (True, False):
            block_t = lowbit_triton.block_tokens(128, 32, along_last, 1 << 20)
            yield (f"quantize int{bits} along_last={along_last}", lowbit_triton._quantize_kernel, q_types,
                   dict(BITS=bits, GROUP=32, ALONG_LAST=along_last, BLOCK_T=block_t, BLOCK_D=128),
                   lowbit_triton.NUM_WARPS)

    r_types = {"ids_ptr": "*i64", "counts_ptr": "*i64", "window_ptr": "*i64", "affinity_ptr": "*fp32",
               "novelty_ptr": "*fp32", "aff_den": "fp32", "nov_den": "fp32", "m_float": "fp32",
               **integers(["i_sl", "i_st", "i_sk", "S", "E", "WINDOW"])}
    for experts, per_token in ((128, 8), (256, 8), (64, 1)):
        yield (f"routing E{experts} m{per_token}", routing_features_triton._routing_kernel, r_types,
               dict(M=per_token, BLOCK_T=routing_features_triton.block_tokens(experts), BLOCK_E=experts),
               routing_features_triton.NUM_WARPS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100/H200)")
    args = parser.parse_args(argv)
    failures = 0
    for label, fn, types, constants, num_warps in cases():
        try:
            registers, stack = compile_one(fn, types, constants, num_warps, args.arch)
        except Exception as error:  # noqa: BLE001  (report every kernel, then fail)
            print(f"FAILED {label}: {type(error).__name__}: {error}")
            failures += 1
            continue
        verdict = "ok" if stack == 0 else "SPILLS"
        failures += stack != 0
        print(f"{verdict} {label}: {registers} registers, {stack} bytes of stack, {num_warps} warps")
    print("all kernels compiled without spills" if not failures else f"{failures} kernel(s) failed or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
