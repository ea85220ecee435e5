#!/usr/bin/env bash
# One bounded device call for the W4A8 kernels (NVFP4 weights on FP8 tensor cores), from the
# repository root: a smoke check of the fp8 backend against quant/w4a8.py's reference (a hang
# or a wrong answer stops the call there), the device tests (tests/kernels/test_w4a8_sm90.py),
# and the bench (bench/w4a8_kernels.py: W4A8 vs W4A16 vs fp8 torch._scaled_grouped_mm at
# DeepSeek-V3 and Qwen3-235B shapes, 16/64/256/1024 tokens per expert). Everything lands in
# $OUT/w4a8 (stages.txt, env.txt, smoke.txt, tests.txt, bench_log.txt, w4a8_kernels.json).
# Usage: [STAGES="smoke tests bench variants"] [BENCH_ARGS=...] bash bench/run_device_w4a8.sh
# (default stages: smoke tests bench; "variants" times bench/w4a8_kernels.py's VARIANTS)
set -o pipefail
source bench/device_env.sh
device_room w4a8
STAGES=${STAGES-smoke tests bench}
T0=$(date +%s)
if [[ " $STAGES " == *" smoke "* ]]; then
  timed_stage "${T_SMOKE:-120}" smoke.txt "$PY" - <<'PYEOF' || { cat "$OUT/smoke.txt"; echo "smoke failed: stopping"; exit 1; }
import time, torch
from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
from tensorrt_llm_dwdp.quant.w4a8 import w4a8_expert_mlp
fp8, bf16 = CuteDslMoeBackend(nvfp4_compute="fp8"), CuteDslMoeBackend()
ok = True
for hidden, inter, experts, top_k, tokens in ((256, 128, 8, 2, 5), (2048, 768, 128, 8, 17),
                                              (2048, 768, 128, 8, 300), (2048, 768, 128, 8, 2000)):
    w = preshuffled_experts(random_nvfp4_experts(experts, hidden, inter, seed=1))
    x = random_tokens(tokens, hidden, seed=2)
    ids, tw = skewed_routing(tokens, experts, top_k, seed=3, empty_experts=1)
    t0 = time.time()
    out = fp8.run_experts(x, ids, tw, w)
    torch.cuda.synchronize()
    dt = time.time() - t0
    y = torch.zeros(tokens, top_k, hidden, device="cuda")
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        y[t, j] = w4a8_expert_mlp(x[t], w.linear_expert(e), inter) * tw[t, j, None]
    want = sum(y[:, j] for j in range(top_k)).to(torch.bfloat16)
    err = ((out.double() - want.double()).norm() / want.double().norm()).item()
    w16 = bf16.run_experts(x, ids, tw, w)
    err16 = ((out.double() - w16.double()).norm() / w16.double().norm()).item()
    finite = bool(torch.isfinite(out).all())
    print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens}: W4A8 vs reference {err:.2e}, "
          f"vs W4A16 {err16:.2e}, finite {finite} ({dt:.1f} s incl. compile)", flush=True)
    ok &= finite and err < 1e-2
raise SystemExit(0 if ok else 1)
PYEOF
  cat "$OUT/smoke.txt"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  # the W4A8 tests, then the W4A16 ones whose kernel gained the e4m3 parameter
  timed_stage "${T_TESTS:-200}" tests.txt "$PY" -m pytest -q -p no:cacheprovider \
      tests/kernels/test_w4a8_sm90.py tests/kernels/test_moe_sm90.py \
      -k "test_w4a8_sm90 or run_experts_matches_torch_ref or every_token_tile or multi_b_is_bitwise"
  tail -5 "$OUT/tests.txt"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  timed_stage "${T_BENCH:-220}" bench_log.txt "$PY" bench/w4a8_kernels.py \
      --out "$OUT/w4a8_kernels.json" ${BENCH_ARGS:-}
fi
if [[ " $STAGES " == *" variants "* ]]; then  # not by default: W4A8 configurations vs default
  timed_stage "${T_VARIANTS:-200}" variants_log.txt "$PY" bench/w4a8_kernels.py \
      --variants ring4,bn64_2cta_1blk --tpe 16,64,256 --routing uniform --replays 3 \
      --out "$OUT/w4a8_variants.json" ${VARIANT_ARGS:-}
  tail -8 "$OUT/variants_log.txt"
  tail -12 "$OUT/bench_log.txt"
fi
cat "$OUT/stages.txt"
