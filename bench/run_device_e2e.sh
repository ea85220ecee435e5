#!/usr/bin/env bash
# The end-to-end prefill benchmark on one 2-GPU machine (nvidia-h200-x2), from the repo root:
#   bash bench/run_device_e2e.sh            # writes $OUT/e2e/{results.json,summary.md,*.png} + $OUT/e2e_run.log
# Env: OUT (default ./e2e_out), RANKS (default 2; 4/8 on the larger kinds), E2E_ARGS (extra flags for bench/e2e_prefill.py, e.g.
# "--moe-backend torch --tokens 1024,8192"), E2E_BUDGET_S (sweep seconds, default 180),
# WHEEL_DIR (carried wheels for the CuTeDSL backend; default .whl/, carry it to the device).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/e2e_out}"
mkdir -p "$OUT/e2e"
LOG="$OUT/e2e_run.log"

# NVLink multicast stays off on the shared machines.
. bench/device_env.sh

{
  echo "== $(date -u) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
} >"$LOG" 2>&1

ARGS=(--out "$OUT/e2e" --time-budget-s "${E2E_BUDGET_S:-180}")
# shellcheck disable=SC2206
ARGS+=(${E2E_ARGS:-})
set +e
if command -v mpirun >/dev/null 2>&1; then
  echo "== mpirun -np ${RANKS:-2}" >>"$LOG"
  timeout 340 mpirun --allow-run-as-root --oversubscribe -np "${RANKS:-2}" \
    -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH \
    "$PY" bench/e2e_prefill.py "${ARGS[@]}" >>"$LOG" 2>&1
else
  echo "== no mpirun here: the script starts its 2 ranks itself (TCP rendezvous)" >>"$LOG"
  timeout 340 "$PY" bench/e2e_prefill.py --ranks "${RANKS:-2}" --launcher tcp "${ARGS[@]}" >>"$LOG" 2>&1
fi
rc=$?
echo "== exit $rc $(date -u)" >>"$LOG"
tail -n 60 "$LOG"
exit $rc
