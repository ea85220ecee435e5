#!/usr/bin/env bash
# One device call for the load-time NVFP4 pre-shuffle (kernels room, issue 11; branch
# preshuffle, not on main: the variant lands only once it wins). Run from the repo root (or a
# stage copy) on one H200 with .whl carried for the CuTeDSL kernels:
#   bash bench/run_device_preshuffle.sh
# Stages, each under its own timeout (25 + 60 + 45 + 90 + 165 + 180 = 565 s at most; about 4-5
# minutes expected, compiles included), outputs in $OUT/preshuffle/ (stages.txt: exit and
# seconds; the text logs end up in logs.tar.gz, since a device call returns at most 8 files;
# the verdict lines are printed at the end):
#   env.txt            GPU, torch, CUTLASS DSL (bench/device_report.py)
#   smoke.txt          Qwen3-30B-A3B shapes, 300 tokens (bn 16): preshuffled FC1 + FC2 bitwise
#                      equal to the linear kernels; a hang or a mismatch stops the call before
#                      the long stages
#   smoke_bulk.txt     the same with weight_copy=bulk (one cp.async.bulk per block and stage);
#                      if it fails or hangs, the bulk variant is left out of the next two stages
#   run.txt            the main job end to end with the layout wired in: `python -m
#   run_summary.json   tensorrt_llm_dwdp run --moe-backend cutedsl --device cuda --weight-layout
#                      preshuffled` (tiny-deepseek-v3, 2 DWDP ranks on the one GPU: experts
#                      shuffled at load, prefetched as they are, the tagged views run the
#                      preshuffled kernels) and its parity against one rank holding all experts
#                      in the LINEAR layout (linear kernels): PASS means bitwise equal logits
#   tests.txt          tests/kernels -k preshuffled: bitwise vs the linear kernels at token tiles
#                      16 / 32 / 64 / 128 (Qwen3-30B-A3B, DeepSeek-V3), S = 3 views, K = 2880 and
#                      64-wide layers, against torch_ref too; bulk copies at 16 / 64 / 128
#   rs_variants.json   bench/rs_variants.py --variants preshuffled[+bulk]: FC1 / FC2 ms of the
#                      default (linear) against preshuffled (cp.async and bulk; at bn 128 also
#                      K tile 128 with a ring of 4) at DeepSeek-V3 and Qwen3-235B-A22B, 16 / 64 /
#                      256 / 1024 tokens per expert, each checked bitwise against the default
# STAGES="smoke bulk run tests variants all_tests" adds the whole tests/kernels (the linear path's
# SASS is byte-identical to main's, so it is not in the default set).
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_env.sh
device_room preshuffle
STAGES=${STAGES:-smoke bulk run tests variants}
export PY

# smoke FIELD=VALUE...: Qwen3-30B-A3B shapes, 300 tokens, the kernels with these RsConfig
# overrides on preshuffled experts, bitwise against the linear kernels (exit 1 if not).
smoke() {
  "$PY" - "$@" <<'PYEOF'
import sys, time, torch
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config
from tensorrt_llm_dwdp.kernels.testing import (MODELS, preshuffled_experts, random_nvfp4_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend, choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation
overrides = dict(a.split("=") for a in sys.argv[1:])
hidden, inter, experts, top_k = MODELS["qwen3_30b_a3b"]
weights = random_nvfp4_experts(experts, hidden, inter, seed=1)
backend = CuteDslMoeBackend()
x = random_tokens(300, hidden, seed=2)
ids, tw = skewed_routing(300, experts, top_k, seed=3)
bn = choose_token_tile(300 * top_k, experts)
plan = build_permutation(ids, experts, tile_m=bn)
outs = {}
for name, w, ov in (("linear", weights, {}), ("variant", preshuffled_experts(weights), overrides)):
    t0 = time.time()
    w13 = backend._table(w, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    w2 = backend._table(w, "w2_weight", "w2_weight_scale", "fc2_alpha")
    h = fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                          config=rs_config(bn, hidden, **ov))
    out = fc2_finalize(backend.cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                       config=rs_config(bn, inter, **ov))
    torch.cuda.synchronize()
    outs[name] = (h[plan.gather_index >= 0], out)
    print(f"{name} {ov}: bn {bn}, finite {bool(torch.isfinite(out).all())}, "
          f"{time.time() - t0:.1f} s incl. compile", flush=True)
same_h = torch.equal(outs["linear"][0], outs["variant"][0])
same = torch.equal(outs["linear"][1], outs["variant"][1])
diff = (outs["linear"][1].float() - outs["variant"][1].float()).abs().max().item()
print(f"h bitwise {same_h}, output bitwise {same} (max |diff| {diff:.3g})")
raise SystemExit(0 if same and same_h else 1)
PYEOF
}
export -f smoke

finish() {  # the verdicts to stdout, then the text logs into one file
  cat "$OUT/stages.txt"
  for f in smoke.txt smoke_bulk.txt; do [ -f "$OUT/$f" ] && { echo "== $f"; tail -n 3 "$OUT/$f"; }; done
  [ -f "$OUT/run.txt" ] && { echo "== run.txt"; grep -E "^ *rank|^ +[0-9]+ +cuda|parity|error" \
    "$OUT/run.txt" | tail -n 8; }
  [ -f "$OUT/tests.txt" ] && { echo "== tests.txt"; tail -n 15 "$OUT/tests.txt"; }
  bundle_logs "$OUT"
}
trap finish EXIT

if [[ " $STAGES " == *" smoke "* ]]; then
  if ! timed_stage 60 smoke.txt bash -c 'smoke weights=preshuffled'; then
    echo "smoke failed: stopping before the tests and the bench" | tee -a "$OUT/stages.txt"
    exit 1
  fi
fi
# bulk weight copies join the tests and the bench only if their own smoke passes
bulk=no
if [[ " $STAGES " == *" bulk "* ]]; then
  timed_stage 45 smoke_bulk.txt bash -c 'smoke weights=preshuffled weight_copy=bulk' && bulk=yes
fi
if [[ " $STAGES " == *" run "* ]]; then
  rm -rf /tmp/preshuffle_run
  timed_stage 90 run.txt "$PY" -m tensorrt_llm_dwdp run --moe-backend cutedsl --device cuda \
    --weight-layout preshuffled --timeout 80 --out /tmp/preshuffle_run
  cp /tmp/preshuffle_run/summary.json "$OUT/run_summary.json" 2>/dev/null
fi
if [[ " $STAGES " == *" tests "* ]]; then
  select="preshuffled"
  [ "$bulk" = yes ] || select="preshuffled and not bulk"
  timed_stage 165 tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
    tests/kernels -k "$select"
fi
if [[ " $STAGES " == *" variants "* ]]; then
  variants="preshuffled"
  [ "$bulk" = yes ] && variants="preshuffled+bulk"
  timed_stage 180 rs_variants_log.txt "$PY" bench/rs_variants.py \
    --models deepseek_v3,qwen3_235b_a22b --tpe 16,64,256,1024 --variants "$variants" \
    --out "$OUT/rs_variants.json"
fi
if [[ " $STAGES " == *" all_tests "* ]]; then
  timed_stage 240 all_tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
    tests/kernels
fi
