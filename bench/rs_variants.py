"""Bench: configurations of the sm90 RS W4A16 kernel against the default, one device, one run.

For each model and tokens-per-expert point (uniform routing, as ``moe_kernels.py``) it times FC1
and FC2 (incl. slot sums) with the default ``rs_config`` and with each named alternative
(``RsConfig`` field overrides: k_tile, ring, ctas_per_sm, producer_regs, blocks_per_wg,
persistent, y_bf16), and checks that every alternative's ``h`` and output are bitwise equal
to the default's (same K order, so any difference is a bug; ``y_bf16`` rounds FC2's rows
before the slot sum by design: every output's relative difference is recorded). All run the
one kernel path on the same experts, preshuffled once per model before any timing (``kernels.testing.model_experts``;
the weights move by bulk copies). Prints one JSON document (``--out`` also writes it): per
point and configuration fc1/fc2 ms and the ratio to the default.

A variant may also carry ``bn=N``: the point then runs on token tile N instead of the one the
backend picks (the plan re-built with ``tile_m=N``, ``rs_config(N, ..)`` plus the other
overrides); the output must still be bitwise the default's, and ``h`` on every real row.
"""
from __future__ import annotations

import argparse
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.testing import MODELS, model_experts, rel_diff
from tensorrt_llm_dwdp.moe.permute import build_permutation

try:
    from bench.json_out import emit
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from json_out import emit

# name -> RsConfig overrides, per token tile (the default is always timed first as "default");
# measured against the linear layout's kernel in device calls 7-8, to re-check on this one;
# y_bf16: FC2's router-weighted scratch rows in bf16 (the FP8 kernels' default, 1.00-1.16x
# there), not bitwise the default (each row rounds once before the slot sum)
VARIANTS = {
    16: {
        "1cta": dict(ctas_per_sm=1, producer_regs=112),
        "2cta_k128": dict(k_tile=128, producer_regs=56),
        "y_bf16": dict(y_bf16=True),
    },
    64: {
        "not_persistent": dict(persistent=False),
        "ring4": dict(ring=4),
        "y_bf16": dict(y_bf16=True),
    },
    128: {
        "128rows": dict(blocks_per_wg=1, producer_regs=112),
        "y_bf16": dict(y_bf16=True),
    },
}
# More warps in flight where the kernel is latency-bound (ncu, device call 12: bn 64 runs one
# CTA of 12 warps per SM, 0.78 eligible warps per scheduler): one 64-row block per consumer
# warpgroup (128 rows per CTA, 32 accumulator registers at bn 64) so that 2 (bn 64, 32) or 3
# (bn 32, 16) CTAs fit per SM. Each compiles for sm_90a without spills or serialized wgmmas
# (tests/kernels/test_compile_sm90.py::test_occupancy_candidate_compiles; registers, stages and
# K-loop instructions in kernels/NOTES.md); not measured yet.
OCCUPANCY = {
    16: {
        "bn16_3cta_1blk": dict(blocks_per_wg=1, ctas_per_sm=3, producer_regs=24),
    },
    32: {
        "bn32_2cta_1blk": dict(blocks_per_wg=1, producer_regs=40),
        "bn32_2cta_1blk_k128": dict(blocks_per_wg=1, k_tile=128, producer_regs=56),
        "bn32_3cta_1blk": dict(blocks_per_wg=1, ctas_per_sm=3, producer_regs=32),
    },
    64: {
        "bn64_2cta_1blk": dict(blocks_per_wg=1, ctas_per_sm=2, k_tile=64, producer_regs=40),
        "bn64_2cta_1blk_k128": dict(blocks_per_wg=1, ctas_per_sm=2, k_tile=128,
                                    producer_regs=56),
        # tpe 64 on two 32-token tiles per expert (the bn 32 default: 2 CTAs, 256 rows): twice
        # the warps, each weight byte read twice (the second time from L2 if it is still there)
        "bn64_on_tile32": dict(bn=32),
    },
}
for _bn, _table in OCCUPANCY.items():
    VARIANTS.setdefault(_bn, {}).update(_table)


def occupancy_configs() -> list[tuple[str, int, dict]]:
    """``OCCUPANCY``'s RsConfig candidates as (name, token tile, overrides); variants on another
    token tile (``bn=``) run default configurations and are left out (tests check these)."""
    return [(name, bn, fields) for bn, table in OCCUPANCY.items()
            for name, fields in table.items() if "bn" not in fields]


def builtin_help() -> str:
    return "built-in variants (token tile: name = overrides):\n" + "\n".join(
        f"  {bn:3d}: {name} = " + ",".join(f"{k}={v}" for k, v in fields.items())
        for bn, table in sorted(VARIANTS.items()) for name, fields in table.items())


def parse_variants(spec: str | None) -> dict:
    """``--variants 'bn:name:field=v,field=v;...'`` replaces the built-in table, e.g.
    ``'128:k128_ring4:k_tile=128,ring=4'``; an item without ``:`` names built-in variants
    (comma-separated, e.g. ``'bn64_2cta_1blk,bn64_2cta_1blk_k128'``)."""
    if not spec:
        return VARIANTS
    out: dict = {}
    for item in spec.split(";"):
        if ":" not in item:
            for name in item.split(","):
                hits = [bn for bn, table in VARIANTS.items() if name in table]
                if not hits:
                    raise ValueError(f"no built-in variant {name!r}\n{builtin_help()}")
                out.setdefault(hits[0], {})[name] = VARIANTS[hits[0]][name]
            continue
        bn, name, fields = item.split(":")
        out.setdefault(int(bn), {})[name] = {
            f: int(v) if v.lstrip("-").isdigit() else v
            for f, v in (kv.split("=") for kv in fields.split(",") if kv)}
    return out


def bench_point(cache, weights, model, tpe, variants) -> dict:
    """One point; ``weights``: the model's experts, preshuffled (the kernels' layout)."""
    # the kernels import the CUTLASS DSL: loaded here, so the variant tables (tests, --help)
    # import without it
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config

    try:
        from bench.moe_kernels import tables, time_graph, uniform_point
    except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
        from moe_kernels import tables, time_graph, uniform_point
    hidden, inter, num_experts, _ = MODELS[model]
    ids, tw, x, bn, default_plan = uniform_point(model, tpe)
    tokens = ids.shape[0]
    w13, w2 = tables(weights)
    res = {"model": model, "tokens_per_expert": tpe, "token_tile": bn, "configs": {}}
    ref = None
    for name, overrides in [("default", {})] + list(variants.get(bn, {}).items()):
        fields = dict(overrides)
        tile = fields.pop("bn", bn)  # a variant on another token tile re-plans the point
        plan = (default_plan if tile == bn
                else build_permutation(ids, num_experts, tile_m=tile))
        h = torch.empty(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")

        def fc1():
            fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, tile, out=h,
                              config=c1, tile_count=plan.tile_count)

        def fc2():
            fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, tile,
                         out=out, config=c2, tile_count=plan.tile_count)

        entry = {"overrides": {k: v if isinstance(v, str) else int(v)
                               for k, v in overrides.items()}}
        try:  # an unknown field or a configuration that does not fit, build or launch
            c1, c2 = rs_config(tile, hidden, **fields), rs_config(tile, inter, **fields)
            fc1()
            fc2()
            torch.cuda.synchronize()
            real = plan.gather_index >= 0  # h on real rows: same order on every token tile
            got = (plan.gather_index[real], h[real], out)
            if ref is None:
                ref = tuple(t.clone() for t in got)
            else:
                entry["bitwise_equal_default"] = all(
                    a.shape == b.shape and bool(torch.equal(a, b)) for a, b in zip(got, ref))
                entry["rel_diff_default"] = rel_diff(out, ref[2])
            entry["fc1_ms"] = time_graph(fc1)
            entry["fc2_ms"] = time_graph(fc2)
            entry["total_ms"] = entry["fc1_ms"] + entry["fc2_ms"]
        except Exception as exc:
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=builtin_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deepseek_v3",
                   help=f"comma-separated, of {', '.join(MODELS)} (default deepseek_v3)")
    p.add_argument("--tpe", default="16,64,256",
                   help="tokens per expert, comma-separated; each point runs the variants of "
                        "the token tile the backend picks for it (default 16,64,256)")
    p.add_argument("--variants", default=None,
                   help="default: every built-in variant (below). Either built-in names, "
                        "comma-separated ('bn64_2cta_1blk,bn32_3cta_1blk'), or "
                        "'bn:name:field=v,field=v' items separated by ';' "
                        "('64:k64:k_tile=64,ring=2'); both kinds may be mixed with ';'")
    p.add_argument("--out", default=None, help="also write the JSON document here")
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    cache = CompileCache()
    results = []
    for model in args.models.split(","):
        # shuffled once here, outside every timing (the loader does it once at load)
        weights = model_experts(model, seed=1)
        torch.cuda.empty_cache()
        for tpe in (int(v) for v in args.tpe.split(",")):
            results.append(bench_point(cache, weights, model, tpe, variants))
            # keep what is measured if a later point dies
            emit({"device": torch.cuda.get_device_name(), "results": results}, args.out,
                 quiet=True)
            torch.cuda.empty_cache()
        del weights
        torch.cuda.empty_cache()
    emit({"device": torch.cuda.get_device_name(), "results": results}, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
