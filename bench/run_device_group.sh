#!/usr/bin/env bash
# Issue 7: DWDP groups of 4 or 8 GPUs (nvidia-h200-x4 / -x8), from the repo root:
#   RANKS=4 bash bench/run_device_group.sh        # or RANKS=8
# 1. CUDA IPC multi-rank correctness (tests/gpu, every rank's view bitwise = experts [0, E));
# 2. prefetch bandwidth with contention_opt off and on (E=256, W=P=256/RANKS), per rank and
#    aggregate NVLink ingress, against raw peer memcpy in the same run;
# 3. the main job on a DeepSeek-V3-shaped NVFP4 model: bitwise parity with one GPU holding all;
# 4. GSM8K parity through the disaggregated server with a RANKS-rank DWDP context group;
# 5. the end-to-end prefill benchmark with RANKS ranks.
# Small results in $OUT (<= 8 files); logs in $OUT/all.tgz. Carry .whl for the CuTeDSL backend.
set -uo pipefail
cd "$(dirname "$0")/.."
RANKS="${RANKS:-4}"
OUT="${OUT:-$PWD/device_out}"
WORK=/tmp/dwdp_group
mkdir -p "$OUT" "$WORK"
. bench/device_env.sh
MODEL="$WORK/dsv3-L5-V1024"
step() { echo "== $1 exit $2 seconds $3" | tee -a "$WORK/steps.log"; }

t=$(date +%s); DWDP_GPU_RANKS=$RANKS timeout 300 "$PY" -m pytest -q tests/gpu/test_cuda_ipc_multirank.py \
    > "$WORK/ipc_test.log" 2>&1; step ipc_test $? $(( $(date +%s) - t ))
t=$(date +%s); timeout 300 mpirun --allow-run-as-root -np "$RANKS" -x NCCL_NVLS_ENABLE -x PYTHONPATH \
    "$PY" bench/prefetch_bandwidth.py --w $((256 / RANKS)) --p $((256 / RANKS)) --contention-opt both \
    --out "$OUT/prefetch_bandwidth_${RANKS}gpu.json" > "$WORK/prefetch.log" 2>&1
step prefetch_bandwidth $? $(( $(date +%s) - t ))
t=$(date +%s)
[ -f "$MODEL/config.json" ] || "$PY" -m tensorrt_llm_dwdp make-checkpoint --preset deepseek-v3 \
    --num-layers 5 --vocab-size 1024 --quant nvfp4 --out "$MODEL" > "$WORK/checkpoint.log" 2>&1
timeout 400 "$PY" -m tensorrt_llm_dwdp run --model "$MODEL" --device cuda --ranks "$RANKS" --max-tokens 4 \
    --out "$WORK/run" > "$WORK/run.log" 2>&1; step run_parity $? $(( $(date +%s) - t ))
cp "$WORK/run/summary.json" "$OUT/run_${RANKS}gpu_summary.json" 2>/dev/null
t=$(date +%s); MODEL="$MODEL" OUT="$WORK/gsm8k" CONFIG="configs/deepseek_v3_dwdp${RANKS}.yaml" \
    GEN_DEVICE="cuda:$((RANKS - 1))" timeout 400 bash tests/accuracy/run_device_gsm8k.sh > "$WORK/gsm8k.log" 2>&1
step gsm8k_parity $? $(( $(date +%s) - t ))
cp "$WORK/gsm8k/gsm8k_parity_device.json" "$OUT/gsm8k_parity_${RANKS}gpu.json" 2>/dev/null
t=$(date +%s); OUT="$WORK/e2e" RANKS="$RANKS" timeout 400 bash bench/run_device_e2e.sh > "$WORK/e2e.log" 2>&1
step e2e_prefill $? $(( $(date +%s) - t ))
cp "$WORK/e2e/e2e/results.json" "$OUT/e2e_${RANKS}gpu.json" 2>/dev/null
cp "$WORK/steps.log" "$OUT/"
tar czf "$OUT/all.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='dsv3-*' -C "$WORK" . 2>/dev/null
cat "$WORK/steps.log"
