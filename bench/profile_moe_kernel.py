"""Run the sm90 FC1 and FC2 kernels once each on one routing, for a profiler (ncu) to read.

Usage: ncu --clock-control none -k regex:W4A16 python3 bench/profile_moe_kernel.py MODEL TPE
"""
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_weighted, permuted_row_weights
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    random_nvfp4_experts,
    random_tokens,
    uniform_routing,
)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_tile_m
from tensorrt_llm_dwdp.moe.permute import build_permutation

sys.path.insert(0, "bench")
from moe_kernels import tables  # noqa: E402


def main() -> int:
    model, tpe = sys.argv[1], int(sys.argv[2])
    hidden, inter, num_experts, top_k = MODELS[model]
    weights = random_nvfp4_experts(num_experts, hidden, inter, seed=1)
    ids, tw = uniform_routing(tpe, num_experts, top_k)
    x = random_tokens(ids.shape[0], hidden, seed=0)
    tile_m = choose_tile_m(ids.numel(), num_experts)
    plan = build_permutation(ids, num_experts, tile_m=tile_m)
    w13, w2 = tables(weights)
    cache = CompileCache()
    rw = permuted_row_weights(tw, plan.slot_index)
    h = fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, tile_m)
    fc2_weighted(cache, h, plan.tile_expert, rw, w2, tile_m)
    torch.cuda.synchronize()
    print(f"{model} tpe={tpe} tile_m={tile_m} ran FC1 and FC2", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
