#!/usr/bin/env bash
# One device call for the kernels room (issue 11), from the repo root with PYTHONPATH set up
# for nvidia-cutlass-dsl (see COORD.md): a smoke check of the RS kernels (on preshuffled experts,
# the only layout they read) against the torch reference under a short timeout
# (a hang or a wrong answer stops the call there, before the long stages), the device kernel
# tests, the bench (bf16 + fp8 baselines; DeepSeek-V3 and Qwen3-235B-A22B shapes), `run
# --moe-backend cutedsl` on the embedded default model (the loader preshuffles the experts for
# cutedsl, --weight-layout auto; CLI_ARGS adds flags) and, with NCU=1,
# ncu on a memory-bound
# and a compute-bound FC1/FC2 point; stage "variants" times kernel configurations against the
# default (bench/rs_variants.py, VARIANT_ARGS). Logs and JSON in $OUT/kernels.
# Usage: [NCU=1 [NCU_POINTS="deepseek_v3 16,deepseek_v3 1024"]] [STAGES="smoke tests bench cli variants"] bench/run_device_kernels.sh
# (STAGES="" with NCU=1 profiles only)
set -o pipefail
OUT=${OUT:-/tmp/out}/kernels
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${STAGES-smoke tests bench cli}  # set but empty: no stage (e.g. NCU=1 alone)
rc=0
run() {  # run SECONDS LOG cmd...: one stage under a timeout, output teed to $OUT/LOG
  local secs=$1 log=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$secs" "$@" 2>&1 | tee "$OUT/$log"
  local st=${PIPESTATUS[0]}
  echo "[stage $log: exit $st in $((SECONDS - t0)) s]" | tee -a "$OUT/stages.txt"
  return "$st"
}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [[ " $STAGES " == *" smoke "* ]]; then
  run "${T_SMOKE:-120}" smoke.txt python3 - <<'EOF' || { echo "smoke failed: stopping"; exit 1; }
import time, torch
from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
backend, ref = CuteDslMoeBackend(), TorchMoeBackend()
ok = True
for hidden, inter, experts, top_k, tokens in ((64, 64, 16, 4, 5), (2048, 768, 128, 8, 300),
                                              (2048, 768, 128, 8, 2000)):
    w = preshuffled_experts(random_nvfp4_experts(experts, hidden, inter, seed=1))
    x = random_tokens(tokens, hidden, seed=2)
    ids, tw = skewed_routing(tokens, experts, top_k, seed=3, empty_experts=1)
    t0 = time.time()
    out = backend.run_experts(x, ids, tw, w)
    torch.cuda.synchronize()
    want = ref.run_experts(x, ids, tw, w)
    err = ((out.double() - want.double()).norm() / want.double().norm()).item()
    finite = bool(torch.isfinite(out).all())
    print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens}: rel err {err:.2e} "
          f"finite {finite} ({time.time() - t0:.1f} s incl. compile)", flush=True)
    ok &= finite and err < 1e-2
raise SystemExit(0 if ok else 1)
EOF
fi
if [[ " $STAGES " == *" variants "* ]]; then
  run "${T_VARIANTS:-200}" variants_log.txt python3 bench/rs_variants.py \
    --out "$OUT/rs_variants.json" ${VARIANT_ARGS:-} || rc=1
fi
if [[ " $STAGES " == *" tests "* ]]; then
  run "${T_TESTS:-200}" tests.txt python3 -m pytest --maxfail=4 -q -rs --durations=10 \
    tests/kernels || rc=1
fi
if [[ " $STAGES " == *" bench "* ]]; then
  run "${T_BENCH:-220}" bench_log.txt python3 bench/moe_kernels.py \
    --out "$OUT/moe_kernels_h200.json" ${BENCH_ARGS:-} || rc=1
fi
if [[ " $STAGES " == *" cli "* ]]; then  # the embedded default (tiny-deepseek-v3) end to end
  run "${T_CLI:-120}" cli_run.txt python3 -m tensorrt_llm_dwdp run --moe-backend cutedsl \
    --device cuda ${CLI_ARGS:-} || rc=1
fi
if [[ "${NCU:-0}" == 1 ]]; then
  sections="--section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.sum,sm__inst_executed_pipe_fma.sum,sm__inst_executed_pipe_lsu.sum,sm__inst_executed.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"
  IFS=, read -ra points <<< "${NCU_POINTS:-deepseek_v3 16,deepseek_v3 1024}"  # "MODEL TPE,..."
  for point in "${points[@]}"; do
    set -- $point
    # second call's FC1 and first FC2 chunk (the first call compiles)
    skip=$(python3 -c "
from tensorrt_llm_dwdp.kernels.testing import MODELS
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import chunk_blocks
h, i, e, k = MODELS['$1']; n = -(-(h // 64) // chunk_blocks(h, k)); print(1 + n)")
    run "${T_NCU:-90}" "ncu_$1_$2.txt" ncu --clock-control none -k regex:W4A16Rs \
      --launch-skip "$skip" --launch-count 2 $sections \
      python3 bench/profile_moe_kernel.py "$1" "$2" || rc=1
  done
fi
exit $rc
