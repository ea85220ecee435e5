#!/usr/bin/env python3
"""A quick check of the CuTeDSL MoE kernels before long device stages: three shapes (tiny, and
DeepSeek-V3-like at 300 and 2000 tokens) on preshuffled experts, the only layout they read,
against the torch reference. Exits non-zero when an output is not finite or its relative error
is 1e-2 or more, so a suite stops there (``stop_on_fail``) instead of timing a broken kernel."""
import sys
import time

import torch

from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                               random_tokens, skewed_routing)
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend

SHAPES = ((64, 64, 16, 4, 5), (2048, 768, 128, 8, 300), (2048, 768, 128, 8, 2000))  # H I E k T


def main() -> int:
    backend, ref = CuteDslMoeBackend(), TorchMoeBackend()
    ok = True
    for hidden, inter, experts, top_k, tokens in SHAPES:
        w = preshuffled_experts(random_nvfp4_experts(experts, hidden, inter, seed=1))
        x = random_tokens(tokens, hidden, seed=2)
        ids, tw = skewed_routing(tokens, experts, top_k, seed=3, empty_experts=1)
        t0 = time.time()
        out = backend.run_experts(x, ids, tw, w)
        torch.cuda.synchronize()
        want = ref.run_experts(x, ids, tw, w)
        err = ((out.double() - want.double()).norm() / want.double().norm()).item()
        finite = bool(torch.isfinite(out).all())
        print(f"H={hidden} I={inter} E={experts} k={top_k} T={tokens}: rel err {err:.2e} "
              f"finite {finite} ({time.time() - t0:.1f} s incl. compile)", flush=True)
        ok &= finite and err < 1e-2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
