#!/usr/bin/env bash
# One bounded device call for the device-side MoE plan and CUDA graphs, from the repo root
# (one H100 or H200; at most 9.8 minutes, about 6 expected; every stage under its own timeout):
#   bash bench/run_device_graphs.sh          # results under $OUT/graphs/ (default ./device_out)
#   1. GPU tests: the device plan equal to the CPU one with no host sync; the sm90 kernels
#      (tile count read on the device) against the torch reference; the MoE layer / block
#      captured and replayed bitwise; the engine's graphed decode against eager; two DWDP
#      ranks sharing the GPU decoding from graphs, bitwise against one full rank;
#   2. bench/moe_host_time.py -> moe_host_time.json (host time per MoE layer beyond its
#      kernels, eager vs graphed, ours vs bf16 _grouped_mm; prefill A/B at 16K tokens);
#   3. bench/decode_tpot.py -> decode_tpot.json (5-layer DeepSeek-V3 slice, cutedsl, 512-token
#      prompts, 64 output tokens, TPOT at concurrency 1 and 16, eager and graphed).
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room graphs
T0=$(date +%s)
rc=0
timed_stage 270 gpu_tests.log "$PY" -m pytest -q -rA -p no:cacheprovider \
  tests/unit/test_permute.py tests/unit/test_permute_fused.py tests/gpu/test_cuda_graphs_gpu.py \
  tests/kernels/test_moe_sm90.py -k "not occupancy" -m gpu || rc=1
timed_stage 130 moe_host_time.log "$PY" bench/moe_host_time.py --out "$OUT/moe_host_time.json" || rc=1
timed_stage 160 decode_tpot.log "$PY" bench/decode_tpot.py --out "$OUT/decode_tpot.json" || rc=1
tail -n 5 "$OUT/gpu_tests.log"
bundle_logs "$OUT"
exit $rc
