"""Bench: sm90 CuTeDSL W4A16 MoE kernels against torch grouped GEMMs, one device, one run.

For each model and tokens-per-expert (uniform routing: every expert gets exactly that many
rows, so every side does the same useful work) it times, with CUDA graphs of many launches:
  ours  fc1 = gather + NVFP4 grouped GEMM (weights as WGMMA's register operand) + SwiGLU,
        fc2 = NVFP4 grouped GEMM per hidden-column chunk + fixed-order slot sum -> bf16 output,
        on the experts in the preshuffled layout the kernels read (shuffled once per model
        before any timing, ``kernels.testing.model_experts``; JSON ``layout``);
  bf16  torch._grouped_mm on bf16 weights and pre-permuted bf16 rows (FC1 + FC2 only: no
        gather, activation or finalize, a lower bound for a bf16 pipeline);
  fp8   torch._scaled_grouped_mm, rowwise scales (per row of A, per output column of B), on
        fp8 e4m3 weights and pre-permuted, pre-quantized rows (same rows, same lower bound).
Ratios are baseline time / our time (> 1: ours faster). TFLOP/s counts useful rows only;
TB/s counts the NVFP4 bytes of both weights (0.5625 B per weight with the block scales).
Also times multi-B (S = 4 unequal slices) against S = 1 for the same routing.
Per-device peaks (copy GB/s, dense bf16 TFLOP/s) come from ``bench/peaks.py`` by device name.
Prints one JSON document; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.expert_table import build_expert_table
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    model_experts,
    random_tokens,
    split_sizes,
    uniform_routing,
)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation

try:
    from bench.json_out import emit
    from bench.peaks import pct_of, peak_for
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from json_out import emit
    from peaks import pct_of, peak_for

NVFP4_BYTES_PER_WEIGHT = 0.5625


def time_graph(fn, target_ms: float = 40.0, replays: int = 5) -> float:
    """Median milliseconds per call of ``fn``, from CUDA-graph replays of N calls (N sized so
    one replay takes about ``target_ms``; at least 2, at most 20)."""
    return statistics.median(time_graph_samples(fn, target_ms, replays))


def time_graph_samples(fn, target_ms: float = 40.0, replays: int = 5) -> list[float]:
    """``time_graph``'s per-replay milliseconds per call (for a median and a spread)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    launches = int(min(20, max(2, target_ms / max(start.elapsed_time(end), 1e-3))))
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
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    del graph
    return times


def tables(weights):
    t = weights.tensors
    w13 = build_expert_table(t["w3_w1_weight"], t["w3_w1_weight_scale"], t["fc31_alpha"],
                             weights.expert_offsets)
    w2 = build_expert_table(t["w2_weight"], t["w2_weight_scale"], t["fc2_alpha"],
                            weights.expert_offsets)
    return w13, w2


def uniform_point(model: str, tpe: int):
    """One bench point's inputs: routing with ``tpe`` rows on every expert (ids, weights),
    random tokens, the token tile the backend picks for it and the permutation plan."""
    hidden, _, num_experts, top_k = MODELS[model]
    ids, tw = uniform_routing(tpe, num_experts, top_k)
    x = random_tokens(ids.shape[0], hidden, seed=tpe)
    bn = choose_token_tile(ids.numel(), num_experts)
    return ids, tw, x, bn, build_permutation(ids, num_experts, tile_m=bn)


class Baselines:
    """bf16 and fp8 copies of one model's expert weights, laid out as torch's grouped GEMMs
    want them (``[E, K, N]`` views of ``[E, N, K]`` storage) with unit rowwise scales."""

    def __init__(self, model: str):
        hidden, inter, num_experts, _ = MODELS[model]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen,
                          dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=gen,
                         dtype=torch.bfloat16) * 0.02
        self.w13t, self.w2t = w13.transpose(1, 2), w2.transpose(1, 2)
        self.w13t8 = w13.to(torch.float8_e4m3fn).transpose(1, 2)
        self.w2t8 = w2.to(torch.float8_e4m3fn).transpose(1, 2)
        self.s13 = torch.ones(num_experts, 2 * inter, device="cuda")
        self.s2 = torch.ones(num_experts, hidden, device="cuda")

    def timings(self, a_perm: torch.Tensor, h2: torch.Tensor, offs: torch.Tensor) -> dict:
        a8, h8 = a_perm.to(torch.float8_e4m3fn), h2.to(torch.float8_e4m3fn)
        sa = torch.ones(a_perm.shape[0], device="cuda")

        def bf16_fc1():
            torch._grouped_mm(a_perm, self.w13t, offs=offs, out_dtype=torch.bfloat16)

        def bf16_fc2():
            torch._grouped_mm(h2, self.w2t, offs=offs, out_dtype=torch.bfloat16)

        def fp8_fc1():
            torch._scaled_grouped_mm(a8, self.w13t8, sa, self.s13, offs=offs,
                                     out_dtype=torch.bfloat16)

        def fp8_fc2():
            torch._scaled_grouped_mm(h8, self.w2t8, sa, self.s2, offs=offs,
                                     out_dtype=torch.bfloat16)

        t = {"bf16_fc1_ms": time_graph(bf16_fc1), "bf16_fc2_ms": time_graph(bf16_fc2)}
        try:
            t["fp8_fc1_ms"] = time_graph(fp8_fc1)
            t["fp8_fc2_ms"] = time_graph(fp8_fc2)
        except RuntimeError as exc:  # a torch build without the fp8 grouped GEMM
            t["fp8_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return t


def bench_point(cache, weights, base, model, tpe, multi_b, peaks):
    """One point: ``weights`` are the model's experts in the kernels' (preshuffled) layout."""
    hidden, inter, num_experts, _ = MODELS[model]
    ids, tw, x, bn, plan = uniform_point(model, tpe)
    tokens = ids.shape[0]
    rows = tpe * num_experts
    w13, w2 = tables(weights)
    h = torch.empty(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def fc1(table=w13):
        fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, table, bn, out=h,
                          tile_count=plan.tile_count)

    def fc2(table=w2):
        fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, table, bn, out=out,
                     tile_count=plan.tile_count)

    def ours(tables_=(w13, w2)):
        fc1(tables_[0])
        fc2(tables_[1])

    res = {"model": model, "tokens_per_expert": tpe, "tokens": tokens, "token_tile": bn,
           "layout": weights.weight_layout,
           "ours_fc1_ms": time_graph(fc1), "ours_fc2_ms": time_graph(fc2),
           "ours_total_ms": time_graph(ours)}
    offs = torch.arange(1, num_experts + 1, device="cuda", dtype=torch.int32) * tpe
    a_perm = x[plan.gather_index[plan.gather_index >= 0].long()]
    h2 = torch.randn(rows, inter, device="cuda").to(torch.bfloat16)
    res.update(base.timings(a_perm, h2, offs))
    res["bf16_total_ms"] = res["bf16_fc1_ms"] + res["bf16_fc2_ms"]
    res["speedup_total"] = res["bf16_total_ms"] / res["ours_total_ms"]
    if "fp8_fc1_ms" in res:
        res["fp8_total_ms"] = res["fp8_fc1_ms"] + res["fp8_fc2_ms"]
        res["speedup_total_fp8"] = res["fp8_total_ms"] / res["ours_total_ms"]
    flops = 2.0 * rows * 3 * inter * hidden
    nvfp4 = NVFP4_BYTES_PER_WEIGHT * num_experts * 3 * inter * hidden
    res.update({
        "ours_tflops": flops / res["ours_total_ms"] / 1e9,
        "ours_nvfp4_tbps": nvfp4 / res["ours_total_ms"] / 1e9,
        "ours_fc1_tflops": flops * 2 / 3 / res["ours_fc1_ms"] / 1e9,
        "ours_fc1_nvfp4_tbps": nvfp4 * 2 / 3 / res["ours_fc1_ms"] / 1e9,
        "bf16_tflops": flops / res["bf16_total_ms"] / 1e9,
    })
    res["ours_pct_peak_flops"] = pct_of(res["ours_tflops"], peaks and peaks.bf16_tflops)
    res["ours_pct_peak_bw"] = pct_of(res["ours_nvfp4_tbps"] * 1e3, peaks and peaks.copy_gbps)
    if multi_b:
        view = weights.split(split_sizes(num_experts, 4))  # a shuffled set splits per expert
        m13, m2 = tables(view)
        s1 = time_graph(ours)
        s4 = time_graph(lambda: ours((m13, m2)))
        res.update({"single_b_ms": s1, "multi_b4_ms": s4, "multi_b_overhead_pct": 100 * (s4 / s1 - 1)})
    return res


def _write(path, results, peaks, quiet: bool = True) -> None:
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "peak": peaks.to_dict() if peaks else None,
          "fp8_baseline": "torch._scaled_grouped_mm rowwise, use_fast_accum=False",
          "results": results}, path, quiet)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deepseek_v3,qwen3_235b_a22b")
    p.add_argument("--tpe", default="16,64,256,1024")
    p.add_argument("--multi-b-tpe", default="16,256")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    peaks = peak_for(torch.cuda.get_device_name())
    cache = CompileCache()
    results = []
    for model in args.models.split(","):
        # shuffled once here, outside every timing (the loader does it once at load)
        weights = model_experts(model, seed=1)
        torch.cuda.empty_cache()
        base = Baselines(model)
        for tpe in (int(v) for v in args.tpe.split(",")):
            r = bench_point(cache, weights, base, model, tpe,
                            str(tpe) in args.multi_b_tpe.split(","), peaks)
            results.append(r)
            _write(args.out, results, peaks)  # keep what is measured if a later point dies
            print(f"{model:16s} tpe={tpe:5d} ours {r['ours_total_ms']:.3f} ms (fc1 "
                  f"{r['ours_fc1_ms']:.3f}, fc2 {r['ours_fc2_ms']:.3f}) bf16 "
                  f"{r['bf16_total_ms']:.3f} x{r['speedup_total']:.2f} fp8 "
                  f"{r.get('fp8_total_ms', float('nan')):.3f} "
                  f"x{r.get('speedup_total_fp8', float('nan')):.2f}  "
                  f"{r['ours_tflops']:.0f} TF/s {r['ours_nvfp4_tbps']:.2f} TB/s"
                  + (f"  multi-B {r['multi_b_overhead_pct']:+.1f}%" if "multi_b_overhead_pct"
                     in r else ""), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        del weights, base
        torch.cuda.empty_cache()
    _write(args.out, results, peaks, quiet=bool(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
