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
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

{
  echo "== $(date -u) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
} >"$LOG" 2>&1
# The CuTeDSL backend's wheel (nvidia-cutlass-dsl), carried in .whl/ (or WHEEL_DIR), installed
# the way bench/run_device_kernels.sh does; without it --moe-backend auto falls back to the next registered backend.
for dir in "${WHEEL_DIR:-}" .whl wheels; do
  if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "== installing carried wheels from $dir" >>"$LOG"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        "$dir"/*.whl >>"$LOG" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages"
    else
      echo "wheel install failed; cutedsl may be unavailable" >>"$LOG"
    fi
    break
  fi
done

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
