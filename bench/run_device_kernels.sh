#!/usr/bin/env bash
# One device call for issue 4: smoke check, kernel correctness tests, then the bench.
# Run on the device machine from the repo root with .whl/ carried (../shared/tools/device-wheels);
# logs and JSON land in $OUT. Usage: bench/run_device_kernels.sh [tests|bench|all] [bench args...]
set -o pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages || exit 1
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__ if hasattr(cutlass, '__version__') else '4.3.5')"
  python3 -c "
import torch
from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import finalize
y = torch.randn(16, 64, device='cuda')
inv = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device='cuda')
print('tiny CuTeDSL kernel ok:', torch.equal(finalize(CompileCache(), y, inv), (y[[3, 0]] + y[[1, 2]]).bfloat16()))"
} 2>&1 | tee "$OUT/env.txt"
rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest --maxfail=5 -q -rs --durations=8 tests/kernels 2>&1 | tee "$OUT/tests.txt" || rc=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  python3 bench/moe_kernels.py --out "$OUT/moe_kernels.json" "$@" 2> >(tee "$OUT/bench_log.txt" >&2) >/dev/null || rc=1
fi
exit $rc
