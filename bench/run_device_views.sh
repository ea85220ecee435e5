#!/usr/bin/env bash
# One device call for issue 12 (composite expert views). Run from the repo root (or a stage
# copy), with .whl carried for the CuTeDSL kernels (without it the cutedsl parts skip):
#   bash bench/run_device_views.sh
# Two DWDP ranks share one H200 (two processes on one GPU; two GPUs are used when present).
# Stages, each under its own timeout (25 + 150 + 80 + 45 s: 5 minutes at most) so a hang
# cannot cost the rest; outputs in $OUT/views/ (stages.txt: exit code and seconds per stage):
#   env.txt              GPU, driver, torch, cuda.bindings, CUDA VMM granularity (min/recommended)
#   tests.txt            pytest tests/gpu/test_composite_views_gpu.py: VMM primitives (one range
#                        over two allocations, an allocation mapped twice, POSIX-fd export/import
#                        over the unix socket); two processes with composite views on 2 MiB pages
#                        (sizes around 2 MiB, poisoned pools, per-peer and batched copies, a lost
#                        descriptor server); the main job (DeepSeek-V3-Lite shapes, 1 dense + 1
#                        MoE layer) with --expert-view composite: torch-grouped then cutedsl, each
#                        bitwise equal to one rank holding all experts, and cutedsl composite ==
#                        multi, bitwise
#   expert_views.json    bench/expert_views.py, DeepSeek-V3 NVFP4 layers (E 256, H 7168, I 2048,
#                        W=P=128, 3 layers, 4096 tokens/rank, top-8, 1 warm-up + 3 timed steps):
#                        per backend a reference
#                        (one rank, all experts), then multi, composite, multi, composite:
#                        median step ms, stall and copy ms per layer, prefetch GB/s, bitwise vs
#                        the reference; composite_over_multi = step-time ratio; torch-grouped over
#                        composite with its max relative difference to cutedsl
#   prefetch_views.json  bench/prefetch_bandwidth.py --expert-view both: prefetch GB/s vs raw
#                        peer memcpy and the stall beside compute, multi and composite_ keys
#   summary.txt          the figures to read first (also printed at the end)
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room views

timed_stage 150 tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
  tests/gpu/test_composite_views_gpu.py

timed_stage 80 expert_views_log.txt bash -c "two_ranks $PY bench/expert_views.py \
  --backends cutedsl,torch-grouped --layers 3 --warmup 1 --steps 3 --timeout 50 --out $OUT/expert_views.json"

timed_stage 45 prefetch_views_log.txt bash -c "two_ranks $PY bench/prefetch_bandwidth.py \
  --expert-view both --contention-opt off --layers 2 --steps 3 --timeout 35 \
  --out $OUT/prefetch_views.json"

"$PY" - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, os, sys
out = sys.argv[1]
print(open(os.path.join(out, "stages.txt")).read())
tests = os.path.join(out, "tests.txt")
if os.path.exists(tests):
    lines = open(tests).read().strip().splitlines()
    print("tests:", lines[-1] if lines else "(no output)")
try:
    r = json.load(open(os.path.join(out, "expert_views.json")))
    for name, ranks in r["backends"].items():
        for rank, x in enumerate(ranks):
            if "error" in x:
                print(f"{name} rank {rank}: ERROR {x['error']}")
                continue
            phases = {k: v for k, v in x.items() if isinstance(v, dict)}
            steps = ", ".join(f"{k} {v['step_ms']:.2f}" for k, v in phases.items())
            print(f"{name} rank {rank}: step ms {steps}")
            print(f"  composite/multi {x.get('composite_over_multi', float('nan')):.4f}; all "
                  f"bitwise equal to the reference: {x['all_bitwise_equal']}; max rel diff vs "
                  f"first backend {x.get('max_rel_diff_vs_first_backend', 0):.3g}")
            for k, v in phases.items():
                if "prefetch_gbps" in v:
                    print(f"  {k}: prefetch {v['prefetch_gbps']:.1f} GB/s, copy "
                          f"{v['copy_ms_per_layer']:.3f} ms/layer, stall {v['stall_ms_per_layer']:.4f}"
                          f" ms/layer, buffers {v['buffer_gib']:.2f} GiB")
except Exception as exc:
    print("expert_views.json:", type(exc).__name__, exc)
try:
    p = json.load(open(os.path.join(out, "prefetch_views.json")))
    print("raw peer memcpy GB/s", [round(x, 1) for x in p["raw_peer_memcpy_gbps"]])
    for k, v in p.items():
        if k.endswith("_summary"):
            print(f"{k}: GB/s {[round(x, 1) for x in v['prefetch_gbps']]}, vs raw "
                  f"{[round(x, 3) for x in v['ratio_vs_raw']]}, stall/copy "
                  f"{[round(x, 4) for x in v['stall_over_copy']]}")
except Exception as exc:
    print("prefetch_views.json:", type(exc).__name__, exc)
EOF
cat "$OUT/summary.txt"
