"""The warp-specialized sm90 GEMMs and deeper load rings give bit-for-bit the results of the
plain schedule (same WGMMA sequence per tile), on the device. Kept apart so a schedule bug cannot hide the
plain kernels' results."""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.testing import MODELS, random_tokens, skewed_routing
from tensorrt_llm_dwdp.moe.permute import build_permutation

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]


@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("model,tokens", [("qwen3_30b_a3b", 500), ("deepseek_v3", 200)])
def test_warp_specialized_is_bitwise_plain(backend, experts, model, tokens, tile_m):
    """Same WGMMA sequence, other schedule: FC1 and FC2 outputs must match bit for bit."""
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_weighted, permuted_row_weights

    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=21)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=22)
    plan = build_permutation(ids, num_experts, tile_m=tile_m)
    w13 = backend._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    w2 = backend._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
    rw = permuted_row_weights(tw, plan.slot_index)
    outs = []
    deep = 6 if tile_m == 64 else 5  # deepest load ring that fits shared memory
    for ws, stages in ((False, 4), (True, 4), (False, deep)):
        h = fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, tile_m,
                              warp_specialized=ws, stages=stages)
        y = fc2_weighted(backend.cache, h, plan.tile_expert, rw, w2, tile_m, warp_specialized=ws,
                         stages=stages)
        outs.append((h, y))
    real = plan.gather_index >= 0
    for name, (h, y) in zip(("warp-specialized", f"{deep}-slot ring"), outs[1:]):
        assert torch.equal(outs[0][0][real], h[real]), f"FC1 {name} differs"
        assert torch.equal(outs[0][1][real], y[real]), f"FC2 {name} differs"
