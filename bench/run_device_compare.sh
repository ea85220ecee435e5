#!/usr/bin/env bash
# Issue 15's device run, from the repository root (about 6-7 minutes; steps are cut at 7.5):
#   bash bench/run_device_compare.sh            # everything under $OUT/compare/
# One H200: two ranks share it (EP over our CUDA IPC exchange: NCCL refuses two ranks on one
# GPU; DWDP over CUDA IPC within the device). Two or more GPUs: one rank per GPU (EP over NCCL).
#   1. GPU tests: the CuTeDSL backend with empty (-1) slots; ExpertParallel on 2 ranks against
#      one rank holding all experts (torch and cutedsl backends; cuda_ipc, and nccl on 2 GPUs);
#      the EP serving mode (LockstepEngine, idle ranks joining) against the replicated model;
#      the CuTeDSL warm-up (no step compiles a kernel after it);
#   2. bench/serve_compare.py: one request stream (lognormal ~8K tokens, 10% at 32K) through the
#      router to a context group of 2 ranks in each mode (DWDP, EP, replicated) on a
#      DeepSeek-V3-shaped NVFP4 checkpoint (1 dense + 2 MoE layers, 256 experts, written in the
#      background during step 1); tokens/s per GPU, TTFT p50/p99, measured expert memory; per
#      rank steps, tokens per step, busy (wall, CUDA events), kernels compiled in the stream,
#      overlap of the ranks' steps;
#   3. bench/e2e_prefill.py: the synthetic per-step sweep with the reports that can fail (own
#      rate AND lockstep, memory from the allocator, missed points); DeepSeek-V3 slice, in the
#      time left.
# Knobs: PYTHON, E2E_ARGS (extra e2e_prefill flags), COMPARE_ARGS (extra serve_compare flags),
# MOE_BACKEND (cutedsl when it imports, else torch), WHEEL_DIR (.whl: nvidia-cutlass-dsl).
# CPU dry run of the plumbing (tiny preset, seconds per step):
#   OUT=/tmp/o DRY_RUN=1 bash bench/run_device_compare.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/compare_out}"
C="$OUT/compare"
WORK=/tmp/dwdp_compare
mkdir -p "$C" "$WORK"
. bench/device_env.sh
t_all=$(date +%s)

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[ -n "${DRY_RUN:-}" ] && NGPU=0
BACKEND="${MOE_BACKEND:-}"
if [ -z "$BACKEND" ]; then
  BACKEND=torch
  [ "$NGPU" -gt 0 ] && "$PY" -c 'from tensorrt_llm_dwdp.moe.backends import get_backend; get_backend("cutedsl")' \
      >/dev/null 2>&1 && BACKEND=cutedsl
fi
{
  date -u; "$PY" bench/device_report.py
  echo "gpus used $NGPU, moe backend $BACKEND, ranks 2"
} > "$C/setup.log" 2>&1

STAGE_DIR="$C" STAGE_RECORD="$C/setup.log"   # timed_stage: logs in $C, one line each in setup.log

# 3 (background): the DeepSeek-V3-shaped checkpoint and a tiny one for the idle generation server.
if [ "$NGPU" -gt 0 ]; then
  MODEL="$WORK/dsv3-1dense-2moe-V1024"; PRESET=deepseek-v3; LAYERS=3
else
  MODEL="$WORK/tiny-dsv3"; PRESET=tiny-deepseek-v3; LAYERS=3
fi
GEN_MODEL="$WORK/tiny-gen"
( "$PY" - "$MODEL" "$PRESET" "$LAYERS" "$GEN_MODEL" <<'EOF'
import os, sys
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
model, preset, layers, gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if not os.path.isfile(os.path.join(gen, "config.json")):
    write_synthetic_checkpoint(gen, get_preset("tiny-deepseek-v3", num_layers=2, vocab_size=1024), quant="nvfp4")
if not os.path.isfile(os.path.join(model, "config.json")):
    over = {"first_k_dense_replace": 1} if preset == "deepseek-v3" else {}
    write_synthetic_checkpoint(model, get_preset(preset, num_layers=layers, vocab_size=1024, overrides=over),
                               quant="nvfp4", seed=1)
EOF
) > "$C/checkpoint.log" 2>&1 &
ckpt_pid=$!

# 1. GPU tests (CPU dry run: their CPU twins).
if [ "$NGPU" -gt 0 ]; then
  timed_stage 120 gpu_tests.log "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_expert_parallel_gpu.py \
      tests/gpu/test_moe_warmup_gpu.py tests/unit/test_permute.py tests/unit/test_moe_torch_ref.py
else
  timed_stage 120 gpu_tests.log "$PY" -m pytest -q -p no:cacheprovider tests/multirank/test_expert_parallel_ranks.py \
      tests/multirank/test_ep_serving.py
fi
tail -n 3 "$C/gpu_tests.log"

# 2. The request stream through the router, three modes one after the other (the headline).
wait "$ckpt_pid"; echo "checkpoint exit $? (ready at $(( $(date +%s) - t_all )) s)" | tee -a "$C/setup.log"
left=$(( 330 - ($(date +%s) - t_all) ))   # the headline comes first: until 5.5 min at most
if [ "$NGPU" -gt 0 ]; then
  CMP=(--model "$MODEL" --gen-model "$GEN_MODEL" --moe-backend "$BACKEND" --num-prompts 32
       --concurrency 8 --max-num-tokens 8192 --max-batch-size 8 --start-timeout 150)
else
  CMP=(--smoke)
fi
# shellcheck disable=SC2206
CMP+=(${COMPARE_ARGS:-})
timed_stage "$(( left > 60 ? left : 60 ))" serve_compare.log "$PY" bench/serve_compare.py --out "$C/serve" --ranks 2 "${CMP[@]}"
cat "$C/serve/summary.md" 2>/dev/null
rm -rf "$C/serve/work/tiny-ckpt"   # the servers' logs stay in $C/serve/work/<mode>/

# 3. The per-step sweep (rank 0 of 2 is the heavy one under 4x) in the time left (points past
#    its budget are skipped and reported as missed).
left=$(( 450 - ($(date +%s) - t_all) ))
[ "$left" -lt 60 ] && left=60
if [ "$NGPU" -gt 0 ]; then
  E2E=(--preset deepseek-v3 --num-moe-layers 4 --tokens 2048,8192 --iters 2
       --time-budget-s "$(( left - 40 ))" --moe-backend "$BACKEND")
else
  E2E=(--preset tiny-deepseek-v3 --device cpu --num-moe-layers 4 --tokens 16,64 --seq-len 16
       --vocab-size 512 --iters 1)
fi
# shellcheck disable=SC2206
E2E+=(${E2E_ARGS:-})
timed_stage "$left" e2e_prefill.log mpirun --allow-run-as-root --oversubscribe -np 2 -x NCCL_NVLS_ENABLE \
    -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH -x PYTHONUNBUFFERED \
    "$PY" bench/e2e_prefill.py --out "$C/e2e" "${E2E[@]}"
tail -n 8 "$C/e2e/summary.md" 2>/dev/null

echo "total seconds $(( $(date +%s) - t_all ))" | tee -a "$C/setup.log"
