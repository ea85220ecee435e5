"""Bench: sm90 CuTeDSL W4A16 MoE kernels against torch._grouped_mm in bf16, one device, one run.

For each model and tokens-per-expert (uniform routing: every expert gets exactly that many
rows, so both sides do the same useful work) it times, with CUDA graphs of many launches:
  ours   fc1 = gather + NVFP4 grouped GEMM + SwiGLU, fc2 = NVFP4 grouped GEMM writing
         router-weighted fp32 rows, finalize = fixed-order slot sum -> bf16;
  base   fc1 / fc2 = torch._grouped_mm on bf16 weights and pre-permuted bf16 rows (no gather,
         no activation, no finalize: a lower bound for a bf16 pipeline).
Ratios are base time / our time (> 1 means ours is faster). TFLOP/s counts useful rows only;
GB/s counts the bytes a perfect kernel must move (weights once, activations in, outputs out).
Also times multi-B (S=4 unequal slices) against single-B for the same routing.
Prints one JSON document; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.expert_table import build_expert_table
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import (
    fc2_weighted,
    finalize,
    permuted_row_weights,
)
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    random_nvfp4_experts,
    random_tokens,
    split_sizes,
    uniform_routing,
)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_tile_m
from tensorrt_llm_dwdp.moe.permute import build_permutation

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*
from bench.peaks import pct_of, peak_for  # noqa: E402  (per-device peaks, one module)


def time_graph(fn, target_ms: float = 40.0, replays: int = 5) -> float:
    """Median milliseconds per call of ``fn``, from CUDA-graph replays of N calls (N sized so
    one replay takes about ``target_ms``; at least 2, at most 20)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    launches = int(min(20, max(2, target_ms / max(start.elapsed_time(end), 1e-3))))
    try:
        return _time_graph(fn, launches, replays)
    except RuntimeError as exc:  # capture refused: time a plain launch loop instead
        print(f"graph capture failed ({exc}); timing a launch loop", file=sys.stderr)
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start.record()
            for _ in range(launches):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / launches)
        return statistics.median(times)


def _time_graph(fn, launches: int, replays: int) -> float:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(launches):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    del graph
    return statistics.median(times)


def tables(weights):
    t = weights.tensors
    w13 = build_expert_table(t["w3_w1_weight"], t["w3_w1_weight_scale"], t["fc31_alpha"],
                             weights.expert_offsets)
    w2 = build_expert_table(t["w2_weight"], t["w2_weight_scale"], t["fc2_alpha"],
                            weights.expert_offsets)
    return w13, w2


def _time_variants(res, cache, variants, ids, tw, x, w13, w2, plan, tile_m, inter, hidden,
                   num_experts):
    """Time FC1 / FC2 for each ``[ws]TILE_MxN_SUB`` variant into ``res``."""
    for variant in variants:
        ws = variant.startswith("ws")
        fuse = variant.endswith("f")  # one WGMMA over both B sub-tiles
        shape, _, st = variant.removeprefix("ws").removesuffix("f").partition("s")
        vm, vn = (int(v) for v in shape.split("x"))
        stages = int(st) if st else 4
        vplan = plan if vm == tile_m else build_permutation(ids, num_experts, tile_m=vm)
        vh = torch.empty(vplan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
        vy = torch.empty(vplan.num_rows, hidden, dtype=torch.float32, device="cuda")
        vrw = permuted_row_weights(tw, vplan.slot_index)
        try:
            res[f"v{variant}_fc1_ms"] = time_graph(lambda: fc1_gather_swiglu(
                cache, x, vplan.gather_index, vplan.tile_expert, w13, vm, n_sub=vn, out=vh,
                warp_specialized=ws, stages=stages, fuse_n=fuse))
            res[f"v{variant}_fc2_ms"] = time_graph(lambda: fc2_weighted(
                cache, vh, vplan.tile_expert, vrw, w2, vm, n_sub=vn, out=vy,
                warp_specialized=ws, stages=stages, fuse_n=fuse))
        except Exception as exc:  # a variant that fails to build or run is reported, not fatal
            res[f"v{variant}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del vh, vy
        for fc in ("fc1", "fc2"):  # > 1: the variant is faster than the default / bf16 base
            got = res.get(f"v{variant}_{fc}_ms")
            for ref in ("ours", "base"):
                if got and f"{ref}_{fc}_ms" in res:
                    res[f"v{variant}_{fc}_x_{ref}"] = res[f"{ref}_{fc}_ms"] / got
    return res


def bench_point(cache, weights, bf16_w13t, bf16_w2t, model, tpe, multi_b, variants=(),
                only_variants=False):
    hidden, inter, num_experts, top_k = MODELS[model]
    ids, tw = uniform_routing(tpe, num_experts, top_k)
    tokens = ids.shape[0]
    x = random_tokens(tokens, hidden, seed=tpe)
    tile_m = choose_tile_m(tokens * top_k, num_experts)
    plan = build_permutation(ids, num_experts, tile_m=tile_m)
    w13, w2 = tables(weights)
    h = torch.empty(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(plan.num_rows, hidden, dtype=torch.float32, device="cuda")
    rw = permuted_row_weights(tw, plan.slot_index)
    out_buf = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def fc1(table=w13):
        fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, table, tile_m, out=h)

    def fc2(table=w2):
        fc2_weighted(cache, h, plan.tile_expert, rw, table, tile_m, out=y)

    def fin():
        finalize(cache, y, plan.inverse, out=out_buf)

    def ours_all():
        fc1()
        fc2()
        fin()

    rows = tpe * num_experts
    offs = torch.arange(1, num_experts + 1, device="cuda", dtype=torch.int32) * tpe
    a_perm = x[plan.gather_index[plan.gather_index >= 0].long()]
    assert a_perm.shape[0] == rows
    h2 = torch.randn(rows, inter, device="cuda").to(torch.bfloat16)

    def base_fc1():
        torch._grouped_mm(a_perm, bf16_w13t, offs=offs, out_dtype=torch.bfloat16)

    def base_fc2():
        torch._grouped_mm(h2, bf16_w2t, offs=offs, out_dtype=torch.bfloat16)

    res = {"model": model, "tokens_per_expert": tpe, "tokens": tokens, "tile_m": tile_m}
    if only_variants:
        return _time_variants(res, cache, variants, ids, tw, x, w13, w2, plan, tile_m,
                              inter, hidden, num_experts)
    t = {
        "ours_fc1_ms": time_graph(fc1), "ours_fc2_ms": time_graph(fc2),
        "ours_finalize_ms": time_graph(fin), "ours_total_ms": time_graph(ours_all),
        "base_fc1_ms": time_graph(base_fc1), "base_fc2_ms": time_graph(base_fc2),
    }
    t["base_total_ms"] = t["base_fc1_ms"] + t["base_fc2_ms"]
    fl1 = 2.0 * rows * 2 * inter * hidden
    fl2 = 2.0 * rows * hidden * inter
    nv_w13 = num_experts * 2 * inter * hidden * 0.5625
    nv_w2 = num_experts * hidden * inter * 0.5625
    by1 = nv_w13 + rows * hidden * 2 + rows * inter * 2
    by2 = nv_w2 + rows * inter * 2 + rows * hidden * 4
    res.update({
        **t,
        "speedup_fc1": t["base_fc1_ms"] / t["ours_fc1_ms"],
        "speedup_fc2": t["base_fc2_ms"] / t["ours_fc2_ms"],
        "speedup_total": t["base_total_ms"] / t["ours_total_ms"],
        "ours_fc1_tflops": fl1 / t["ours_fc1_ms"] / 1e9,
        "ours_fc2_tflops": fl2 / t["ours_fc2_ms"] / 1e9,
        "base_fc1_tflops": fl1 / t["base_fc1_ms"] / 1e9,
        "base_fc2_tflops": fl2 / t["base_fc2_ms"] / 1e9,
        "ours_fc1_gbps": by1 / t["ours_fc1_ms"] / 1e6,
        "ours_fc2_gbps": by2 / t["ours_fc2_ms"] / 1e6,
    })
    peak = peak_for(torch.cuda.get_device_name())
    res["ours_fc1_pct_peak_flops"] = pct_of(res["ours_fc1_tflops"], peak and peak.bf16_tflops)
    res["ours_fc1_pct_peak_bw"] = pct_of(res["ours_fc1_gbps"], peak and peak.copy_gbps)
    _time_variants(res, cache, variants, ids, tw, x, w13, w2, plan, tile_m, inter, hidden,
                   num_experts)
    if multi_b:
        view = weights.split(split_sizes(num_experts, 4))
        m13, m2 = tables(view)
        s1 = time_graph(lambda: (fc1(w13), fc2(w2)))
        s4 = time_graph(lambda: (fc1(m13), fc2(m2)))
        res.update({"single_b_fc12_ms": s1, "multi_b4_fc12_ms": s4,
                    "multi_b_overhead_pct": 100 * (s4 / s1 - 1)})
    return res


def _write(path, results) -> dict:
    peak = peak_for(torch.cuda.get_device_name())
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "peak_tflops_bf16": peak and peak.bf16_tflops, "peak_gbps": peak and peak.copy_gbps,
           "results": results}
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen3_30b_a3b,deepseek_v3")
    p.add_argument("--tpe", default="16,32,64,128,256,512,1024,2048")
    p.add_argument("--max-rows", type=int, default=300_000,
                   help="skip points with more permuted rows (device memory)")
    p.add_argument("--multi-b-tpe", default="16,256")
    p.add_argument("--variants", default="64x64,64x128,128x128,ws64x128,ws128x128",
                   help="extra [ws]TILE_MxN_SUB[sSTAGES] configs of our kernels to time at every "
                        "point (ws = warp-specialized; sN = N-slot load ring; 256x64 = the "
                        "opt-in 256-row tiles; suffix f = one WGMMA over both B sub-tiles)")
    p.add_argument("--only-variants", action="store_true",
                   help="time only the --variants configs (no baseline, no default config)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    cache = CompileCache()
    results = []
    for model in args.models.split(","):
        hidden, inter, num_experts, _ = MODELS[model]
        weights = random_nvfp4_experts(num_experts, hidden, inter, seed=1)
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13t = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen,
                            dtype=torch.bfloat16) * 0.02).transpose(1, 2)
        w2t = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen,
                           dtype=torch.bfloat16) * 0.02).transpose(1, 2)
        for tpe in (int(v) for v in args.tpe.split(",")):
            if tpe * num_experts > args.max_rows:
                results.append({"model": model, "tokens_per_expert": tpe,
                                "skipped": f"{tpe * num_experts} rows > --max-rows"})
                continue
            r = bench_point(cache, weights, w13t, w2t, model, tpe,
                            str(tpe) in args.multi_b_tpe.split(","),
                            [v for v in args.variants.split(",") if v], args.only_variants)
            results.append(r)
            _write(args.out, results)  # keep what is measured if a later point dies
            if args.only_variants:
                print(model, tpe, {k: round(v, 3) for k, v in r.items() if k.endswith("_ms")},
                      file=sys.stderr, flush=True)
                continue
            print(f"{model:14s} tpe={tpe:5d} fc1 {r['ours_fc1_ms']:.3f}/{r['base_fc1_ms']:.3f} ms "
                  f"x{r['speedup_fc1']:.2f}  fc2 {r['ours_fc2_ms']:.3f}/{r['base_fc2_ms']:.3f} "
                  f"x{r['speedup_fc2']:.2f}  total x{r['speedup_total']:.2f}  "
                  f"{r['ours_fc1_tflops']:.0f} TF/s {r['ours_fc1_gbps']:.0f} GB/s",
                  file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        del weights, w13t, w2t
        torch.cuda.empty_cache()
    doc = _write(args.out, results)
    if not args.out:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
