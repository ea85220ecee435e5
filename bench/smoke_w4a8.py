#!/usr/bin/env python3
"""A quick check of the W4A8 path (NVFP4 weights on FP8 tensor cores) before long device stages
(the ``w4a8`` suite): the cutedsl backend with ``nvfp4_compute="fp8"`` at four shapes (tiny, and
DeepSeek-V3-like at 17, 300 and 2000 tokens, one expert left empty) against
``quant.w4a8.w4a8_expert_mlp`` per expert, and its distance to W4A16 printed beside. Exits
non-zero when an output is not finite or its relative error to the reference is 1e-2 or more, so
the suite stops there (``stop_on_fail``). Needs a CUDA GPU (sm_90a) and the CUTLASS DSL."""
import argparse
import sys
import time

SHAPES = ((256, 128, 8, 2, 5), (2048, 768, 128, 8, 17), (2048, 768, 128, 8, 300),
          (2048, 768, 128, 8, 2000))  # H I E k T
MAX_REL_ERR = 1e-2


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("smoke_w4a8: no CUDA device; the W4A8 kernels need an sm_90a GPU", file=sys.stderr)
        return 1
    from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                                   random_tokens, skewed_routing)
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
    from tensorrt_llm_dwdp.quant.w4a8 import w4a8_expert_mlp

    fp8, bf16 = CuteDslMoeBackend(nvfp4_compute="fp8"), CuteDslMoeBackend()
    ok = True
    for hidden, inter, experts, top_k, tokens in SHAPES:
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
        print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens}: W4A8 vs reference "
              f"{err:.2e}, vs W4A16 {err16:.2e}, finite {finite} ({dt:.1f} s incl. compile)",
              flush=True)
        ok &= finite and err < MAX_REL_ERR
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
