"""Bench: the sm90 FP8 block-scaled MoE kernels against torch's grouped GEMMs and TensorRT-LLM.

For each model (DeepSeek-V3, Qwen3-235B-A22B), routing (uniform: every expert gets exactly
``tpe`` rows; skewed: Zipf-like ``kernels.testing.skewed_routing`` over the same token count)
and tokens per expert (16, 64, 256, 512, 1024 and 96, off the 128-row tile), one device, one
run, it times with CUDA graphs of many launches:
  ours        FC1 (gather + fp8 QGMMA + per-128 promotion + SwiGLU -> bf16 h) + FC2 (fp8 QGMMA
              per hidden-column chunk + slot-order finalize -> bf16 output) on pre-quantized x
              and h; ``quant_ms``: the two activation quantization passes alone (x and h,
              ``fp8_launch.quantize_rows``: the fused sm90 kernel); ``finalize_ms``: FC2's
              slot-order sum alone (inside ``ours_fc2_ms``; the torch baseline has none);
              ``ours_layer_ms``: the whole layer as the backend runs it (quantize x, FC1,
              quantize h, FC2 + finalize);
  torch_fp8   ``torch._scaled_grouped_mm`` with rowwise scales (use_fast_accum=False) on the
              same weights' e4m3 bytes and the same pre-permuted, pre-quantized rows, each
              expert's rows padded to 16 (its alignment), FC1 + FC2 only (no gather, SwiGLU,
              finalize: a lower bound for a rowwise fp8 pipeline);
  bf16        ``torch._grouped_mm`` on bf16 copies of the weights, same rows, FC1 + FC2 only;
  trtllm_fp8  TensorRT-LLM's whole-layer latency at the same token count from aiconfigurator-
              core's database (``bench/data/trtllm_h200_moe.json``, written by
              ``bench/trtllm_moe_db.py``): THEIR measurement on THEIR H200 (per-tensor fp8,
              and ``trtllm_fp8_block_ms`` block-128; balanced / power_law_1.2 distribution for
              uniform / skewed), null where it has no such point.
``--variants`` also times other kernel configurations (``VARIANTS``) once per point, with
their speed-up over the default and whether their output is bitwise the default's.
Every timing is repeated ``--repeats`` times (each a median of 5 graph replays); the record
holds the median and the spread (min, max) of the repeats. speedup_vs_torch_fp8 = torch_fp8_ms
/ ours_ms (> 1: ours faster). Output: ``--out`` (default bench/results/moe_kernels_fp8_h200.json)
with a ``results`` list, one record per (model, kernel, routing, tokens); written after every
point so a cut run keeps what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config
from tensorrt_llm_dwdp.kernels.sm90.fp8_preshuffle import preshuffle_fp8
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import slot_sum_launcher
from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import (
    build_fp8_expert_table,
    fc1_fp8_gather_swiglu,
    fc2_chunk_blocks,
    fc2_fp8_finalize,
    quantize_rows,
)
from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import scratch_dtype
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    random_fp8_experts,
    random_tokens,
    rel_diff,
    skewed_routing,
    uniform_routing,
)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation

try:
    from bench import trtllm_moe_db
    from bench.json_out import emit
    from bench.moe_kernels import time_graph
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    import trtllm_moe_db
    from json_out import emit
    from moe_kernels import time_graph

DISTRIBUTION = {"uniform": "balanced", "skewed": "power_law_1.2"}
# Kernel configurations timed beside the default (``--variants``): name -> (default token tiles
# it applies to, the token tile it runs instead or None, ``Fp8Config`` overrides). Each is
# compile-checked for sm_90a (tests/kernels/test_compile_fp8.py) and must give the default's
# output bit for bit (same products, same K order).
VARIANTS = {
    "1cta": ((16, 32), None, dict(ctas_per_sm=1, producer_regs=56)),  # 8 stages, 1 CTA
    "2cta": ((64,), None, dict(ctas_per_sm=2, producer_regs=48)),  # twice the warps
    "bn64_2cta": ((128,), 64, dict(ctas_per_sm=2, producer_regs=48)),  # smaller tile
    # weights by one cp.async.bulk per block and stage from a preshuffled copy (fp8_preshuffle)
    "bulk": ((16, 32, 64, 128), None, dict(bulk_weights=True, tma=False)),
    # every operand by the copy engine from one producer thread (tensor maps, pre-permuted rows)
    "tma": ((16, 32, 64), None, dict(tma=True)),
    "tma_2cta": ((64,), None, dict(tma=True, ctas_per_sm=2, producer_regs=40)),
    # bn 128's default is tma + tokens_m: its earlier configurations, and tokens_m alone
    "cpasync_128": ((128,), None, dict(tma=False, tokens_m=False)),
    "tma_128": ((128,), None, dict(tma=True, tokens_m=False)),
    "tokens_m_cpasync": ((128,), None, dict(tma=False, tokens_m=True)),
    # CTA pairs share the weight boxes of one expert by TMA multicast (half the weights' L2 bytes)
    "cluster2": ((128,), None, dict(cluster2=True)),
    # CTA pairs over two block pairs share the token tile by multicast (half the tokens' bytes;
    # bn 128's default from hidden 7168 on, so "no_mcast" times the kernel without it there)
    "mcast_x": ((128,), None, dict(mcast_tokens=True)),
    "no_mcast": ((128,), None, dict(mcast_tokens=False)),
    # FC1's 64-row block by one 4-D tensor-map box (its up / gate interleave by strides) where
    # the default moves eight 8-row boxes; with cluster2 its multicast is one 8 KiB copy too
    "one_box": ((128,), None, dict(fc1_one_box=True)),
    "cluster2_one_box": ((128,), None, dict(cluster2=True, fc1_one_box=True)),
    # 4-CTA clusters: both operands multicast (half of each operand's L2 bytes)
    "cluster4": ((128,), None, dict(cluster2=True, mcast_tokens=True)),
    # 128 tokens x 192 weight rows (three 64-row blocks, QGMMA 64x192x32): a sixth fewer L2
    # bytes per FLOP than 128 x 128; with the default's token multicast where it has it
    "blocks3": ((128,), None, dict(blocks=3)),
    "blocks3_no_mcast": ((128,), None, dict(blocks=3, mcast_tokens=False)),
    # ... with the weights multicast over token-tile pairs too (FC1's block as one box)
    "blocks3_cluster2": ((128,), None, dict(blocks=3, cluster2=True, fc1_one_box=True)),
    # the consumers' old ways (compile-checked defaults since 2026-12-08): every thread arrives
    # on the slot's barrier (and, in clusters, on each partner's), and each K tile's weight
    # scales load just before the stage's wait
    "thread_release": ((128, 16, 32, 64), None, dict(release_per_warp=False)),
    "cluster2_thread_release": ((128,), None, dict(cluster2=True, release_per_warp=False)),
    "no_lookahead": ((128, 16, 32, 64), None, dict(scale_lookahead=False)),
    # FC2's scratch rows in fp32 (the default rounds them to bf16: not bitwise the default)
    "y_fp32": ((16, 32, 64, 128), None, dict(y_bf16=False)),
}
DEFAULT_OUT = "bench/results/moe_kernels_fp8_h200.json"
GRAPH_MS = 20.0  # one graph replay's length (each timing: the median of 5 replays)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def routing(kind: str, tpe: int, num_experts: int, top_k: int):
    """(topk ids, router weights) of ``tpe * E / k`` tokens."""
    if kind == "uniform":
        return uniform_routing(tpe, num_experts, top_k)
    tokens = tpe * num_experts // top_k
    return skewed_routing(tokens, num_experts, top_k, seed=tpe, empty_experts=0)


class TorchBaselines:
    """torch's grouped GEMMs on the same experts: the fp8 bytes as ``[E, K, N]`` views (what
    ``_scaled_grouped_mm`` wants for B) with unit rowwise scales, and bf16 copies."""

    def __init__(self, experts: dict, bf16: bool):
        w13, w2 = experts["w3_w1_weight"], experts["w2_weight"]
        self.w13t8, self.w2t8 = w13.transpose(1, 2), w2.transpose(1, 2)
        self.s13 = torch.ones(w13.shape[0], w13.shape[1], device="cuda")
        self.s2 = torch.ones(w2.shape[0], w2.shape[1], device="cuda")
        self.bf16 = bf16
        if bf16:
            self.w13t = w13.to(torch.bfloat16).transpose(1, 2)
            self.w2t = w2.to(torch.bfloat16).transpose(1, 2)

    def fns(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int, inter: int) -> dict:
        """Callables per baseline over ``x``'s rows permuted by expert, each expert's group
        padded to 16 rows (padding rows repeat token 0)."""
        plan = build_permutation(ids, num_experts, tile_m=16)
        offs = plan.expert_offsets[1:].contiguous()
        rows = int(plan.expert_offsets[-1])  # the plan's row count is an upper bound
        a = x[plan.gather_index[:rows].clamp(min=0).long()]
        h = torch.randn(a.shape[0], inter, device="cuda").to(torch.bfloat16)
        a8, h8 = a.to(torch.float8_e4m3fn), h.to(torch.float8_e4m3fn)
        sa = torch.ones(a.shape[0], device="cuda")
        out = {"torch_fp8": lambda: (
            torch._scaled_grouped_mm(a8, self.w13t8, sa, self.s13, offs=offs,
                                     out_dtype=torch.bfloat16),
            torch._scaled_grouped_mm(h8, self.w2t8, sa, self.s2, offs=offs,
                                     out_dtype=torch.bfloat16))}
        if self.bf16:
            out["bf16"] = lambda: (
                torch._grouped_mm(a, self.w13t, offs=offs, out_dtype=torch.bfloat16),
                torch._grouped_mm(h, self.w2t, offs=offs, out_dtype=torch.bfloat16))
        return out


def variant_timings(cache, tables, xq, xs, ids, tw, num_experts, bn, want, variants, repeats,
                    default_gemms, hidden):
    """``{name: {ms, fc1_ms, fc2_ms, their spreads, speedup_fc1 / _fc2_vs_default,
    bitwise_equal_default, rel_diff_default}}`` of the ``variants`` that apply at token tile
    ``bn`` (``VARIANTS``), each on its own plan; ``tables``: ``{layout: (w13, w2)}`` (the bulk
    variant reads the preshuffled copy); ``want``: the default configuration's output;
    ``default_gemms``: the default's ``(fc1, fc2)`` callables, timed again interleaved with
    the variant's GEMMs (``repeats`` rounds), so each GEMM's ratio shares the variant's drift;
    a variant's overrides apply to the layer's default (``fp8_config(bn, hidden)``)."""
    out = {}
    for name in variants:
        tiles, vbn, overrides = VARIANTS[name]
        if bn not in tiles:
            continue
        w13, w2 = tables["preshuffled" if overrides.get("bulk_weights") else "linear"]
        vbn = vbn or bn
        cfg = fp8_config(vbn, hidden, **overrides)
        plan = build_permutation(ids, num_experts, tile_m=vbn)
        h = fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, vbn,
                                  config=cfg)
        hq, hs = quantize_rows(h, cache)
        y = torch.empty_like(want)

        def fc1(plan=plan, h=h, vbn=vbn, cfg=cfg):
            fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, vbn,
                                  out=h, config=cfg)

        def fc2(plan=plan, hq=hq, hs=hs, y=y, vbn=vbn, cfg=cfg):
            fc2_fp8_finalize(cache, hq, hs, plan.slot_index, plan.tile_expert, ids, tw, w2, vbn,
                             out=y, config=cfg)

        def both(fc1=fc1, fc2=fc2):
            fc1()
            fc2()

        fns = {"ms": both, "fc1_ms": fc1, "fc2_ms": fc2, "default_fc1": default_gemms[0],
               "default_fc2": default_gemms[1]}
        samples = {key: [] for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                samples[key].append(time_graph(fn, target_ms=GRAPH_MS))
        stats = {key: summary(v) for key, v in samples.items()}
        rec = {"token_tile": vbn, "config": str(cfg)}
        for key in ("ms", "fc1_ms", "fc2_ms"):
            rec[key] = stats[key]["median"]
            rec[key + "_spread"] = [stats[key]["min"], stats[key]["max"]]
        for gemm in ("fc1", "fc2"):
            rec[f"speedup_{gemm}_vs_default"] = (stats[f"default_{gemm}"]["median"]
                                                 / stats[f"{gemm}_ms"]["median"])
        rec.update(bitwise_equal_default=bool(torch.equal(y, want)),
                   rel_diff_default=rel_diff(y, want))
        out[name] = rec
    return out


def bench_point(cache, tables, base, db, model, kind, tpe, repeats, variants=()):
    hidden, inter, num_experts, top_k = MODELS[model]
    ids, tw = routing(kind, tpe, num_experts, top_k)
    tokens = ids.shape[0]
    x = random_tokens(tokens, hidden, seed=tpe)
    bn = choose_token_tile(ids.numel(), num_experts)
    plan = build_permutation(ids, num_experts, tile_m=bn)
    w13, w2 = tables["linear"]
    xq, xs = quantize_rows(x, cache)
    h = fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, bn)
    hq, hs = quantize_rows(h, cache)
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def fc1():
        fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, bn, out=h)

    def fc2():
        fc2_fp8_finalize(cache, hq, hs, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                         out=out)

    def ours():
        fc1()
        fc2()

    def quant():
        quantize_rows(x, cache)
        quantize_rows(h, cache)

    # FC2's fixed-order slot sum alone (inside ours_fc2_ms; torch's GEMMs have none): the
    # default's chunks over a scratch of its dtype
    cfg = fp8_config(bn, hidden)
    cb = fc2_chunk_blocks(hidden, top_k, cfg)
    y = torch.zeros(tokens * top_k, cb * 64, dtype=scratch_dtype(cfg), device="cuda")
    summed = torch.empty_like(out)
    slot_sum = slot_sum_launcher(cache, y, ids, summed)

    def finalize():
        for b0 in range(0, hidden // 64, cb):
            slot_sum(b0 * 64, (min(hidden // 64, b0 + cb) - b0) * 64)

    def layer():
        xq_, xs_ = quantize_rows(x, cache)
        fc1_fp8_gather_swiglu(cache, xq_, xs_, plan.gather_index, plan.tile_expert, w13, bn,
                              out=h)
        hq_, hs_ = quantize_rows(h, cache)
        fc2_fp8_finalize(cache, hq_, hs_, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                         out=out)

    fns = {"ours": ours, "ours_fc1": fc1, "ours_fc2": fc2, "quant": quant,
           "finalize": finalize, "ours_layer": layer}
    fns.update(base.fns(x, ids, num_experts, inter))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved, so drift hits every side alike
        for name, fn in fns.items():
            try:
                samples[name].append(time_graph(fn, target_ms=GRAPH_MS))
            except RuntimeError as exc:  # a torch build without a baseline's grouped GEMM
                samples.pop(name, None)
                print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        fns = {n: f for n, f in fns.items() if n in samples}
    stats = {name: summary(v) for name, v in samples.items() if v}
    var = variant_timings(cache, tables, xq, xs, ids, tw, num_experts, bn, out, variants,
                          repeats, (fc1, fc2), hidden)
    for v in var.values():
        v["speedup_vs_default"] = stats["ours"]["median"] / v["ms"]
    rows = int(plan.counts.sum())
    flops = 2.0 * rows * 3 * inter * hidden
    ours_ms = stats["ours"]["median"]
    rec = {
        "model": model, "kernel": "fp8_block128_sm90", "routing": kind, "tokens": tokens,
        "tokens_per_expert": tpe, "token_tile": bn, "repeats": repeats,
        "ours_ms": ours_ms, "ours_ms_spread": [stats["ours"]["min"], stats["ours"]["max"]],
        "ours_fc1_ms": stats["ours_fc1"]["median"], "ours_fc2_ms": stats["ours_fc2"]["median"],
        "quant_ms": stats["quant"]["median"], "finalize_ms": stats["finalize"]["median"],
        "ours_layer_ms": stats["ours_layer"]["median"],
        "ours_layer_ms_spread": [stats["ours_layer"]["min"], stats["ours_layer"]["max"]],
        "ours_tflops": flops / ours_ms / 1e9,
        "torch_fp8_ms": None, "speedup_vs_torch_fp8": None, "bf16_ms": None,
        "trtllm_fp8_ms": trtllm_moe_db.lookup(db, model, "fp8", DISTRIBUTION[kind], tokens),
        "trtllm_fp8_block_ms": trtllm_moe_db.lookup(db, model, "fp8_block", DISTRIBUTION[kind],
                                                    tokens),
        "variants": var,
    }
    if "torch_fp8" in stats:
        t = stats["torch_fp8"]
        rec.update(torch_fp8_ms=t["median"], torch_fp8_ms_spread=[t["min"], t["max"]],
                   speedup_vs_torch_fp8=t["median"] / ours_ms)
    if "bf16" in stats:
        rec.update(bf16_ms=stats["bf16"]["median"],
                   bf16_ms_spread=[stats["bf16"]["min"], stats["bf16"]["max"]])
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deepseek_v3,qwen3_235b_a22b")
    p.add_argument("--routings", default="uniform,skewed")
    p.add_argument("--tpe", default="16,64,96,256,512,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 baseline (memory)")
    p.add_argument("--variants", default="",
                   help=f"comma-separated kernel configurations to time too: {sorted(VARIANTS)}")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    db = trtllm_moe_db.load()
    cache = CompileCache()
    results = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "torch_fp8": "torch._scaled_grouped_mm rowwise, use_fast_accum=False, GEMMs only",
            "ours": "FC1 + SwiGLU + FC2 + finalize on pre-quantized x and h; ours_layer incl. "
                    "the two fused quantization passes",
            "trtllm": db and {"source": db["source"], "note": db["note"]}}
    for model in args.models.split(","):
        hidden, inter, num_experts, _ = MODELS[model]
        experts = random_fp8_experts(num_experts, hidden, inter, seed=1)
        layouts = {"linear": (experts["w3_w1_weight"], experts["w2_weight"])}
        if "bulk" in variants:  # a second copy of the weights, in the bulk-copy layout
            layouts["preshuffled"] = (preshuffle_fp8(experts["w3_w1_weight"], fc1=True),
                                      preshuffle_fp8(experts["w2_weight"], fc1=False))
        tables = {name: (build_fp8_expert_table([w13], [experts["w3_w1_weight_scale_inv"]], [0]),
                         build_fp8_expert_table([w2], [experts["w2_weight_scale_inv"]], [0]))
                  for name, (w13, w2) in layouts.items()}
        base = TorchBaselines(experts, bf16=not args.no_bf16)
        torch.cuda.empty_cache()
        for kind in args.routings.split(","):
            for tpe in (int(v) for v in args.tpe.split(",")):
                r = bench_point(cache, tables, base, db, model, kind, tpe, args.repeats,
                                variants)
                results.append(r)
                emit({**meta, "results": results}, args.out, True)
                print(f"{model:16s} {kind:7s} tpe={tpe:5d} T={r['tokens']:6d} ours "
                      f"{r['ours_ms']:.3f} ms ({r['ours_tflops']:.0f} TF/s; layer "
                      f"{r['ours_layer_ms']:.3f}) torch fp8 "
                      f"{r['torch_fp8_ms'] or float('nan'):.3f} "
                      f"x{r['speedup_vs_torch_fp8'] or float('nan'):.2f} bf16 "
                      f"{r['bf16_ms'] or float('nan'):.3f} trtllm fp8 "
                      f"{r['trtllm_fp8_ms'] or float('nan'):.2f}"
                      + "".join(f"  {n} {v['ms']:.3f} x{v['speedup_vs_default']:.2f} (fc1 "
                                f"x{v['speedup_fc1_vs_default']:.2f} fc2 "
                                f"x{v['speedup_fc2_vs_default']:.2f})"
                                + ("" if v["bitwise_equal_default"] else
                                   f" NOT BITWISE (rel diff {v['rel_diff_default']:.1e})")
                                for n, v in r["variants"].items()), file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
        del experts, tables, base, layouts
        torch.cuda.empty_cache()
    emit({**meta, "results": results}, args.out, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
