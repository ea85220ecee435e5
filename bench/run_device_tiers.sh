#!/usr/bin/env bash
# One device call for issue 13 (host tiers: DRAM backup, failover, rejoin, offload). Run from
# the repo root (or a stage copy) on one H200 (ranks share it over CUDA IPC; more GPUs are used
# when present). .whl (nvidia-cutlass-dsl) is optional: with it the offload sweep runs the
# CuTeDSL kernels, without it the torch reference backend.
#   bash bench/run_device_tiers.sh
# Stages, each under its own timeout (10 + 35 + 55 + 80 + 100 s: under 5 minutes), outputs in
# $OUT/tiers/ (stages.txt: exit code and seconds per stage):
#   env.txt        GPU, driver, torch, cuda-bindings, /dev/shm and host memory, mpirun
#   h2d.json       bench/tiers.py h2d: one rank prefetching 32 of 64 DeepSeek-V3 NVFP4 experts per
#                  layer (4 layers) from the host store (POSIX shm, cudaHostRegister) on the copy
#                  stream, GB/s beside raw cudaMemcpyAsync of the same copies from the same
#                  store, from cudaMallocHost memory, and one copy of a layer (goal: >= 0.9 of raw)
#   failover.json  bench/tiers.py failover: 3 ranks, host backup, 4 MoE layers of 63 experts,
#                  2048 tokens per step (torch backend); rank 1 goes idle at step 6 and is
#                  SIGKILLed 4 survivor steps later: per survivor the time from the kill to its
#                  first served step, the manager's own failover time, step ms with rank 1 busy,
#                  idle (its ranges over IPC) and dead (its ranges over PCIe; same GPU sharing
#                  as idle: pcie_over_ipc_step), every step's output bitwise equal
#   offload.json   bench/tiers.py offload: one rank, 4 MoE layers of 64 experts, 32 of them per
#                  layer in host memory: resident vs prefetch vs UVM read-through at 1K..32K
#                  tokens per step (median step ms, ratios, outputs vs resident)
#   tests.txt      pytest tests/gpu/test_tiers_gpu.py (H2D copies from the pinned store, batched
#                  too; managed memory read in place; SIGKILL during prefetch and compute over
#                  CUDA IPC; rejoin; corrupt store; the main job's failover command and offload
#                  parity on the GPU)
#   summary.txt    the figures to read first (also printed at the end)
#   logs.tar.gz    every stage's log (env.txt, tests.txt, *_log.txt): a call returns 8 files
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room tiers

timed_stage 35 h2d_log.txt "$PY" bench/tiers.py h2d --experts 64 --host-experts 32 --layers 4 \
  --steps 4 --out "$OUT/h2d.json"

timed_stage 55 failover_log.txt "$PY" bench/tiers.py failover --experts 63 --layers 4 --tokens 2048 \
  --kill-at 6 --after 4 --backend torch --timeout 30 --work /tmp/tiers_failover \
  --out "$OUT/failover.json"

timed_stage 80 offload_log.txt "$PY" bench/tiers.py offload --experts 64 --host-experts 32 --layers 4 \
  --tokens 1024 2048 4096 8192 16384 32768 --iters 3 --budget-s 50 --out "$OUT/offload.json"

timed_stage 100 tests.txt "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider \
  tests/gpu/test_tiers_gpu.py

ls /dev/shm | grep -c trtllm_dwdp | sed 's/^/files left in \/dev\/shm: /' >> "$OUT/stages.txt"

"$PY" - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, os, sys
out = sys.argv[1]
print(open(os.path.join(out, "stages.txt")).read())
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as exc:
        print(f"{name}: {type(exc).__name__} {exc}")
        return None
h = load("h2d.json")
if h:
    print(f"H2D prefetch {h.get('prefetch_gbps', 0):.1f} GB/s; raw same copies from the store "
          f"{h.get('raw_registered_gbps', 0):.1f}, from cudaMallocHost {h.get('raw_pinned_gbps', 0):.1f}, "
          f"one copy {h.get('raw_single_copy_gbps', 0):.1f}; ratio {h.get('ratio_vs_raw', 0):.3f} "
          f"(goal 0.9 met: {h.get('goal_met')}) {h.get('note', '')}")
f = load("failover.json")
if f:
    print(f"failover: return codes {f.get('returncodes')} (rank 1 -9 expected) {f.get('note', '')}")
    for r in ("rank0", "rank2"):
        x = f.get(r, {})
        if "error" in x:
            print(f"  {r}: {x['error']}")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
        print(f"  {r}: kill -> first served step {fmt(x.get('failover_ms_kill_to_first_served_step'))} ms "
              f"(retried {x.get('first_served_step_retried')}), manager {fmt(x.get('manager_failover_ms'))} ms; "
              f"step ms: 3 busy {fmt(x.get('step_ms_busy'))}, rank 1 idle (IPC) {fmt(x.get('step_ms_idle'))}, "
              f"rank 1 dead (PCIe) {fmt(x.get('step_ms_pcie'))}; bitwise every step {x.get('bitwise_equal_every_step')}")
o = load("offload.json")
if o:
    print(f"offload ({o.get('backend')}, E={o.get('experts')} L={o.get('layers')} H={o.get('host_experts')}) {o.get('note', '')}")
    rows = {m: {r['tokens']: r for r in rs if 'tokens' in r} for m, rs in o.get('modes', {}).items()}
    for m, rs in o.get('modes', {}).items():
        for r in rs:
            if 'error' in r:
                print(f"  {m}: ERROR {r['error']}")
    for t in o.get('tokens', []):
        cells = [f"{m} {rows[m][t]['step_ms']:.1f} ms" for m in rows if t in rows[m]]
        ratio = o.get('uvm_over_prefetch', {}).get(str(t), o.get('uvm_over_prefetch', {}).get(t))
        eq = [rows[m][t].get('bitwise_equal_resident') for m in ('prefetch', 'uvm') if t in rows.get(m, {})]
        print(f"  {t:>6} tokens: {', '.join(cells)}; uvm/prefetch {ratio if ratio is None else round(ratio, 3)}; bitwise vs resident {eq}")
tests = os.path.join(out, "tests.txt")
if os.path.exists(tests):
    lines = open(tests).read().strip().splitlines()
    print("tests:", lines[-1] if lines else "(no output)")
EOF
cat "$OUT/summary.txt"
bundle_logs "$OUT"
