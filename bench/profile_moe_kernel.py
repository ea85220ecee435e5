"""Run the sm90 FC1 and FC2 kernels once each on one routing, for a profiler (ncu) to read
(random experts, preshuffled before the kernels run: the layout they read).

Usage: ncu --clock-control none -k regex:W4A16Rs python3 bench/profile_moe_kernel.py MODEL TPE
(The first launch of each kernel compiles; a second call runs it again for ``-s`` skipping.)
"""
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.testing import model_experts

try:
    from bench.moe_kernels import tables, uniform_point
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from moe_kernels import tables, uniform_point


def main() -> int:
    model, tpe = sys.argv[1], int(sys.argv[2])
    weights = model_experts(model, seed=1)
    ids, tw, x, bn, plan = uniform_point(model, tpe)
    w13, w2 = tables(weights)
    cache = CompileCache()
    for _ in range(2):
        h = fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                              tile_count=plan.tile_count)
        fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                     tile_count=plan.tile_count)
    torch.cuda.synchronize()
    print(f"{model} tpe={tpe} bn={bn} ran FC1 and FC2 twice", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
