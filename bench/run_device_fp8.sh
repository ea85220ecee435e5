#!/usr/bin/env bash
# One device call for FP8 block-128 checkpoints (one H100/H200), from the repository root:
#   bash bench/run_device_fp8.sh
# Stages (STAGES selects; each under its own timeout, logged in $OUT/fp8/stages.txt):
#   smoke     torch's blockwise scaled GEMM at a DeepSeek-V3 shape against the reference
#             block-scaled GEMM, within the stated bound; a failure stops the call here
#   tests     the FP8 GPU tests: vendor GEMM vs reference at DeepSeek-V3 shapes and token counts
#             1..2048, compiled activation quantization, a whole FP8 model GPU vs CPU, the
#             quantizers' GPU bits equal to the CPU's, fp8 experts (torch reference) GPU vs CPU
#   bench     bench/fp8_linears.py: DeepSeek-V3's dense linears, FP8 vs bf16, 2K/8K/16K tokens
#   run       run --quant fp8 --device cuda: 2 DWDP ranks on the one GPU (CUDA IPC / VMM), tiny
#             FP8 preset, logits bitwise equal to one rank holding all experts
#   breakdown bench/prefill_breakdown.py on the DeepSeek-V3 slice, bf16 then FP8 dense linears,
#             same points (2 MoE layers, NVFP4 cutedsl experts in both)
# Expected: about 6-8 minutes in all (smoke 30 s, tests 150 s, bench 120 s, run 60 s,
# breakdown 2 x 90 s). In $OUT/fp8 (default ./device_out/fp8): stages.txt, logs.tar.gz (every
# stage's log), fp8_linears.json, run_fp8_summary.json, breakdown_{nvfp4,fp8}.json.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room fp8
STAGES=${STAGES-smoke tests bench run breakdown}
T0=$(date +%s)
rc=0

if [[ " $STAGES " == *" smoke "* ]]; then
  timed_stage 120 smoke.txt "$PY" - <<'EOF' || { echo "smoke failed: stopping"; exit 1; }
import torch
from tensorrt_llm_dwdp.model.fp8_linear import fp8_linear_scaled_mm, scaled_mm_weight_scales
from tensorrt_llm_dwdp.quant.fp8 import (blockwise_matmul_ref, dequantize_act_per_token,
                                         dequantize_weight_blocks, quantize_act_per_token,
                                         quantize_weight_blocks)
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
wq, ws = quantize_weight_blocks(torch.randn(576, 7168, device="cuda") * 0.02)
x = torch.randn(300, 7168, device="cuda").bfloat16()
got = fp8_linear_scaled_mm(x, wq, scaled_mm_weight_scales(ws)).float()
xq, xs = quantize_act_per_token(x)
ref = blockwise_matmul_ref(xq, xs, wq, ws)
mag = dequantize_act_per_token(xq, xs).abs() @ dequantize_weight_blocks(wq, ws).abs().T
ratio = ((got - ref).abs() / (2.0 ** -8 * ref.abs() + 2.0 ** -12 * mag)).max().item()
print(f"kv_a 576x7168, 300 tokens: max |vendor - ref| / bound = {ratio:.3f}", flush=True)
raise SystemExit(0 if ratio <= 1 else 1)
EOF
fi

if [[ " $STAGES " == *" tests "* ]]; then
  timed_stage 420 gpu_tests.txt "$PY" -m pytest -q -m gpu tests/gpu/test_fp8_linear_gpu.py \
      tests/unit/test_fp8.py tests/unit/test_fp8_moe.py || rc=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  timed_stage 420 fp8_linears.txt "$PY" bench/fp8_linears.py --out "$OUT/fp8_linears.json" || rc=1
fi

if [[ " $STAGES " == *" run "* ]]; then
  timed_stage 300 run_fp8.txt "$PY" -m tensorrt_llm_dwdp run --quant fp8 --device cuda --ranks 2 \
      --cache-dir /tmp/dwdp_fp8_cache --out /tmp/dwdp_fp8_run || rc=1
  cp /tmp/dwdp_fp8_run/summary.json "$OUT/run_fp8_summary.json" 2>/dev/null
fi

if [[ " $STAGES " == *" breakdown "* ]]; then
  for q in nvfp4 fp8; do
    timed_stage 360 "breakdown_$q.txt" "$PY" bench/prefill_breakdown.py --quant "$q" \
        --num-moe-layers 2 --points 2048x8,8192x2 --decode "" --kernel-shapes "" \
        --kernel-chunks "" --out "/tmp/dwdp_breakdown_$q" || rc=1
    cp "/tmp/dwdp_breakdown_$q/prefill_breakdown.json" "$OUT/breakdown_$q.json" 2>/dev/null
  done
fi

echo "total seconds $(( $(date +%s) - T0 ))" | tee -a "$OUT/stages.txt"
bundle_logs "$OUT"  # <= 8 files come back: stages.txt, logs.tar.gz and the JSON
exit $rc
