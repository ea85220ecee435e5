"""Bench: the W4A8 MoE kernels (NVFP4 weights on FP8 tensor cores) against our W4A16 kernels
and fp8 ``torch._scaled_grouped_mm``, one device, one run.

Per model (DeepSeek-V3, Qwen3-235B-A22B shapes), routing (``uniform``: every expert the same
rows; ``skewed``: Zipf-like, ``kernels.testing.skewed_routing``, three experts empty, the same
total rows) and mean tokens per expert, timed
with CUDA graphs, each the median of ``--replays`` replays with its spread ((max - min) /
median):
  w4a16       our FC1 (gather + GEMM + SwiGLU) + FC2 (GEMM chunks + slot sums), bf16 WGMMA;
  w4a8        the same kernels with ``compute="e4m3"``, activations and h quantized by the
              torch pass (``w4a8_activations``) inside the timing;
  w4a8_gemm   the W4A8 kernels on operands quantized beforehand (what a fused quantization
              kernel would leave: the GEMMs, SwiGLU and finalize only);
  quant       the two torch quantization passes alone;
  torch_fp8   ``torch._scaled_grouped_mm`` FC1 + FC2, rowwise scales, pre-permuted and
              pre-quantized rows (GEMMs only: a lower bound for an fp8 pipeline).
Also the W4A8 output's relative error against W4A16 (the stated ~3%; a broken kernel shows).
``--variants``: W4A8 kernel configurations (``VARIANTS``, ``rs_config`` overrides compiled
clean on the CPU: no spills, pipelined) timed on the pre-quantized operands against the
default at the points whose token tile they are for, each checked bitwise against it.
Prints one JSON document (``results``: one record per point); ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config
from tensorrt_llm_dwdp.kernels.sm90.w4a8_act import w4a8_activations
from tensorrt_llm_dwdp.kernels.testing import (MODELS, model_experts, random_tokens,
                                               skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation

try:
    from bench.json_out import emit
    from bench.moe_kernels import Baselines, tables, time_graph_samples, uniform_point
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from json_out import emit
    from moe_kernels import Baselines, tables, time_graph_samples, uniform_point


# name: (token tiles it applies to, rs_config overrides for compute="e4m3")
VARIANTS = {
    "ring4": ((16, 128), {"ring": 4}),  # 3 wgmma groups in flight instead of 1
    "bn64_2cta_1blk": ((64,), {"blocks_per_wg": 1, "ctas_per_sm": 2, "producer_regs": 40}),
}


def stats(samples: list[float]) -> dict:
    med = statistics.median(samples)
    return {"ms": med, "spread": (max(samples) - min(samples)) / med, "samples": samples}


def routed_point(model: str, tpe: int, routing: str):
    """(ids, router weights, tokens, token tile, plan, torch grouped-GEMM offsets) for
    ``tpe * E`` rows routed ``uniform``ly or ``skewed``."""
    hidden, _, num_experts, top_k = MODELS[model]
    if routing == "uniform":
        ids, tw, x, bn, plan = uniform_point(model, tpe)
    elif routing == "skewed":
        tokens = tpe * num_experts // top_k
        ids, tw = skewed_routing(tokens, num_experts, top_k, seed=tpe)
        x = random_tokens(tokens, hidden, seed=tpe)
        bn = choose_token_tile(ids.numel(), num_experts)
        plan = build_permutation(ids, num_experts, tile_m=bn)
    else:
        raise ValueError(f"routing must be uniform or skewed, got {routing!r}")
    offs = torch.cumsum(plan.counts, 0).to(torch.int32)
    return ids, tw, x, bn, plan, offs


def bench_point(cache, weights, base, model, tpe, replays, variants=(), routing="uniform"):
    hidden, inter, num_experts, _ = MODELS[model]
    ids, tw, x, bn, plan, offs = routed_point(model, tpe, routing)
    w13, w2 = tables(weights)
    h = torch.zeros(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
    h8 = torch.zeros_like(h)
    out = torch.empty(ids.shape[0], hidden, dtype=torch.bfloat16, device="cuda")
    out8 = torch.empty_like(out)
    kw = {"tile_count": plan.tile_count}

    def w4a16():
        fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h, **kw)
        fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn, out=out, **kw)

    def w4a8():
        fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h8,
                          compute="e4m3", **kw)
        fc2_finalize(cache, h8, plan.slot_index, plan.tile_expert, ids, tw, w2, bn, out=out8,
                     compute="e4m3", **kw)

    w4a16()
    w4a8()
    torch.cuda.synchronize()
    err = ((out8.double() - out.double()).norm() / out.double().norm()).item()
    xq = w4a8_activations(x)
    hq = w4a8_activations(h8)

    def w4a8_gemm():
        fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h8,
                          compute="e4m3", quantized=xq, **kw)
        fc2_finalize(cache, h8, plan.slot_index, plan.tile_expert, ids, tw, w2, bn, out=out8,
                     compute="e4m3", quantized=hq, **kw)

    def quant():
        w4a8_activations(x)
        w4a8_activations(h8)

    res = {"model": model, "kernel": "w4a8", "routing": routing, "tokens_per_expert": tpe,
           "tokens": ids.shape[0], "token_tile": bn, "w4a8_vs_w4a16_rel_err": err}
    for name, fn in (("w4a16", w4a16), ("w4a8", w4a8), ("w4a8_gemm", w4a8_gemm),
                     ("quant", quant)):
        s = stats(time_graph_samples(fn, replays=replays))
        res.update({f"{name}_ms": s["ms"], f"{name}_spread": s["spread"],
                    f"{name}_samples": s["samples"]})
    a_perm = x[plan.gather_index[plan.gather_index >= 0].long()]
    h2 = torch.randn(a_perm.shape[0], inter, device="cuda").to(torch.bfloat16)
    t = base.timings(a_perm, h2, offs)
    if "fp8_fc1_ms" in t:
        res["torch_fp8_ms"] = t["fp8_fc1_ms"] + t["fp8_fc2_ms"]
        res["speedup_w4a8_gemm_vs_torch_fp8"] = res["torch_fp8_ms"] / res["w4a8_gemm_ms"]
        # the record fields: ours = the W4A8 layer with its torch quantization passes
        res["speedup_vs_torch_fp8"] = res["torch_fp8_ms"] / res["w4a8_ms"]
    else:
        res["torch_fp8_error"] = t.get("fp8_error")
    res["bf16_grouped_ms"] = t["bf16_fc1_ms"] + t["bf16_fc2_ms"]
    res["ours_ms"], res["bf16_ms"] = res["w4a8_ms"], res["bf16_grouped_ms"]
    ref_h, ref_out = h8.clone(), out8.clone()
    for name in variants:
        tiles, fields = VARIANTS[name]
        if bn not in tiles:
            continue
        c1 = rs_config(bn, hidden, "e4m3", **fields)
        c2 = rs_config(bn, inter, "e4m3", **fields)

        def variant(c1=c1, c2=c2):
            fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h8,
                              compute="e4m3", quantized=xq, config=c1, **kw)
            fc2_finalize(cache, h8, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                         out=out8, compute="e4m3", quantized=hq, config=c2, **kw)

        variant()
        torch.cuda.synchronize()
        same = bool(torch.equal(h8, ref_h) and torch.equal(out8, ref_out))
        s = stats(time_graph_samples(variant, replays=replays))
        res[f"variant_{name}"] = {"ms": s["ms"], "spread": s["spread"],
                                  "speedup_vs_default": res["w4a8_gemm_ms"] / s["ms"],
                                  "bitwise_equal_default": same}
    res["speedup_w4a8_vs_w4a16"] = res["w4a16_ms"] / res["w4a8_ms"]
    res["speedup_w4a8_gemm_vs_w4a16"] = res["w4a16_ms"] / res["w4a8_gemm_ms"]
    flops = 2.0 * a_perm.shape[0] * 3 * inter * hidden
    res["w4a8_gemm_tflops"] = flops / res["w4a8_gemm_ms"] / 1e9
    res["w4a16_tflops"] = flops / res["w4a16_ms"] / 1e9
    return res


def _write(path, results, quiet=True):
    emit({"bench": "w4a8_kernels", "device": torch.cuda.get_device_name(),
          "torch": torch.__version__,
          "torch_fp8": "torch._scaled_grouped_mm rowwise, GEMMs only", "results": results},
         path, quiet)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deepseek_v3,qwen3_235b_a22b")
    p.add_argument("--tpe", default="16,64,256,1024")
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--routing", default="uniform,skewed")
    p.add_argument("--variants", default="", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    cache = CompileCache()
    results = []
    for model in args.models.split(","):
        weights = model_experts(model, seed=1)
        base = Baselines(model)
        for routing, tpe in ((rt, int(v)) for rt in args.routing.split(",")
                             for v in args.tpe.split(",")):
            r = bench_point(cache, weights, base, model, tpe, args.replays,
                            [v for v in args.variants.split(",") if v], routing)
            results.append(r)
            _write(args.out, results)
            print(f"{model:16s} {routing:7s} tpe={tpe:5d} w4a16 {r['w4a16_ms']:.3f} w4a8 "
                  f"{r['w4a8_ms']:.3f} (gemm {r['w4a8_gemm_ms']:.3f}, quant {r['quant_ms']:.3f}) torch fp8 "
                  f"{r.get('torch_fp8_ms', float('nan')):.3f} | w4a8_gemm x"
                  f"{r['speedup_w4a8_gemm_vs_w4a16']:.2f} vs w4a16, err "
                  f"{r['w4a8_vs_w4a16_rel_err']:.4f}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        del weights, base
        torch.cuda.empty_cache()
    _write(args.out, results, quiet=bool(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
