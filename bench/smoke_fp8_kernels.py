#!/usr/bin/env python3
"""A quick check of the sm90 FP8 MoE layer before long device stages (the ``fp8-kernels`` suite):
three shapes (tiny, and DeepSeek-V3-like at 300 and 3000 tokens, one expert left empty) against
``kernels.testing.fp8_moe_reference``. Exits non-zero when an output is not finite or its
relative error is 2e-2 or more, so the suite stops there (``stop_on_fail``) instead of timing a
broken kernel; a failing shape is run again with each of the consumers' previous ways
(``OLD_WAYS``: compile-checked defaults not yet measured) to name the change that broke it.
Needs a CUDA GPU (sm_90a) and the CUTLASS DSL."""
import argparse
import sys
import time

SHAPES = ((128, 128, 4, 2, 5), (2048, 768, 128, 8, 300), (2048, 768, 128, 8, 3000))  # H I E k T
MAX_REL_ERR = 2e-2
# Fp8Config fields that became defaults before a GPU ran them: (field, its previous value)
OLD_WAYS = (("release_per_warp", False), ("scale_lookahead", False))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("smoke_fp8_kernels: no CUDA device; the FP8 kernels need an sm_90a GPU",
              file=sys.stderr)
        return 1
    from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import build_fp8_expert_table, fp8_moe_forward
    from tensorrt_llm_dwdp.kernels.testing import (fp8_moe_reference, random_fp8_experts,
                                                   random_tokens, skewed_routing)
    from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
    from tensorrt_llm_dwdp.moe.permute import build_permutation

    cache, ok = CompileCache(), True
    for hidden, inter, experts, top_k, tokens in SHAPES:
        w = random_fp8_experts(experts, hidden, inter, seed=1)
        t13 = build_fp8_expert_table([w["w3_w1_weight"]], [w["w3_w1_weight_scale_inv"]], [0])
        t2 = build_fp8_expert_table([w["w2_weight"]], [w["w2_weight_scale_inv"]], [0])
        x = random_tokens(tokens, hidden, seed=2)
        ids, tw = skewed_routing(tokens, experts, top_k, seed=3, empty_experts=1)
        bn = choose_token_tile(ids.numel(), experts)
        want, _ = fp8_moe_reference(x, ids, tw, w)

        def check(config=None, label="default"):
            t0 = time.time()
            out = fp8_moe_forward(cache, x, ids, tw, t13, t2,
                                  build_permutation(ids, experts, tile_m=bn), bn, config=config)
            torch.cuda.synchronize()
            err = ((out.double() - want.double()).norm() / want.double().norm()).item()
            finite = bool(torch.isfinite(out).all())
            print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens} bn={bn} {label}: rel "
                  f"err {err:.2e} finite {finite} ({time.time() - t0:.1f} s incl. compile)",
                  flush=True)
            return finite and err < MAX_REL_ERR

        if not check():
            ok = False
            for field, old in OLD_WAYS:
                check(fp8_config(bn, hidden, **{field: old}), f"{field}={old}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
