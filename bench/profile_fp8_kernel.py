"""Run the sm90 FP8 FC1 and FC2 kernels twice on one uniform routing, for a profiler (ncu).

Random FP8 experts of MODEL, ``tpe`` rows per expert, x and h quantized before the kernels (the
two runs time nothing; ncu reads the second one). Prints how many ``Fp8BlockGemm`` launches one
run makes (FC1 + the FC2 column chunks), the ``--launch-skip`` that reaches the second run.
Usage: ncu --clock-control none -k regex:Fp8BlockGemm --launch-skip N --launch-count 2 \\
           python3 bench/profile_fp8_kernel.py MODEL TPE
"""
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config
from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import (
    FP8_BLOCK_ROWS,
    build_fp8_expert_table,
    fc1_fp8_gather_swiglu,
    fc2_chunk_blocks,
    fc2_fp8_finalize,
    quantize_rows,
)
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    random_fp8_experts,
    random_tokens,
    uniform_routing,
)
from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile
from tensorrt_llm_dwdp.moe.permute import build_permutation


def launches_per_run(model: str, tpe: int) -> int:
    """``Fp8BlockGemm`` launches of one FC1 + FC2 at ``tpe`` rows per expert (uniform): 1 +
    the FC2 column chunks of the layer's default configuration (``fc2_chunk_blocks``: its
    scratch dtype and tile width set the chunk)."""
    hidden, _, num_experts, top_k = MODELS[model]
    bn = choose_token_tile(tpe * num_experts, num_experts)
    blocks = hidden // FP8_BLOCK_ROWS
    return 1 + -(-blocks // fc2_chunk_blocks(hidden, top_k, fp8_config(bn, hidden)))


def main() -> int:
    model, tpe = sys.argv[1], int(sys.argv[2])
    hidden, inter, num_experts, top_k = MODELS[model]
    experts = random_fp8_experts(num_experts, hidden, inter, seed=1)
    w13 = build_fp8_expert_table([experts["w3_w1_weight"]], [experts["w3_w1_weight_scale_inv"]],
                                 [0])
    w2 = build_fp8_expert_table([experts["w2_weight"]], [experts["w2_weight_scale_inv"]], [0])
    ids, tw = uniform_routing(tpe, num_experts, top_k)
    x = random_tokens(ids.shape[0], hidden, seed=tpe)
    bn = choose_token_tile(ids.numel(), num_experts)
    plan = build_permutation(ids, num_experts, tile_m=bn)
    cache = CompileCache()
    xq, xs = quantize_rows(x, cache)
    h = fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, bn)
    hq, hs = quantize_rows(h, cache)
    for _ in range(2):
        fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, bn, out=h)
        fc2_fp8_finalize(cache, hq, hs, plan.slot_index, plan.tile_expert, ids, tw, w2, bn)
    torch.cuda.synchronize()
    print(f"{model} tpe={tpe} bn={bn}: FC1 + FC2 ran twice after a first FC1; "
          f"{launches_per_run(model, tpe)} Fp8BlockGemm launches per run", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
