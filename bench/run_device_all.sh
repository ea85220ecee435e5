#!/usr/bin/env bash
# The session's closing device runs on ONE H200 (ranks share it over CUDA IPC), in two calls
# that fit a 30-minute device budget; from the repository root, with .whl carried:
#   PHASE=1 bash bench/run_device_all.sh     # <= 8 min: every room's GPU tests at once, then the
#                                            # end-to-end comparisons and the composite-view bench
#   PHASE=2 bash bench/run_device_all.sh     # ~4 min (machine still warm): KV hand-over GB/s and
#                                            # TTFT per path, host-tier H2D / failover / offload
# Each room's own script (run_device_{compare,views,serving,tiers}.sh) is the full version of
# its part; this one runs the same programs with shorter settings so that all of them fit.
# Phase 1 runs the per-step sweep alone on the GPU while the checkpoints are written on the host,
# then the correctness tests of four rooms concurrently (they assert results, not speed), then
# every other timed stage alone on the GPU.
# Phase 1 knobs (default: all): TESTS, a subset of "views serving tiers compare"; BENCHES, of
# "serve_compare e2e_prefill expert_views". After a kernel change, the end-to-end comparisons
# and the tests that build kernels: PHASE=1 TESTS="views compare" BENCHES="serve_compare e2e_prefill" KV_MODEL=0.
# Outputs: $OUT/stages.txt (exit code and seconds per stage) and $OUT/phaseN.tgz (every log and
# JSON: <stage>.log, compare/, views/, serving/, tiers/), two files, within what $OUT returns.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
FINAL="${OUT:-$ROOT/device_out}"
OUT="$FINAL/phase${PHASE:-1}"
mkdir -p "$OUT"
. bench/device_env.sh
WORK=/tmp/dwdp_all          # kept between the two calls while the machine stays warm
mkdir -p "$WORK"
T0=$(date +%s)

TWO_RANKS=(mpirun --allow-run-as-root --oversubscribe -np 2 -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
           -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH -x PYTHONUNBUFFERED)

DSV3="$WORK/dsv3-1dense-2moe-V1024"     # serve_compare's context model
GEN="$WORK/tiny-gen"                     # its (unused) generation server's model
DSV3_2L="$WORK/dsv3-L2-V1024"            # the KV hand-over TTFT model

if [ "${PHASE:-1}" = 1 ]; then
  TESTS="${TESTS:-views serving tiers compare}"
  BENCHES="${BENCHES:-serve_compare e2e_prefill expert_views}"
  wants() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }
  "$PY" bench/device_report.py > "$OUT/env.log" 2>&1
  : > "$OUT/stages.txt"
  ( "$PY" - "$DSV3" "$GEN" <<'EOF'
import os, sys
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
model, gen = sys.argv[1], sys.argv[2]
write_synthetic_checkpoint(gen, get_preset("tiny-deepseek-v3", num_layers=2, vocab_size=1024), quant="nvfp4")
write_synthetic_checkpoint(model, get_preset("deepseek-v3", num_layers=3, vocab_size=1024,
                           overrides={"first_k_dense_replace": 1}), quant="nvfp4", seed=1)
EOF
  ) > "$OUT/checkpoints.log" 2>&1 &
  ckpt=$!
  ckpt2=""   # phase 2's TTFT model (KV_MODEL=0: not needed, e.g. a re-run of phase 1 alone)
  [ "${KV_MODEL:-1}" = 1 ] && { ( "$PY" -m tensorrt_llm_dwdp make-checkpoint --preset deepseek-v3 --num-layers 2 \
      --vocab-size 1024 --quant nvfp4 --out "$DSV3_2L" ) > "$OUT/checkpoint_2l.log" 2>&1 & ckpt2=$!; }
  # The per-step sweep with 8K-token prompts (own rate and lockstep), alone on the GPU while the
  # checkpoints are written on the host.
  wants "$BENCHES" e2e_prefill && timed_stage 100 e2e_prefill.log "${TWO_RANKS[@]}" "$PY" bench/e2e_prefill.py \
      --out "$OUT/compare/e2e" --preset deepseek-v3 --num-moe-layers 4 --tokens 8192,16384 --prompt-length 8192 \
      --iters 2 --time-budget-s 70 --moe-backend cutedsl
  tail -n 12 "$OUT/compare/e2e/summary.md" 2>/dev/null
  # Correctness, up to four rooms at once (each asserts its results; none is timed).
  pids=()
  wants "$TESTS" views && { timed_stage 200 tests_views.log "$PY" -m pytest -q -rs -p no:cacheprovider \
      tests/gpu/test_composite_views_gpu.py & pids+=($!); }
  wants "$TESTS" serving && { timed_stage 200 tests_serving.log "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
      tests/gpu/test_kv_ipc.py tests/unit/test_sampling.py & pids+=($!); }
  wants "$TESTS" tiers && { timed_stage 200 tests_tiers.log "$PY" -m pytest -q -rs -p no:cacheprovider \
      tests/gpu/test_tiers_gpu.py & pids+=($!); }
  wants "$TESTS" compare && { timed_stage 200 tests_compare.log "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
      tests/gpu/test_expert_parallel_gpu.py tests/gpu/test_moe_warmup_gpu.py tests/unit/test_permute.py \
      tests/unit/test_moe_torch_ref.py & pids+=($!); }
  [ "${#pids[@]}" -gt 0 ] && wait "${pids[@]}"
  wait "$ckpt"; echo "checkpoints exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/stages.txt"
  for f in $TESTS; do tail -n 1 "$OUT/tests_$f.log"; done

  # The headline: one request stream through the router, DWDP vs EP vs replicated.
  left=$(( 420 - ($(date +%s) - T0) )); [ "$left" -lt 150 ] && left=150
  wants "$BENCHES" serve_compare && timed_stage "$left" serve_compare.log "$PY" bench/serve_compare.py --out "$OUT/compare/serve" --ranks 2 \
      --model "$DSV3" --gen-model "$GEN" --moe-backend cutedsl --num-prompts 24 --concurrency 8 \
      --max-num-tokens 8192 --max-batch-size 8 --start-timeout 120
  cat "$OUT/compare/serve/summary.md" 2>/dev/null
  rm -rf "$OUT/compare/serve/work/tiny-ckpt"   # the servers' logs (kernel compiles) stay in work/<mode>/
  # Composite vs multi views (cutedsl and torch-grouped), bitwise and step time in one run.
  mkdir -p "$OUT/views"
  wants "$BENCHES" expert_views && timed_stage 70 expert_views.log "${TWO_RANKS[@]}" "$PY" bench/expert_views.py --backends cutedsl,torch-grouped --layers 3 \
      --warmup 1 --steps 3 --timeout 50 --out "$OUT/views/expert_views.json"
  if [ -n "$ckpt2" ]; then
    wait "$ckpt2"; echo "checkpoint_2l exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/stages.txt"
  fi
else
  mkdir -p "$OUT/serving" "$OUT/tiers"
  : > "$OUT/stages.txt"
  timed_stage 50 kv_bandwidth.log "$PY" bench/kv_handover.py --device cuda:0 --export-device cuda:0 --tokens 8192 32768 \
      --layers 61 --repeats 2 --out "$OUT/serving/kv_handover.json"
  [ -f "$DSV3_2L/config.json" ] && timed_stage 60 kv_ttft.log "$PY" bench/kv_handover.py --ttft "$DSV3_2L" --device cuda:0 \
      --export-device cuda:0 --tokens 8192 --repeats 1 --start-timeout 45 --out "$OUT/serving/kv_handover_ttft.json"
  timed_stage 30 tiers_h2d.log "$PY" bench/tiers.py h2d --experts 64 --host-experts 32 --layers 4 --steps 4 --out "$OUT/tiers/h2d.json"
  timed_stage 50 tiers_failover.log "$PY" bench/tiers.py failover --experts 63 --layers 4 --tokens 2048 --kill-at 6 --after 4 \
      --backend torch --timeout 25 --work /tmp/tiers_failover --out "$OUT/tiers/failover.json"
  timed_stage 35 tiers_offload.log "$PY" bench/tiers.py offload --experts 64 --host-experts 32 --layers 4 \
      --tokens 1024 8192 32768 --iters 2 --budget-s 25 --out "$OUT/tiers/offload.json"
  echo "files left in /dev/shm: $(ls /dev/shm | grep -c trtllm_dwdp)" | tee -a "$OUT/stages.txt"
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/stages.txt"
cp "$OUT/stages.txt" "$FINAL/stages_phase${PHASE:-1}.txt"
tar czf "$FINAL/phase${PHASE:-1}.tgz" -C "$FINAL" "phase${PHASE:-1}" && rm -rf "$OUT"
