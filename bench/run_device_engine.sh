#!/usr/bin/env bash
# The engine's GPU tests (attention kernels vs fp32 math, chunked prefill and batched decode on
# CUDA) and the prefill breakdown on one GPU (nvidia-h200), from the repo root:
#   OUT=/some/dir bash bench/run_device_engine.sh
# writes $OUT/engine/{env.log,gpu_tests.log,breakdown.log,prefill_breakdown.json,prefill_breakdown.png}.
# The cutedsl MoE backend needs nvidia-cutlass-dsl importable (install the carried wheel first,
# see COORD.md, or set WHEEL_DIR to a folder of wheels); without it, BREAKDOWN_ARGS can pick
# --moe-backend torch-grouped. Env: BREAKDOWN_ARGS (extra flags for bench/prefill_breakdown.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/engine_out}"
D="$OUT/engine"
mkdir -p "$D"
. bench/device_env.sh
{ echo "== $(date -u) $(hostname)"; "$PY" bench/device_report.py; } >"$D/env.log" 2>&1

echo "== gpu tests" | tee -a "$D/env.log"
timeout 120 "$PY" -m pytest -q -rA -s -m gpu tests/gpu/test_attention_gpu.py 2>&1 | tee "$D/gpu_tests.log"
tests_rc=$?
echo "== prefill breakdown" | tee -a "$D/env.log"
# shellcheck disable=SC2086
timeout 180 "$PY" bench/prefill_breakdown.py --out "$D" ${BREAKDOWN_ARGS:-} 2>&1 | tee "$D/breakdown.log"
bench_rc=$?
echo "== exit tests $tests_rc bench $bench_rc $(date -u)" | tee -a "$D/env.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
