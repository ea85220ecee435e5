#!/usr/bin/env bash
# One bounded device call for the FP8 MoE kernels (issue 24), from the repository root:
#   smoke  (<= 90 s) the FP8 layer vs quant.fp8's reference at 3 small shapes; a wrong answer
#          or a hang stops the call here, before the long stages;
#   tests  (<= 150 s) tests/kernels/test_moe_fp8.py (token counts, tiles, model shapes,
#          multi-B bitwise, -1 tiles, the 2^31 forward);
#   bench  (<= 330 s) bench/moe_kernels_fp8.py -> $OUT/fp8/moe_kernels_fp8_h200.json (ours vs
#          torch._scaled_grouped_mm / _grouped_mm, both models, uniform + skewed routing, the
#          kernel variants, "bulk" only if the tests stage passed; written after every point,
#          so a cut keeps what ran).
# The three bounds sum to 570 s: one device call (600 s).
#   ncu    (NCU=1, <= 90 s per point) ncu on FC1 and the first FC2 chunk of the second run of
#          bench/profile_fp8_kernel.py at NCU_POINTS ("deepseek_v3 16,deepseek_v3 256").
# Usage: [STAGES="smoke tests bench"] [BENCH_ARGS="..."] [NCU=1] bash bench/run_device_fp8.sh
#        (STAGES="" NCU=1: profiles only)
# Logs, stage times and the JSON land in $OUT/fp8 (./device_out/fp8 without $OUT).
set -o pipefail
source bench/device_env.sh
device_room fp8
STAGES=${STAGES-smoke tests bench}
T0=$(date +%s)
if [[ " $STAGES " == *" smoke "* ]]; then
  timed_stage "${T_SMOKE:-90}" smoke.txt "$PY" - <<'PYEOF' || { cat "$OUT/smoke.txt"; echo "smoke failed: stopping"; exit 1; }
import time, torch
from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import build_fp8_expert_table, fp8_moe_forward
from tensorrt_llm_dwdp.kernels.testing import (fp8_moe_reference, random_fp8_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation
cache, ok = CompileCache(), True
for hidden, inter, experts, top_k, tokens in ((128, 128, 4, 2, 5), (2048, 768, 128, 8, 300),
                                              (2048, 768, 128, 8, 3000)):
    w = random_fp8_experts(experts, hidden, inter, seed=1)
    t13 = build_fp8_expert_table([w["w3_w1_weight"]], [w["w3_w1_weight_scale_inv"]], [0])
    t2 = build_fp8_expert_table([w["w2_weight"]], [w["w2_weight_scale_inv"]], [0])
    x = random_tokens(tokens, hidden, seed=2)
    ids, tw = skewed_routing(tokens, experts, top_k, seed=3, empty_experts=1)
    bn = choose_token_tile(ids.numel(), experts)
    t0 = time.time()
    out = fp8_moe_forward(cache, x, ids, tw, t13, t2, build_permutation(ids, experts, tile_m=bn), bn)
    torch.cuda.synchronize()
    want, _ = fp8_moe_reference(x, ids, tw, w)
    err = ((out.double() - want.double()).norm() / want.double().norm()).item()
    finite = bool(torch.isfinite(out).all())
    print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens} bn={bn}: rel err {err:.2e} "
          f"finite {finite} ({time.time() - t0:.1f} s incl. compile)", flush=True)
    ok &= finite and err < 2e-2
raise SystemExit(0 if ok else 1)
PYEOF
  cat "$OUT/smoke.txt"
fi
tests_rc=1
if [[ " $STAGES " == *" tests "* ]]; then
  timed_stage "${T_TESTS:-150}" tests.txt "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_moe_fp8.py
  tests_rc=$?
  tail -5 "$OUT/tests.txt"
fi
# the bulk-copy variant is timed only once its GPU tests passed in this call (a wrong
# transaction count would hang the bench, not fail it)
variants=1cta,2cta,bn64_2cta
[[ $tests_rc == 0 ]] && variants=$variants,bulk
if [[ " $STAGES " == *" bench "* ]]; then
  timed_stage "${T_BENCH:-330}" bench.txt "$PY" bench/moe_kernels_fp8.py \
    --out "$OUT/moe_kernels_fp8_h200.json" ${BENCH_ARGS:---variants $variants}
  cat "$OUT/bench.txt"
fi
if [[ "${NCU:-0}" == 1 ]]; then
  sections="--section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed"
  IFS=, read -ra points <<< "${NCU_POINTS:-deepseek_v3 16,deepseek_v3 256}"  # "MODEL TPE,..."
  for point in "${points[@]}"; do
    set -- $point
    # the first FC1 (compiles) plus one run's launches: FC1 + FC2 of the second run are next
    skip=$("$PY" -c "
import sys; sys.path.insert(0, 'bench')
from profile_fp8_kernel import launches_per_run; print(1 + launches_per_run('$1'))")
    timed_stage "${T_NCU:-90}" "ncu_$1_$2.txt" ncu --clock-control none -k regex:Fp8BlockGemm \
      --launch-skip "$skip" --launch-count 2 $sections \
      "$PY" bench/profile_fp8_kernel.py "$1" "$2"
  done
fi
cat "$OUT/stages.txt"
