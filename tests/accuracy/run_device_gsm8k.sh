#!/usr/bin/env bash
# GSM8K DWDP parity on 2 GPUs (nvidia-h200-x2), from the repository root:
#
#   bash tests/accuracy/run_device_gsm8k.sh
#
# Builds a synthetic DeepSeek-V3-shaped checkpoint with few layers (real hidden/expert shapes,
# E=256 NVFP4 experts, or FP8 with QUANT=fp8; byte tokenizer, small vocabulary), then runs
# gsm8k.py --mode parity:
# an aggregated server without DWDP (cuda:0) against a disaggregated deployment whose two
# context servers form one DWDP group (mpirun, one GPU each, experts shared through CUDA IPC,
# configs/deepseek_v3_dwdp2.yaml: W=P=128) plus a generation server (cuda:1) and the router.
# Every one of 50 answers must be identical. Report and logs go to $OUT (default ./device_out).
#
# Knobs (environment): QUANT (nvfp4; fp8 = DeepSeek's FP8 format, every projection linear and
# expert e4m3 with 128x128 scales), CKPT_DEVICE (cpu; cuda draws and quantizes the synthetic
# weights on the GPU, minutes faster for fp8), NUM_LAYERS (5 = 3 dense + 2 MoE), VOCAB (1024), NUM_QUESTIONS (50),
# MAX_TOKENS (32), NUM_FEWSHOT (2), MODEL (reuse a checkpoint), MOE_BACKEND (VANILLA = torch reference; CUTEDSL needs the
# nvidia-cutlass-dsl wheel), NVFP4_COMPUTE (bf16 = W4A16; fp8 = W4A8, CUTEDSL only), PYTHON (python3). A CPU dry run of the same script:
#   PRESET=tiny-deepseek-v3 CONFIG=configs/synthetic_tiny_dwdp2.yaml VOCAB=512 DEVICE=cpu \
#   GEN_DEVICE=cpu NUM_QUESTIONS=3 MIN_QUESTIONS=3 MAX_TOKENS=4 bash tests/accuracy/run_device_gsm8k.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "${root}"
out=${OUT:-${root}/device_out}
python_bin=${PYTHON:-python3}
mkdir -p "${out}"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

work=$(mktemp -d -t dwdp-gsm8k-XXXXXX)
trap 'rm -rf "${work}"' EXIT
model="${MODEL:-${work}/dsv3-synthetic}"

t0=$(date +%s)
if [ -z "${MODEL:-}" ]; then  # MODEL=path reuses a checkpoint written earlier in the same call
  "${python_bin}" -m tensorrt_llm_dwdp make-checkpoint --preset "${PRESET:-deepseek-v3}" --num-layers "${NUM_LAYERS:-5}" \
      --vocab-size "${VOCAB:-1024}" --quant "${QUANT:-nvfp4}" --device "${CKPT_DEVICE:-cpu}" \
      --out "${model}" | tee "${out}/checkpoint.json"
fi
t1=$(date +%s)

# The DWDP options of the context servers, with the chosen MoE backend.
"${python_bin}" - "${root}/${CONFIG:-configs/deepseek_v3_dwdp2.yaml}" "${work}/ctx_options.yaml" "${MOE_BACKEND:-VANILLA}" "${NVFP4_COMPUTE:-bf16}" <<'PY'
import sys, yaml
src, dst, backend, nvfp4_compute = sys.argv[1:]
with open(src) as f:
    cfg = yaml.safe_load(f)
cfg["moe_config"] = {"backend": backend, "nvfp4_compute": nvfp4_compute}
with open(dst, "w") as f:
    yaml.safe_dump(cfg, f)
PY

status=0
"${python_bin}" tests/accuracy/gsm8k.py --mode parity --model "${model}" \
    --dwdp-config "${work}/ctx_options.yaml" --num-questions "${NUM_QUESTIONS:-50}" \
    --num-fewshot "${NUM_FEWSHOT:-2}" --max-tokens "${MAX_TOKENS:-32}" --max-seq-len 2048 \
    --min-parity-questions "${MIN_QUESTIONS:-50}" \
    --device "${DEVICE:-cuda}" --gen-device "${GEN_DEVICE:-cuda:1}" --launcher mpirun --start-timeout 480 \
    --workdir "${work}/run" --report "${out}/gsm8k_parity_device.json" || status=$?
t2=$(date +%s)

mkdir -p "${out}/logs"
find "${work}/run" -name '*.log' -exec cp {} "${out}/logs/" \; 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "${out}/nvidia_smi.csv" 2>/dev/null || true
echo "{\"checkpoint_seconds\": $((t1 - t0)), \"parity_seconds\": $((t2 - t1)), \"exit_status\": ${status}}" \
    | tee "${out}/timing.json"
exit "${status}"
