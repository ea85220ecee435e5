#!/usr/bin/env bash
# One device call for the second round of issue 12 (composite the default view, host offload
# with the composite view, torch-grouped dequantization). Run from the repo root (or a stage
# copy) on one H200 (two ranks share it), with .whl carried for the CuTeDSL kernels (without it
# the cutedsl parts skip):
#   bash bench/run_device_views2.sh
# Stages, each under its own timeout (10 + 150 + 90 + 45 s: under 5 minutes), outputs in
# $OUT/views2/ (stages.txt: exit code and seconds per stage):
#   env.txt              GPU, driver, torch, cuda.bindings, CUDA VMM granularity
#   tests_views.txt      pytest tests/gpu/test_composite_views_gpu.py: VMM primitives, two
#                        processes with composite views on 2 MiB pages, the main job on
#                        DeepSeek-V3-Lite shapes (1 dense + 1 MoE layer) with torch-grouped, then
#                        cutedsl composite and multi: bitwise to one rank holding all experts
#   tests_tiers.txt      pytest tests/gpu/test_tiers_gpu.py -k main_job: the failover command on
#                        the default (composite) view, offload at 25% with the composite view
#                        (DeepSeek-V3-Lite shapes: pool pages filled from the pinned host store)
#                        and UVM read-through at 75% with the multi view, all bitwise
#   expert_views.json    bench/expert_views.py: cutedsl multi vs composite step time and
#                        torch-grouped over composite (its dequantization now one index_select
#                        per chunk), DeepSeek-V3 NVFP4 layers, 3 layers, 4096 tokens per rank
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room views2

timed_stage 150 tests_views.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
  tests/gpu/test_composite_views_gpu.py

timed_stage 90 tests_tiers.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
  tests/gpu/test_tiers_gpu.py -k main_job

timed_stage 45 expert_views_log.txt bash -c "two_ranks $PY bench/expert_views.py \
  --backends cutedsl,torch-grouped --layers 3 --warmup 1 --steps 3 --timeout 40 \
  --out $OUT/expert_views.json"

{
  cat "$OUT/stages.txt"
  for f in tests_views.txt tests_tiers.txt; do
    [ -f "$OUT/$f" ] && echo "$f: $(tail -n 1 "$OUT/$f")"
  done
  "$PY" - "$OUT/expert_views.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(print("expert_views.json:", type(exc).__name__, exc))
for name, ranks in r["backends"].items():
    for rank, x in enumerate(ranks):
        steps = {k: round(v["step_ms"], 2) for k, v in x.items()
                 if isinstance(v, dict) and "step_ms" in v}
        print(f"{name} rank {rank}: step ms {steps}; composite/multi "
              f"{x.get('composite_over_multi')}; bitwise {x.get('all_bitwise_equal')}")
EOF
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
