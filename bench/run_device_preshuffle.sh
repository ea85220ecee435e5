#!/usr/bin/env bash
# One device call for the load-time NVFP4 pre-shuffle (kernels room, issue 11; branch
# preshuffle, not on main: the variant lands only once it wins). Run from the repo root (or a
# stage copy) on one H200 with .whl carried for the CuTeDSL kernels:
#   bash bench/run_device_preshuffle.sh
# Stages, each under its own timeout (20 + 60 + 120 + 200 s = 400 s at most; about 4 minutes
# expected, compiles included), outputs in $OUT/preshuffle/ (stages.txt: exit and seconds):
#   env.txt            GPU, torch, CUTLASS DSL (bench/device_report.py)
#   smoke.txt          Qwen3-30B-A3B shapes, 300 tokens: preshuffled FC1 + FC2 bitwise equal to
#                      the linear kernels (one compile each); a hang or a mismatch stops the call
#                      before the long stages
#   tests.txt          tests/kernels -k preshuffled: bitwise vs the linear kernels at token tiles
#                      16 / 32 / 64 / 128 (Qwen3-30B-A3B, DeepSeek-V3), S = 3 views, K = 2880 and
#                      64-wide layers, each against torch_ref too
#   rs_variants.json   bench/rs_variants.py --variants preshuffled: FC1 / FC2 ms of the default
#                      (linear) against preshuffled (and at bn 128 preshuffled with K tile 128,
#                      ring 4) at DeepSeek-V3 and Qwen3-235B-A22B, 16 / 64 / 256 / 1024 tokens
#                      per expert, each configuration checked bitwise against the default
# STAGES="smoke tests variants all_tests" adds the whole tests/kernels (the linear path's SASS
# is byte-identical to main's, so it is not in the default set).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/device_out}/preshuffle"
mkdir -p "$OUT"
. bench/device_env.sh
STAGES=${STAGES:-smoke tests variants}

: > "$OUT/stages.txt"
timed_stage 20 env.txt "$PY" bench/device_report.py

if [[ " $STAGES " == *" smoke "* ]]; then
  timed_stage 60 smoke.txt "$PY" - <<'EOF'
import time, torch
from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config
from tensorrt_llm_dwdp.kernels.testing import (MODELS, preshuffled_experts, random_nvfp4_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend, choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation
hidden, inter, experts, top_k = MODELS["qwen3_30b_a3b"]
weights = random_nvfp4_experts(experts, hidden, inter, seed=1)
backend = CuteDslMoeBackend()
x = random_tokens(300, hidden, seed=2)
ids, tw = skewed_routing(300, experts, top_k, seed=3)
bn = choose_token_tile(300 * top_k, experts)
plan = build_permutation(ids, experts, tile_m=bn)
outs = {}
for layout, w in (("linear", weights), ("preshuffled", preshuffled_experts(weights))):
    t0 = time.time()
    w13 = backend._table(w, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    w2 = backend._table(w, "w2_weight", "w2_weight_scale", "fc2_alpha")
    h = fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                          config=rs_config(bn, hidden, weights=layout))
    out = fc2_finalize(backend.cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                       config=rs_config(bn, inter, weights=layout))
    torch.cuda.synchronize()
    outs[layout] = (h[plan.gather_index >= 0], out)
    print(f"{layout}: bn {bn}, finite {bool(torch.isfinite(out).all())}, "
          f"{time.time() - t0:.1f} s incl. compile", flush=True)
same_h = torch.equal(outs["linear"][0], outs["preshuffled"][0])
same = torch.equal(outs["linear"][1], outs["preshuffled"][1])
diff = (outs["linear"][1].float() - outs["preshuffled"][1].float()).abs().max().item()
print(f"h bitwise {same_h}, output bitwise {same} (max |diff| {diff:.3g})")
raise SystemExit(0 if same and same_h else 1)
EOF
  if ! grep -q "^smoke.txt exit 0 " "$OUT/stages.txt"; then
    echo "smoke failed: stopping before the tests and the bench" | tee -a "$OUT/stages.txt"
    exit 1
  fi
fi
if [[ " $STAGES " == *" tests "* ]]; then
  timed_stage 120 tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
    tests/kernels -k preshuffled
fi
if [[ " $STAGES " == *" variants "* ]]; then
  timed_stage 200 rs_variants_log.txt "$PY" bench/rs_variants.py \
    --models deepseek_v3,qwen3_235b_a22b --tpe 16,64,256,1024 --variants preshuffled \
    --out "$OUT/rs_variants.json"
fi
if [[ " $STAGES " == *" all_tests "* ]]; then
  timed_stage 240 all_tests.txt "$PY" -m pytest -q -rs --durations=8 -p no:cacheprovider \
    tests/kernels
fi
cat "$OUT/stages.txt"
