#!/bin/bash
# The GPU checks of pikv-press, in one command, on a machine with a CUDA device and pikv-press's dependencies:
#   bash tests/gpu_check.sh [OUT_DIR]    (default results/gpu_check; logs and benchmark files land there)
# 1. the Triton kernels compiled (not interpreted) against their torch references, fast subset then sweeps;
# 2. the presses on CUDA (tests/test_press_cuda.py: fp32/fp16/bf16, a GPU+CPU split model, an offloaded layer);
# 3. the kernel benchmark (time per call and bandwidth, 8k-128k tokens);
# 4. the press benchmark on random-weight MoEs with Qwen3-30B-A3B's and Mixtral-8x7B's layer shapes (4 layers).
# Each step has a time cap (seconds, environment: KERNEL_CAP, PRESS_CAP, SLOW_CAP, BENCH_CAP) and its exit status is
# logged; a failing step does not stop the next. Where the dependencies are not installed, WHEELS=<folder of wheels>
# (pikv-press's pins: transformers 5.2, kvpress 0.5.5, tokenizers 0.22 ...) installs them into /tmp/site first.
set -u
OUT=${1:-results/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
$PY -c "import torch, triton, transformers, pikv_press; assert torch.cuda.is_available(), 'no CUDA device';
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name(0))" > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"; grep -q "^torch" "$OUT/env.txt" || exit 4
step() {  # step NAME CAP command...
  local name=$1 cap=$2; shift 2
  echo "== $name ($(elapsed))"
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"
  grep -E "^(FAILED|ERROR)|passed|failed|^rc=" "$OUT/$name.log" | tail -n 12
}
step kernel_tests "${KERNEL_CAP:-120}" $PY -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_kernel_*.py
step press_cuda "${PRESS_CAP:-90}" $PY -m pytest -q -p no:cacheprovider -rfE tests/test_press_cuda.py
step kernel_benchmark "${BENCH_CAP:-150}" $PY -m evaluation.kernel_benchmark --device cuda \
  --output "$OUT/kernel_benchmark.jsonl"
PRESSES=no_press,pikv,tova,snapkv,expected_attention,expert_balanced_tova,routing_novelty_tova,kvzip
for shape in qwen3-30b-a3b mixtral-8x7b; do
  step "benchmark_$shape" "${BENCH_CAP:-150}" $PY -m evaluation.benchmark --model "random-$shape-4l" --device cuda \
    --dtype bfloat16 --lengths 4096,16384 --press_name $PRESSES --context random --decode_tokens 16 --repeats 3 \
    --output_dir "$OUT/$shape" --no_progress
  tail -n 20 "$OUT/benchmark_$shape.log"
done
step kernel_sweeps "${SLOW_CAP:-240}" $PY -m pytest -q -p no:cacheprovider -n 8 -rfE -m slow tests/test_kernel_*.py
echo "== done ($(elapsed))"
