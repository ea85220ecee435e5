#!/usr/bin/env bash
# One device call for the fused FP8 activation quantization (kernels/sm90/fp8_quant). Run from
# the repo root (or a stage copy) on one H100 / H200 with .whl carried for the CUTLASS DSL:
#   bash bench/run_device_fp8quant.sh
# Stages, each under its own timeout (25 + 200 + 300 s: under 9 minutes; expected ~3 min),
# outputs in $OUT/fp8quant/ (stages.txt: exit code and seconds per stage):
#   env.txt        GPU, driver, torch
#   tests.txt      pytest tests/kernels/test_fp8_quant_sm90.py tests/unit/test_fp8_quant_host.py:
#                  the kernel bit for bit against quant.fp8.quantize_act_per_token on the device
#                  (T x K x scale layout, zero / tiny / huge / tie / single-token inputs, strided
#                  input, preallocated outputs with sentinels, CUDA-graph replay, NaN / inf,
#                  argument errors, the dispatcher)
#   fp8_quant.json bench/fp8_quant.py: ours (eager, CUDA graph; row and col scales) against the
#                  eager reference, the reference under torch.compile and the HBM floor at
#                  DeepSeek-V3 widths, T 1 .. 64K
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room fp8quant

timed_stage 200 tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
  tests/kernels/test_fp8_quant_sm90.py tests/unit/test_fp8_quant_host.py
tests_rc=$?

timed_stage 300 fp8_quant_log.txt "$PY" bench/fp8_quant.py --out "$OUT/fp8_quant.json"

{
  cat "$OUT/stages.txt"
  [ -f "$OUT/tests.txt" ] && echo "tests: $(tail -n 1 "$OUT/tests.txt")"
  "$PY" - "$OUT/fp8_quant.json" <<'PYEOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(print("fp8_quant.json:", type(exc).__name__, exc))
print(r["device"], "all bitwise", r["all_bitwise"], "compile s", round(r["compile_seconds"], 1))
print("compiled baseline:", r["compiled_baseline"])
print("T K: ours_graph ms (TB/s) | ours_row eager | ours_col eager | reference | compiled | floor")
fmt = lambda v: "-" if v is None else f"{v:.4f}"
for x in r["results"]:
    comp = x.get("compiled")
    print(f"{x['tokens']} {x['k']}: {x['ours_graph']['median_ms']:.4f} "
          f"({x['ours_graph_tbps']:.2f}) | {x['ours_row']['median_ms']:.4f} | "
          f"{x['ours_col']['median_ms']:.4f} | {x['reference']['median_ms']:.4f} | "
          f"{fmt(comp and comp['median_ms'])} | {fmt(x['floor_ms'])}")
PYEOF
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit $tests_rc
