#!/usr/bin/env python3
"""DeepSeek-V3's dense linears on FP8 tensor cores against bf16, same process, same inputs.

The projections of a DeepSeek-V3 layer outside the routed experts, grouped as the model runs
them (projections of one input are one unit: MLA's q_a + kv_a, the MLPs' gate + up), at each
token count:

- ``bf16``: ``nn.Linear`` on the bf16 weights (what the model runs without FP8; the baseline a
  user would pick);
- ``fp8``: the model's own call (``linear_siblings`` over ``Fp8Linear`` modules): the unit's
  input quantized once per token per 128 (the fused kernel of ``quant/fp8_device.py``), then
  torch's blockwise scaled GEMM (BlockWise1x128 x BlockWise128x128) per projection;
- ``fp8_gemm``: the GEMMs alone on pre-quantized activations (what the quantization costs).

Each is timed ``--repeats`` times over ``--iters`` back-to-back calls with CUDA events (after
warm-up); the JSON holds every repeat, the median and the spread (min, max). ``layer_totals``
sums the medians over a dense layer's units (MLA + dense MLP: DeepSeek-V3's first three layers)
and a MoE layer's MLA + shared expert, with the speed-up bf16 / fp8; the goal is >= 1.6x at 16K
tokens for the dense layer. Numerics: each projection also reports the largest |fp8 -
reference| / bound, the bound of ``tests/gpu/test_fp8_linear_gpu.py`` (<= 1 passes), on a slice
of at most 512 tokens.

    python bench/fp8_linears.py --out bench/results/fp8_linears_h200.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.json_out import emit  # noqa: E402
from tensorrt_llm_dwdp.model.fp8_linear import (  # noqa: E402
    Fp8Linear, linear_siblings, quantize_rows, scaled_mm_available, uses_fused_quant,
)
from tensorrt_llm_dwdp.quant.fp8 import (  # noqa: E402
    blockwise_matmul_ref, dequantize_act_per_token, dequantize_weight_blocks,
    quantize_act_per_token, quantize_weight_blocks,
)

# DeepSeek-V3 (hidden 7168, q_lora 1536, kv_lora 512 + rope 64, 128 heads, dense intermediate
# 18432, shared expert 2048): (unit, [(projection, N, K)]), the projections of one input together
UNITS = [
    ("mla.q_a+kv_a", [("q_a_proj", 1536, 7168), ("kv_a_proj_with_mqa", 576, 7168)]),
    ("mla.q_b", [("q_b_proj", 24576, 1536)]),
    ("mla.kv_b", [("kv_b_proj", 32768, 512)]),
    ("mla.o", [("o_proj", 7168, 16384)]),
    ("mlp.gate+up", [("mlp.gate_proj", 18432, 7168), ("mlp.up_proj", 18432, 7168)]),
    ("mlp.down", [("mlp.down_proj", 7168, 18432)]),
    ("shared.gate+up", [("shared.gate_proj", 2048, 7168), ("shared.up_proj", 2048, 7168)]),
    ("shared.down", [("shared.down_proj", 7168, 2048)]),
]
MLA = ("mla.q_a+kv_a", "mla.q_b", "mla.kv_b", "mla.o")
LAYERS = {"dense_layer": MLA + ("mlp.gate+up", "mlp.down"),
          "moe_layer_mla_shared": MLA + ("shared.gate+up", "shared.down")}
GOAL_SPEEDUP_16K = 1.6


def time_ms(fn, iters: int, repeats: int) -> dict:
    """Milliseconds per call: ``repeats`` measurements of ``iters`` calls each."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return {"median_ms": statistics.median(runs), "min_ms": min(runs), "max_ms": max(runs),
            "runs_ms": runs}


def error_ratio(x: torch.Tensor, module: Fp8Linear) -> float:
    """Largest |vendor - reference| over the test's bound on up to 512 tokens of ``x``."""
    x = x[:512]
    got = module(x).float()
    wq, ws = module.weight, module.weight_scale_inv
    xq, xs = quantize_act_per_token(x)
    ref = blockwise_matmul_ref(xq, xs, wq, ws)
    mag = dequantize_act_per_token(xq, xs).abs() @ dequantize_weight_blocks(wq, ws).abs().T
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -12 * mag
    return ((got - ref).abs() / bound).max().item()


def make_pair(n: int, k: int, seed: int) -> tuple[torch.nn.Linear, Fp8Linear]:
    """The same random weight as a bf16 ``nn.Linear`` and as an ``Fp8Linear`` (quantized with
    the checkpoints' recipe)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    with torch.device("cuda"):
        bf16 = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        fp8 = Fp8Linear(k, n, gemm="scaled_mm")
    q, s = quantize_weight_blocks(w)
    with torch.no_grad():
        bf16.weight.copy_(w)
        fp8.weight.copy_(q)
        fp8.weight_scale_inv.copy_(s)
    return bf16, fp8


def bench_unit(unit: str, projections: list, tokens: int, iters: int, repeats: int) -> dict:
    k = projections[0][2]
    pairs = [make_pair(n, k, seed=n * 7 + k + i) for i, (_, n, _) in enumerate(projections)]
    bf16 = [b for b, _ in pairs]
    fp8 = [f for _, f in pairs]
    gen = torch.Generator(device="cuda").manual_seed(tokens + k)
    x = torch.randn(tokens, k, device="cuda", generator=gen).bfloat16()
    xq = quantize_rows(x)
    lead = x.shape[:-1]
    with torch.inference_mode():
        rec = {"unit": unit, "projections": [{"name": name, "n": n, "k": kk}
                                             for name, n, kk in projections],
               "tokens": tokens, "fused_act_quant": uses_fused_quant(x),
               "bf16": time_ms(lambda: [m(x) for m in bf16], iters, repeats),
               "fp8": time_ms(lambda: linear_siblings(x, *fp8), iters, repeats),
               "fp8_gemm": time_ms(lambda: [m.forward_rows(xq, lead) for m in fp8], iters,
                                   repeats)}
        rec["error_over_bound"] = max(error_ratio(x, m) for m in fp8)
    rec["speedup_fp8_vs_bf16"] = rec["bf16"]["median_ms"] / rec["fp8"]["median_ms"]
    rec["speedup_fp8_gemm_vs_bf16"] = rec["bf16"]["median_ms"] / rec["fp8_gemm"]["median_ms"]
    flops = 2.0 * tokens * k * sum(n for _, n, _ in projections)
    rec["tflops_bf16"] = flops / rec["bf16"]["median_ms"] / 1e9
    rec["tflops_fp8"] = flops / rec["fp8"]["median_ms"] / 1e9
    return rec


def totals(results: list[dict], tokens: int) -> dict:
    by = {r["unit"]: r for r in results if r["tokens"] == tokens}
    out = {}
    for layer, names in LAYERS.items():
        bf16 = sum(by[n]["bf16"]["median_ms"] for n in names)
        fp8 = sum(by[n]["fp8"]["median_ms"] for n in names)
        out[layer] = {"bf16_ms": bf16, "fp8_ms": fp8, "speedup": bf16 / fp8}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2048,8192,16384", help="token counts (comma-separated)")
    ap.add_argument("--iters", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--units", default=None, help="subset of unit names (comma-separated)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not scaled_mm_available(torch.device("cuda")):
        print("error: needs an sm90 GPU with torch's blockwise scaled GEMM", file=sys.stderr)
        return 1
    started = time.perf_counter()
    token_counts = [int(t) for t in args.tokens.split(",")]
    chosen = [u for u in UNITS if args.units is None or u[0] in args.units.split(",")]
    results = []
    for tokens in token_counts:
        for unit, projections in chosen:
            rec = bench_unit(unit, projections, tokens, args.iters, args.repeats)
            results.append(rec)
            print(f"{unit:16s} T={tokens:6d} bf16 {rec['bf16']['median_ms']:7.3f} ms  fp8 "
                  f"{rec['fp8']['median_ms']:7.3f} ms (gemm {rec['fp8_gemm']['median_ms']:7.3f})"
                  f"  x{rec['speedup_fp8_vs_bf16']:.2f}  err/bound {rec['error_over_bound']:.2f}",
                  file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    layer_totals = {}
    if len(chosen) == len(UNITS):
        layer_totals = {str(t): totals(results, t) for t in token_counts}
    goal = None
    if "16384" in layer_totals:
        speedup = layer_totals["16384"]["dense_layer"]["speedup"]
        goal = {"dense_layer_speedup_16k": speedup, "min": GOAL_SPEEDUP_16K,
                "met": speedup >= GOAL_SPEEDUP_16K}
    emit({"bench": "fp8_linears", "device": torch.cuda.get_device_name(),
          "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
          "iters": args.iters, "repeats": args.repeats, "results": results,
          "layer_totals": layer_totals, "goal": goal,
          "numerics_ok": all(r["error_over_bound"] <= 1 for r in results),
          "wall_s": time.perf_counter() - started}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
