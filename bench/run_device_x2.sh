#!/usr/bin/env bash
# One nvidia-h200-x2 call for the model/executor and serving issues, from the repo root:
#   bash bench/run_device_x2.sh
# 1. a synthetic DeepSeek-V3-shaped NVFP4 checkpoint (real hidden/MLA/expert sizes, 256 experts,
#    5 layers = 3 dense + 2 MoE, vocab 1024), written once to /tmp and shared by the steps below;
# 2. the main job on 2 GPUs with CUDA IPC (torch MoE backend): bitwise parity against one GPU
#    holding all experts;
# 3. GSM8K parity through the real servers (DWDP context group + generation server + router).
# Small results land in $OUT (<= 8 files); everything else in $OUT/all.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_out}"
WORK=/tmp/dwdp_x2
mkdir -p "$OUT" "$WORK"
. bench/device_env.sh
MODEL="$WORK/dsv3-L5-V1024"

{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
  t0=$(date +%s)
  [ -f "$MODEL/config.json" ] || "$PY" -m tensorrt_llm_dwdp make-checkpoint --preset deepseek-v3 \
      --num-layers 5 --vocab-size 1024 --quant nvfp4 --out "$MODEL"
  echo "checkpoint_seconds $(( $(date +%s) - t0 ))"
} > "$WORK/setup.log" 2>&1

t0=$(date +%s)
timeout "${RUN_TIMEOUT:-300}" "$PY" -m tensorrt_llm_dwdp run --model "$MODEL" --device cuda --max-tokens 4 \
    --out "$WORK/run_dsv3" > "$WORK/run_dsv3.log" 2>&1
echo "run exit $? seconds $(( $(date +%s) - t0 ))" >> "$WORK/setup.log"
cp "$WORK/run_dsv3/summary.json" "$OUT/run_dsv3_summary.json" 2>/dev/null
grep -v "step/s\]" "$WORK/run_dsv3.log" | tail -n 20

if [ "${SKIP_GSM8K:-0}" != 1 ]; then
  t0=$(date +%s)
  MODEL="$MODEL" OUT="$WORK/gsm8k" NUM_QUESTIONS="${NUM_QUESTIONS:-50}" MAX_TOKENS="${MAX_TOKENS:-16}" \
      timeout "${GSM8K_TIMEOUT:-330}" bash tests/accuracy/run_device_gsm8k.sh > "$WORK/gsm8k.log" 2>&1
  echo "gsm8k exit $? seconds $(( $(date +%s) - t0 ))" >> "$WORK/setup.log"
  cp "$WORK/gsm8k/gsm8k_parity_device.json" "$OUT/" 2>/dev/null
  tail -n 15 "$WORK/gsm8k.log"
fi
cp "$WORK/setup.log" "$OUT/"
cat "$WORK/setup.log"
tar czf "$OUT/all.tgz" --exclude='*.pt' --exclude='*.safetensors' -C "$WORK" . 2>/dev/null
