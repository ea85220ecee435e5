#!/usr/bin/env python3
"""DeepSeek-V3's dense linears on FP8 tensor cores against bf16, same process, same inputs.

For every projection of a DeepSeek-V3 layer outside the routed experts (MLA q_a, q_b, kv_a,
kv_b, o; the dense MLP's gate, up and down; the shared expert's) and each token count, times:

- ``bf16``: ``F.linear`` on the bf16 weight (what the model runs without FP8; the baseline a
  user would pick);
- ``fp8``: ``Fp8Linear`` as the model runs it: activation quantization per token per 128
  (compiled) + torch's blockwise scaled GEMM (BlockWise1x128 x BlockWise128x128);
- ``fp8_gemm``: the scaled GEMM alone on pre-quantized activations (how much the quantization
  pass costs).

Each is timed ``--repeats`` times over ``--iters`` back-to-back calls with CUDA events (after
warm-up); the JSON holds every repeat, the median and the spread (min, max). ``layer_totals``
sums the medians over a layer's MLA + dense-MLP linears (a dense layer: the first three of
DeepSeek-V3) and over MLA + shared expert (a MoE layer), with the speed-up bf16 / fp8; the goal
is >= 1.6x at 16K tokens for the dense layer. Numerics: each (linear, tokens) also reports the
largest |fp8 - reference| / bound, the bound of ``tests/gpu/test_fp8_linear_gpu.py`` (<= 1
passes), on a slice of at most 512 tokens.

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
import torch.nn.functional as F  # noqa: E402

from bench.json_out import emit  # noqa: E402
from tensorrt_llm_dwdp.model.fp8_linear import (  # noqa: E402
    _compiled_act_quant, fp8_linear_scaled_mm, scaled_mm_available, scaled_mm_weight_scales,
)
from tensorrt_llm_dwdp.quant.fp8 import (  # noqa: E402
    blockwise_matmul_ref, dequantize_act_per_token, dequantize_weight_blocks,
    quantize_act_per_token, quantize_weight_blocks,
)

# (name, N, K) of DeepSeek-V3 (hidden 7168, q_lora 1536, kv_lora 512 + rope 64, 128 heads,
# dense intermediate 18432, shared expert 2048)
LINEARS = [("q_a_proj", 1536, 7168), ("q_b_proj", 24576, 1536), ("kv_a_proj_with_mqa", 576, 7168),
           ("kv_b_proj", 32768, 512), ("o_proj", 7168, 16384), ("mlp.gate_proj", 18432, 7168),
           ("mlp.up_proj", 18432, 7168), ("mlp.down_proj", 7168, 18432),
           ("shared.gate_proj", 2048, 7168), ("shared.up_proj", 2048, 7168),
           ("shared.down_proj", 7168, 2048)]
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
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


def error_ratio(x: torch.Tensor, wq, ws, ws_mm) -> float:
    """Largest |vendor - reference| over the test's bound on up to 512 tokens of ``x``."""
    x = x[:512]
    got = fp8_linear_scaled_mm(x, wq, ws_mm).float()
    xq, xs = quantize_act_per_token(x)
    ref = blockwise_matmul_ref(xq, xs, wq, ws)
    mag = dequantize_act_per_token(xq, xs).abs() @ dequantize_weight_blocks(wq, ws).abs().T
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -12 * mag
    return ((got - ref).abs() / bound).max().item()


def bench_linear(name: str, n: int, k: int, tokens: int, iters: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    w_bf16 = w.bfloat16()
    wq, ws = quantize_weight_blocks(w)
    del w
    ws_mm = scaled_mm_weight_scales(ws)
    x = torch.randn(tokens, k, device="cuda", generator=gen).bfloat16()
    xq, xs = _compiled_act_quant()(x)
    scale_a = xs.t().contiguous().t()

    def gemm_only():
        if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
            return F.scaled_mm(xq, wq.t(), scale_a, F.ScalingType.BlockWise1x128, ws_mm,
                               F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
        return torch._scaled_mm(xq, wq.t(), scale_a, ws_mm, out_dtype=torch.bfloat16)

    rec = {"linear": name, "n": n, "k": k, "tokens": tokens,
           "bf16": time_ms(lambda: F.linear(x, w_bf16), iters, repeats),
           "fp8": time_ms(lambda: fp8_linear_scaled_mm(x, wq, ws_mm), iters, repeats),
           "fp8_gemm": time_ms(gemm_only, iters, repeats)}
    rec["speedup_fp8_vs_bf16"] = rec["bf16"]["median_ms"] / rec["fp8"]["median_ms"]
    rec["speedup_fp8_gemm_vs_bf16"] = rec["bf16"]["median_ms"] / rec["fp8_gemm"]["median_ms"]
    flops = 2.0 * tokens * n * k
    rec["tflops_bf16"] = flops / rec["bf16"]["median_ms"] / 1e9
    rec["tflops_fp8"] = flops / rec["fp8"]["median_ms"] / 1e9
    rec["error_over_bound"] = error_ratio(x, wq, ws, ws_mm)
    return rec


def totals(results: list[dict], tokens: int) -> dict:
    by = {r["linear"]: r for r in results if r["tokens"] == tokens}
    out = {}
    for layer, names in (("dense_layer", MLA + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
                         ("moe_layer_mla_shared", MLA + ("shared.gate_proj", "shared.up_proj",
                                                         "shared.down_proj"))):
        bf16 = sum(by[n]["bf16"]["median_ms"] for n in names)
        fp8 = sum(by[n]["fp8"]["median_ms"] for n in names)
        out[layer] = {"bf16_ms": bf16, "fp8_ms": fp8, "speedup": bf16 / fp8}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2048,8192,16384", help="token counts (comma-separated)")
    ap.add_argument("--iters", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--linears", default=None, help="subset of linear names (comma-separated)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not scaled_mm_available(torch.device("cuda")):
        print("error: needs an sm90 GPU with torch's blockwise scaled GEMM", file=sys.stderr)
        return 1
    started = time.perf_counter()
    token_counts = [int(t) for t in args.tokens.split(",")]
    chosen = [lin for lin in LINEARS if args.linears is None or lin[0] in args.linears.split(",")]
    results = []
    for tokens in token_counts:
        for name, n, k in chosen:
            rec = bench_linear(name, n, k, tokens, args.iters, args.repeats)
            results.append(rec)
            print(f"{name:20s} T={tokens:6d} bf16 {rec['bf16']['median_ms']:7.3f} ms  fp8 "
                  f"{rec['fp8']['median_ms']:7.3f} ms (gemm {rec['fp8_gemm']['median_ms']:7.3f})"
                  f"  x{rec['speedup_fp8_vs_bf16']:.2f}  err/bound {rec['error_over_bound']:.2f}",
                  file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    layer_totals = {}
    if len(chosen) == len(LINEARS):
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
