# Sourced by the bench/run_device_*.sh scripts, from the repository root: what every device run
# sets up before its first command.
# - NVLink multicast stays off (a program using it can take a shared host's GPUs out of service);
# - unbuffered Python output; PY is the interpreter (PYTHON overrides);
# - the CUTLASS DSL (nvidia-cutlass-dsl) from carried wheels when it does not import yet: WHEEL_DIR,
#   else .whl/ of this checkout or of the checkout a stage copy (.stage/NAME) lives in;
# - this checkout first on PYTHONPATH, so its package and kernels are the ones that run;
# - helpers: ``timed_stage SECONDS LOG cmd...`` runs one stage under a timeout, its output in
#   $STAGE_DIR/LOG (default $OUT), and appends "LOG exit RC seconds S" (plus "(at T s)" when the
#   script set T0) to $STAGE_RECORD (default $STAGE_DIR/stages.txt); it returns the stage's exit
#   code. ``device_room NAME``: OUT becomes $OUT/NAME (default ./device_out/NAME), created, with a
#   fresh stages.txt and env.txt (bench/device_report.py: what the run ran on). ``two_ranks
#   cmd...``: two ranks under mpirun, else over the TCP rendezvous (exported for bash -c).
#   ``bundle_logs DIR`` packs DIR's text logs (all *.txt and *.log but summary.txt and
#   stages.txt) into DIR/logs.tar.gz, since a device call returns at most 8 files.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! "$PY" -c "import cutlass" >/dev/null 2>&1; then
  for wheels in "${WHEEL_DIR:-}" .whl ../../.whl; do
    [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1 || continue
    [ -d /tmp/site/nvidia_cutlass_dsl ] || "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages${PYTHONPATH:+:$PYTHONPATH}"
    break
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

timed_stage() {
  local secs=$1 log=$2; shift 2
  local dir="${STAGE_DIR:-$OUT}" t0; t0=$(date +%s)
  timeout -k 5 "$secs" "$@" > "$dir/$log" 2>&1
  local rc=$?
  echo "$log exit $rc seconds $(( $(date +%s) - t0 ))${T0:+ (at $(( $(date +%s) - T0 )) s)}" \
    | tee -a "${STAGE_RECORD:-$dir/stages.txt}"
  return $rc
}

device_room() {
  OUT="${OUT:-$PWD/device_out}/$1"
  mkdir -p "$OUT"
  : > "$OUT/stages.txt"
  timed_stage 25 env.txt "$PY" bench/device_report.py
}

two_ranks() {
  if command -v mpirun >/dev/null 2>&1; then
    mpirun --allow-run-as-root --oversubscribe -np 2 "$@"
  else
    local port=$(( 20000 + RANDOM % 20000 )) pids=() rc=0
    for r in 0 1; do
      TRTLLM_DWDP_RANK=$r TRTLLM_DWDP_MASTER_ADDR=127.0.0.1 TRTLLM_DWDP_MASTER_PORT=$port "$@" &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    return $rc
  fi
}
export -f two_ranks

bundle_logs() {
  local dir=$1 logs
  logs=$(cd "$dir" && ls -1 -- *.txt *.log 2>/dev/null | grep -v -x -e summary.txt -e stages.txt)
  [ -n "$logs" ] || return 0
  (cd "$dir" && tar czf logs.tar.gz $logs && rm -f $logs)
}
