"""Bench: configurations of the sm90 RS W4A16 kernel against the default, one device, one run.

For each model and tokens-per-expert point (uniform routing, as ``moe_kernels.py``) it times FC1
and FC2 (incl. slot sums) with the default ``rs_config`` and with each named alternative
(``RsConfig`` field overrides), and checks that every alternative's ``h`` and output are
bitwise equal to the default's (same K order, so any difference is a bug). Prints one JSON
document (``--out`` also writes it): per point and configuration fc1/fc2 ms and the ratio to
the default. A configuration with ``weights=preshuffled`` runs on a preshuffled copy of the
same experts (``kernels.testing.preshuffled_experts``, made once per model when any variant
needs it); ``--variants preshuffled`` times that layout at every token tile
(``preshuffled+bulk`` also with bulk weight copies).
"""
from __future__ import annotations

import argparse
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import TOKEN_TILES
from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config
from tensorrt_llm_dwdp.kernels.testing import MODELS, preshuffled_experts, random_nvfp4_experts

try:
    from bench.json_out import emit
    from bench.moe_kernels import tables, time_graph, uniform_point
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from json_out import emit
    from moe_kernels import tables, time_graph, uniform_point

# name -> RsConfig overrides, per token tile (the default is always timed first as "default")
VARIANTS = {
    16: {
        "1cta": dict(ctas_per_sm=1, producer_regs=112),
        "2cta_k128": dict(k_tile=128, producer_regs=56),
    },
    64: {
        "not_persistent": dict(persistent=False),
        "ring4": dict(ring=4),
    },
    128: {
        "128rows": dict(blocks_per_wg=1, producer_regs=112),
    },
}


# the load-time pre-shuffle against the linear layout, per token tile (kernels/NOTES.md);
# at bn 128 also K tile 128 with a ring of 4 pairs (fewer dequant registers: the CPU compile
# spills 12 bytes, none in the K loop)
PRESHUFFLED = {bn: {"preshuffled": dict(weights="preshuffled")} for bn in TOKEN_TILES}
PRESHUFFLED[128]["preshuffled_k128_ring4"] = dict(weights="preshuffled", k_tile=128, ring=4)
# ... and its weights moved by one cp.async.bulk per block and stage
BULK = {bn: {"preshuffled_bulk": dict(weights="preshuffled", weight_copy="bulk")}
        for bn in TOKEN_TILES}


def parse_variants(spec: str | None) -> dict:
    """``--variants 'bn:name:field=v,field=v;...'`` replaces the built-in table;
    ``--variants preshuffled`` picks ``PRESHUFFLED``, ``preshuffled+bulk`` adds ``BULK``."""
    if not spec:
        return VARIANTS
    if spec in ("preshuffled", "preshuffled+bulk"):
        extra = BULK if spec.endswith("+bulk") else {}
        return {bn: {**PRESHUFFLED[bn], **extra.get(bn, {})} for bn in PRESHUFFLED}
    out: dict = {}
    for item in spec.split(";"):
        bn, name, fields = item.split(":")
        out.setdefault(int(bn), {})[name] = {
            f: int(v) if v.lstrip("-").isdigit() else v
            for f, v in (kv.split("=") for kv in fields.split(",") if kv)}
    return out


def bench_point(cache, weights, model, tpe, variants, shuffled=None) -> dict:
    hidden, inter, _, _ = MODELS[model]
    ids, tw, x, bn, plan = uniform_point(model, tpe)
    tokens = ids.shape[0]
    layouts = {"linear": tables(weights)}
    if shuffled is not None:
        layouts["preshuffled"] = tables(shuffled)
    res = {"model": model, "tokens_per_expert": tpe, "token_tile": bn, "configs": {}}
    ref = None
    for name, overrides in [("default", {})] + list(variants.get(bn, {}).items()):
        c1, c2 = rs_config(bn, hidden, **overrides), rs_config(bn, inter, **overrides)
        w13, w2 = layouts[c1.weights]
        h = torch.empty(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")

        def fc1():
            fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h,
                              config=c1)

        def fc2():
            fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn, out=out,
                         config=c2)

        entry = {"overrides": {k: v if isinstance(v, str) else int(v)
                               for k, v in overrides.items()}}
        try:
            fc1()
            fc2()
            torch.cuda.synchronize()
            if ref is None:
                ref = (h.clone(), out.clone())
            else:
                entry["bitwise_equal_default"] = bool(torch.equal(h, ref[0])
                                                      and torch.equal(out, ref[1]))
            entry["fc1_ms"] = time_graph(fc1)
            entry["fc2_ms"] = time_graph(fc2)
            entry["total_ms"] = entry["fc1_ms"] + entry["fc2_ms"]
        except Exception as exc:  # a configuration that does not build or launch
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
        res["configs"][name] = entry
        base = res["configs"]["default"]
        if "total_ms" in entry and "total_ms" in base:
            entry["speedup_vs_default"] = base["total_ms"] / entry["total_ms"]
        print(f"{model} tpe={tpe} bn={bn} {name:22s} "
              + (f"fc1 {entry['fc1_ms']:.3f} fc2 {entry['fc2_ms']:.3f} total "
                 f"{entry['total_ms']:.3f} x{entry.get('speedup_vs_default', 1):.3f} "
                 f"bitwise {entry.get('bitwise_equal_default', '-')}"
                 if "total_ms" in entry else entry.get("error", "")),
              file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deepseek_v3")
    p.add_argument("--tpe", default="16,64,256")
    p.add_argument("--variants", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    cache = CompileCache()
    results = []
    for model in args.models.split(","):
        hidden, inter, num_experts, _ = MODELS[model]
        weights = random_nvfp4_experts(num_experts, hidden, inter, seed=1)
        shuffled = (preshuffled_experts(weights) if any(
            o.get("weights") == "preshuffled" for per_bn in variants.values()
            for o in per_bn.values()) else None)
        for tpe in (int(v) for v in args.tpe.split(",")):
            results.append(bench_point(cache, weights, model, tpe, variants, shuffled))
            # keep what is measured if a later point dies
            emit({"device": torch.cuda.get_device_name(), "results": results}, args.out,
                 quiet=True)
            torch.cuda.empty_cache()
        del weights, shuffled
        torch.cuda.empty_cache()
    emit({"device": torch.cuda.get_device_name(), "results": results}, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
