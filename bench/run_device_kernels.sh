#!/usr/bin/env bash
# One device call for issue 4: smoke check, kernel tests, bench (plain schedule), then the
# warp-specialized schedule's test and bench, each stage under its own timeout so a hang in a
# later stage cannot cost the earlier results. Run from the repo root with .whl/ carried
# (../shared/tools/device-wheels); logs and JSON land in $OUT.
# Usage: bench/run_device_kernels.sh [extra args for the main bench...]
#        MODE=tile bench/run_device_kernels.sh: only the 256-row tile variant's device tests,
#        the plain kernels' tests and the compute-bound bench points (default vs the
#        $TILE_VARIANTS configs vs torch._grouped_mm) into $OUT/moe_kernels_tile.json.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages || exit 1
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "
import torch
from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import finalize
y = torch.randn(16, 64, device='cuda')
inv = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device='cuda')
print('tiny CuTeDSL kernel ok:', torch.equal(finalize(CompileCache(), y, inv), (y[[3, 0]] + y[[1, 2]]).bfloat16()))"
} 2>&1 | tee "$OUT/env.txt"
rc=0
run() {  # run SECONDS LOG cmd...: one stage under a timeout, output teed to $OUT/LOG
  local secs=$1 log=$2; shift 2
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$log" || rc=1
}
if [ "${MODE:-}" = tile ]; then
  run ${T_TESTS:-130} tests_tile.txt python3 -m pytest --maxfail=3 -q -rs --durations=6 \
    tests/kernels/test_moe_sm90_tile256.py tests/kernels/test_moe_sm90.py
  run ${T_BENCH:-170} bench_tile_log.txt python3 bench/moe_kernels.py --tpe 256,1024 \
    --variants ${TILE_VARIANTS:-128x128f,256x64f,256x64} --multi-b-tpe none --out "$OUT/moe_kernels_tile.json" "$@"
  exit $rc
fi
run ${T_TESTS:-150} tests.txt python3 -m pytest --maxfail=5 -q -rs --durations=6 tests/kernels \
  --ignore=tests/kernels/test_moe_sm90_ws.py
run ${T_BENCH:-180} bench_log.txt python3 bench/moe_kernels.py --variants 64x64,64x128,128x128 \
  --out "$OUT/moe_kernels.json" "$@"
run ${T_WS_TESTS:-40} tests_ws.txt python3 -m pytest -x -q tests/kernels/test_moe_sm90_ws.py
run ${T_WS_BENCH:-70} bench_ws_log.txt python3 bench/moe_kernels.py --variants ws64x128,ws128x128 --only-variants --tpe 16,64,256,1024 \
  --multi-b-tpe none --out "$OUT/moe_kernels_ws.json"
exit $rc
