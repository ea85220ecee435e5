#!/usr/bin/env bash
# One device call for the serving issue (14), from the repository root:
#   bash bench/run_device_serving.sh            # results under $OUT/serving/ (about 3-4 minutes)
# Works on one GPU (the context and generation processes share it; CUDA IPC between two
# processes of one device) and on two (context on cuda:0, generation on cuda:1: a peer copy).
#   1. GPU-marked serving tests: KV hand-over out of a CUDA IPC export pool between processes
#      (the pool mapped once, mapped again after the exporter restarts), an unopenable handle,
#      and the sampler on CUDA (greedy rows bitwise, seeded draws independent of the batch);
#   2. KV hand-over GB/s of DeepSeek-V3's MLA cache (61 layers x 8K / 32K tokens, 0.58 / 2.3 GB):
#      CUDA IPC pool vs HTTP vs a raw cudaMemcpyAsync out of the same mapped pool, in one run,
#      with the fast path's phases (share request, pool mapping first / cached, destination
#      allocation, copy, release);
#   3. a DeepSeek-V3-shaped checkpoint (2 layers, real MLA/hidden sizes, vocab 1024) and the TTFT
#      of 8K- and 32K-token prompts through the disaggregated router with kv_transfer auto
#      (CUDA IPC pool) and http, plus a seeded sampled request that must repeat exactly (its
#      JSON is rewritten after every length, so a cut run keeps the 8K figures).
# Knobs: TOKENS ("8192 32768"), LAYERS (61), REPEATS (3), CKPT_LAYERS (2), PRESET (deepseek-v3),
# PYTHON (python3). Without a GPU everything runs on the CPU (shm instead of CUDA IPC), e.g. a dry run:
#   OUT=/tmp/o PRESET=tiny-deepseek-v3 TOKENS="64 256" LAYERS=2 REPEATS=1 bash bench/run_device_serving.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_out}"
R="$OUT/serving"
WORK=/tmp/dwdp_serving
mkdir -p "$R" "$WORK"
. bench/device_env.sh
TOKENS="${TOKENS:-8192 32768}"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
CTX=cuda:0
GEN=cuda:0
[ "${NGPU}" -ge 2 ] && GEN=cuda:1
[ "${NGPU}" -eq 0 ] && CTX=cpu && GEN=cpu
t_all=$(date +%s)
{
  date -u; "$PY" bench/device_report.py
  "$PY" -c 'import aiohttp; print("aiohttp", aiohttp.__version__)'
  echo "context $CTX generation $GEN"
} > "$R/setup.log" 2>&1

STAGE_DIR="$R" STAGE_RECORD="$R/setup.log"   # timed_stage: logs in $R, one line each in setup.log

# The checkpoint is written in the background while the tests and the bandwidth bench run.
MODEL="$WORK/${PRESET:-deepseek-v3}-L${CKPT_LAYERS:-2}-V1024"
( [ -f "$MODEL/config.json" ] || "$PY" -m tensorrt_llm_dwdp make-checkpoint --preset "${PRESET:-deepseek-v3}" \
    --num-layers "${CKPT_LAYERS:-2}" --vocab-size 1024 --quant nvfp4 --out "$MODEL" ) > "$R/checkpoint.log" 2>&1 &
ckpt_pid=$!

timed_stage 120 gpu_tests.log "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_kv_ipc.py tests/unit/test_sampling.py
tail -n 3 "$R/gpu_tests.log"

# shellcheck disable=SC2086
timed_stage 120 kv_bandwidth.log "$PY" bench/kv_handover.py --device "$GEN" --export-device "$CTX" --tokens $TOKENS \
    --layers "${LAYERS:-61}" --repeats "${REPEATS:-3}" --out "$R/kv_handover.json"

wait "$ckpt_pid"; echo "checkpoint exit $? (written by $(( $(date +%s) - t_all )) s)" | tee -a "$R/setup.log"
# shellcheck disable=SC2086
timed_stage 200 ttft.log "$PY" bench/kv_handover.py --ttft "$MODEL" --device "$GEN" --export-device "$CTX" \
    --tokens $TOKENS --repeats 3 --start-timeout 90 --out "$R/kv_handover_ttft.json"

"$PY" - "$R" <<'PY' | tee "$R/summary.json"
import json, os, sys
r = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(r, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"missing": f"{name}: {e}"}
bw, tt = load("kv_handover.json"), load("kv_handover_ttft.json")
ms = lambda v: None if v is None else round(v * 1e3, 3)
summary = {"gpu": bw.get("gpu"), "bandwidth_GBps": [
    {"tokens": s["tokens"], "GB": round(s["nbytes"] / 1e9, 3), "ipc_path": s["fast"]["path"],
     "ipc": round(s["fast"]["end_to_end_gb_per_s"], 1), "http": round(s["http"]["end_to_end_gb_per_s"], 2),
     "raw_cudaMemcpy": round(s["raw"]["gb_per_s"], 1), "ipc_over_http": round(s["fast_over_http"], 1),
     "ipc_over_raw": round(s["fast_over_raw"], 3),
     "ipc_phases_ms": {k: ms(v) for k, v in s["fast"].get("phases_s", {}).items()},
     "ipc_copy_GBps": round(s["fast"].get("copy_gb_per_s") or 0, 1)} for s in bw.get("sizes", [])],
    "ttft_s_median": tt.get("ttft_s_median"),
    "ttft_kv_paths": {m: {t: sorted({p for run in v["runs"] for p in run["kv"]}) for t, v in r.get("lengths", {}).items()}
                      for m, r in tt.get("modes", {}).items()},
    "seeded_sampling_reproduces": {m: v.get("seeded_sampling_reproduces") for m, v in tt.get("modes", {}).items()},
    "ok": {"bandwidth": bw.get("ok"), "ttft": tt.get("ok")}}
print(json.dumps(summary, indent=1))
PY
echo "total seconds $(( $(date +%s) - t_all ))" | tee -a "$R/setup.log"
